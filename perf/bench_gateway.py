"""`make bench` (part 2): what the gateway and the job queue add on top of Triton.

One run, one machine, the tiny model (25 steps, 128x128), all services on free ports:
  - gateway sync p50 / direct Triton p50 (a kept-open gRPC channel, as the gateway keeps
    one), in rounds of alternating calls (perf/rounds.py; target <= 1.10 on the median of
    the rounds), with its spread and the milliseconds the gateway adds;
  - the PNG encoding the gateway uses (zlib level 1) against the default level 6, on an
    image the model made: milliseconds and bytes each;
  - cache-hit p50 (an explicit seed asked for again: no Triton call);
  - async jobs at low load: end-to-end p50 and p95 minus direct Triton p50 (the queueing
    overhead, in ms), polling the job every 10 ms;
  - async throughput with 1 and 2 workers (40 jobs submitted at once).
The stack is started by `python -m launcher up --services triton,redis,broker,gateway
--free-ports`, the workers by `python -m launcher add worker`; the gateway is called over
HTTP, Triton over gRPC. Writes perf/results/cpu-tiny-gateway.json.
"""

from __future__ import annotations

import io
import itertools
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tritonclient.grpc as grpcclient  # noqa: E402

from perf import rounds, triton_grpc, workload  # noqa: E402
from perf.launch import add_worker, stack  # noqa: E402
from perf.rounds import timed  # noqa: E402

REQUEST = workload.REQUEST
# The gateway's and workers' settings for the run: no rate limit in the way, and fast
# consumer-group membership, so that a joining worker takes its share quickly.
ENV = {
    "FORGE_RATE_LIMIT": "1000000/minute",
    "FORGE_SESSION_TIMEOUT_MS": "6000",
    "FORGE_HEARTBEAT_INTERVAL_MS": "1000",
}
RESULTS = ROOT / "perf" / "results"
RUNS = 30  # cache hits, job latencies
PAIRS = 12  # per round of alternating direct and gateway calls


