"""`make bench` (part 2): what the gateway and the job queue add on top of Triton.

One run, one machine, the tiny model (25 steps, 128x128), all services on free ports:
  - gateway sync p50 / direct Triton p50 (a kept-open gRPC channel, as the gateway keeps
    one), measured interleaved (target <= 1.10), and the milliseconds the gateway adds;
  - cache-hit p50 (an explicit seed asked for again: no Triton call);
  - async jobs at low load: end-to-end p50 and p95 minus direct Triton p50 (the queueing
    overhead, in ms), polling the job every 10 ms;
  - async throughput with 1 and 2 workers (40 jobs submitted at once).
Writes perf/results/cpu-tiny-gateway.json.
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tritonclient.grpc as grpcclient  # noqa: E402

from gateway.triton_client import MODEL_NAME, ImageParams, make_inputs  # noqa: E402
from launcher.gateway import GatewayServer, WorkerServer  # noqa: E402
from launcher.kafka import KafkaBroker  # noqa: E402
from launcher.redis import RedisServer  # noqa: E402
from launcher.triton import Triton  # noqa: E402

REQUEST: dict[str, Any] = {
    "prompt": "a frost-forged legendary axe, game item icon",
    "steps": 25,
    "guidance_scale": 7.5,
    "width": 128,
    "height": 128,
    "scheduler": "dpmpp_2m",
}
KEY = "fk_bench_key"
RESULTS = ROOT / "perf" / "results"
RUNS = 30


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_job(c: httpx.Client, seed: int) -> float:
    start = time.perf_counter()
    job = c.post("/v1/jobs", json={"images": [{**REQUEST, "seed": seed}]}).json()
    while c.get(f"/v1/jobs/{job['id']}").json()["status"] not in ("succeeded", "failed"):
        time.sleep(0.01)
    return time.perf_counter() - start


def throughput(c: httpx.Client, jobs: int, first_seed: int) -> float:
    """Images per second for `jobs` jobs submitted at once (new seeds: no cache hits)."""
    start = time.perf_counter()
    ids = [
        c.post("/v1/jobs", json={"images": [{**REQUEST, "seed": first_seed + i}]}).json()["id"]
        for i in range(jobs)
    ]
    for job_id in ids:
        while c.get(f"/v1/jobs/{job_id}").json()["status"] not in ("succeeded", "failed"):
            time.sleep(0.05)
    return jobs / (time.perf_counter() - start)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="forge-bench-"))
    triton = Triton(ROOT / "model_repository", work / "triton")
    redis = RedisServer(work / "redis")
    broker = KafkaBroker(work / "broker")
    started: list = []
    report: dict = {}
    try:
        for server in (triton, redis, broker):
            started.append(server.start())
        triton.load()
        env = {
            "FORGE_TRITON_GRPC_URL": triton.grpc_url,
            "FORGE_REDIS_URL": redis.url,
            "FORGE_KAFKA_BOOTSTRAP": broker.bootstrap,
            "FORGE_ASSET_DIR": str(work / "a"),
            "FORGE_DEV_API_KEY": KEY,
            "FORGE_RATE_LIMIT": "1000000/minute",
            "FORGE_SESSION_TIMEOUT_MS": "6000",
            "FORGE_HEARTBEAT_INTERVAL_MS": "1000",
        }
        gateway = GatewayServer(work, env).start()
        started.append(gateway)
        rng = random.Random(7)
        with (
            httpx.Client(
                base_url=gateway.url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}
            ) as c,
            grpcclient.InferenceServerClient(triton.grpc_url) as direct_client,
        ):
            direct, sync = [], []
            for i in range(RUNS + 3):  # interleaved; the first 3 of each warm up
                seed = rng.randrange(2**62)
                inputs = make_inputs(grpcclient, [ImageParams(**REQUEST, seed=seed)])
                d = timed(lambda: direct_client.infer(MODEL_NAME, inputs))  # noqa: B023
                g = timed(lambda: c.post("/v1/images", json={**REQUEST, "seed": seed + 1}))  # noqa: B023
                if i >= 3:
                    direct.append(d)
                    sync.append(g)
            hits = [
                timed(lambda: c.post("/v1/images", json={**REQUEST, "seed": 1}))
                for _ in range(RUNS + 1)
            ][1:]
            workers = [WorkerServer(work, env).start()]
            started += workers
            run_job(c, 1)  # warm-up: group join, topic metadata
            jobs = [run_job(c, rng.randrange(2**62)) for _ in range(RUNS)]
            one_worker = throughput(c, 40, first_seed=10_000)
            workers.append(WorkerServer(work, env).start())
            started.append(workers[-1])
            run_job(c, 2)
            two_workers = throughput(c, 40, first_seed=20_000)
        p50_direct = statistics.median(direct)
        report = {
            "benchmark": "make bench (perf/bench_gateway.py)",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.node()}, {platform.machine()}, CPU only",
            "request": REQUEST,
            "direct_triton_p50_ms": ms(p50_direct),
            "gateway_sync_p50_ms": ms(statistics.median(sync)),
            "gateway_over_direct_p50": round(statistics.median(sync) / p50_direct, 3),
            "gateway_added_ms": ms(statistics.median(sync) - p50_direct),
            "cache_hit_p50_ms": ms(statistics.median(hits)),
            "async_p50_ms": ms(statistics.median(jobs)),
            "async_p95_ms": ms(percentile(jobs, 95)),
            "async_queueing_overhead_p50_ms": ms(statistics.median(jobs) - p50_direct),
            "async_queueing_overhead_p95_ms": ms(percentile(jobs, 95) - p50_direct),
            "async_images_per_s_1_worker": round(one_worker, 2),
            "async_images_per_s_2_workers": round(two_workers, 2),
        }
    finally:
        for server in reversed(started):
            server.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu-tiny-gateway.json").write_text(json.dumps(report, indent=2) + "\n")
    for key, value in report.items():
        if key not in ("request", "benchmark"):
            print(f"{key:40s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