def ms(seconds: float) -> float:
    """Seconds as milliseconds, one decimal."""
    return round(seconds * 1000, 1)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (inclusive method)."""
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def ok(reply: httpx.Response, status: int = 200) -> httpx.Response:
    """`reply`, if it has `status`; a benchmark never times an error."""
    if reply.status_code != status:
        raise RuntimeError(f"{reply.request.url.path}: {reply.status_code} {reply.text[:300]}")
    return reply


def submit(c: httpx.Client, seed: int) -> str:
    """Submit a one-image job; its id."""
    reply = ok(c.post("/v1/jobs", json={"images": [{**REQUEST, "seed": seed}]}), 202)
    return str(reply.json()["id"])


def finished(c: httpx.Client, job_id: str) -> bool:
    """Whether the job is done; a failed job stops the benchmark."""
    status = ok(c.get(f"/v1/jobs/{job_id}")).json()["status"]
    if status == "failed":
        raise RuntimeError(f"job {job_id} failed")
    return bool(status == "succeeded")


def run_job(c: httpx.Client, seed: int) -> float:
    """Seconds from submitting a one-image job to seeing it finished (polled every 10 ms)."""
    start = time.perf_counter()
    job_id = submit(c, seed)
    while not finished(c, job_id):
        time.sleep(0.01)
    return time.perf_counter() - start


def throughput(c: httpx.Client, jobs: int, first_seed: int) -> float:
    """Images per second for `jobs` jobs submitted at once (new seeds: no cache hits)."""
    start = time.perf_counter()
    ids = [submit(c, first_seed + i) for i in range(jobs)]
    for job_id in ids:
        while not finished(c, job_id):
            time.sleep(0.05)
    return jobs / (time.perf_counter() - start)


def sync_and_direct(c: httpx.Client, grpc_url: str, rng: random.Random) -> dict[str, Any]:
    """Rounds of alternating direct Triton and gateway sync calls (a new seed each: no cache
    hits), then cache hits: seconds each."""
    seeds = (rng.randrange(2**62) for _ in itertools.count())
    with grpcclient.InferenceServerClient(grpc_url) as client:
        measured = rounds.alternating(
            lambda: triton_grpc.infer(client, [{**REQUEST, "seed": next(seeds)}]),
            lambda: ok(c.post("/v1/images", json={**REQUEST, "seed": next(seeds)})),
            pairs=PAIRS,
        )
    hits = [
        timed(lambda: ok(c.post("/v1/images", json={**REQUEST, "seed": 1})))
        for _ in range(RUNS + 1)
    ][1:]  # the first call fills the cache
    return {"overhead": measured, "hits": hits}


def png_levels(c: httpx.Client) -> dict[str, dict[str, float]]:
    """An image the model made, encoded at zlib level 1 (the gateway's) and 6 (the default)."""
    from PIL import Image

    asset = ok(c.post("/v1/images", json={**REQUEST, "seed": 3})).json()["asset_url"]
    pixels = Image.open(io.BytesIO(ok(c.get(asset)).content)).convert("RGB")
    figures = {}
    for level in (1, 6):
        times, size = [], 0
        for _ in range(RUNS):
            buffer = io.BytesIO()
            times.append(timed(lambda: pixels.save(buffer, format="PNG", compress_level=level)))  # noqa: B023
            size = len(buffer.getvalue())
        figures[f"level_{level}"] = {"ms": ms(statistics.median(times)), "bytes": size}
    return figures


def jobs(c: httpx.Client, state_dir: Path, rng: random.Random) -> dict[str, Any]:
    """Job latency with one worker, then throughput with one and with two workers."""
    add_worker(state_dir)
    run_job(c, 1)  # warm-up: group join, topic metadata
    latencies = [run_job(c, rng.randrange(2**62)) for _ in range(RUNS)]
    one_worker = throughput(c, 40, first_seed=10_000)
    add_worker(state_dir)
    run_job(c, 2)
    two_workers = throughput(c, 40, first_seed=20_000)
    return {"latencies": latencies, "one_worker": one_worker, "two_workers": two_workers}


def report(
    calls: dict[str, Any], png: dict[str, dict[str, float]], queued: dict[str, Any]
) -> dict[str, Any]:
    """The figures, in milliseconds and ratios."""
    overhead = rounds.summary(calls["overhead"])
    p50_direct = overhead["baseline_p50_ms_median"] / 1000
    latencies = queued["latencies"]
    return {
        "benchmark": "make bench (perf/bench_gateway.py)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()}, {platform.machine()}, CPU only",
        "request": REQUEST,
        "direct_triton_p50_ms": ms(p50_direct),
        "gateway_over_direct_p50": overhead,
        "cache_hit_p50_ms": ms(statistics.median(calls["hits"])),
        "png_encoding": png,
        "async_p50_ms": ms(statistics.median(latencies)),
        "async_p95_ms": ms(percentile(latencies, 95)),
        "async_queueing_overhead_p50_ms": ms(statistics.median(latencies) - p50_direct),
        "async_queueing_overhead_p95_ms": ms(percentile(latencies, 95) - p50_direct),
        "async_images_per_s_1_worker": round(queued["one_worker"], 2),
        "async_images_per_s_2_workers": round(queued["two_workers"], 2),
    }


def main() -> int:
    """Run the benchmark, write perf/results/cpu-tiny-gateway.json, print the figures."""
    rng = random.Random(7)
    with (
        tempfile.TemporaryDirectory(prefix="forge-bench-gateway-") as work,
        stack(Path(work), ["triton", "redis", "broker", "gateway"], env=ENV) as state,
    ):
        services = state["services"]
        auth = {"Authorization": f"Bearer {state['dev_api_key']}"}
        with httpx.Client(base_url=services["gateway"]["url"], timeout=120, headers=auth) as c:
            calls = sync_and_direct(c, services["triton"]["grpc"], rng)
            png = png_levels(c)
            queued = jobs(c, Path(work), rng)
    figures = report(calls, png, queued)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu-tiny-gateway.json").write_text(json.dumps(figures, indent=2) + "\n")
    for key, value in figures.items():
        if key == "gateway_over_direct_p50":
            value = {k: v for k, v in value.items() if k != "rounds"}
        if key not in ("request", "benchmark"):
            print(f"{key:40s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
