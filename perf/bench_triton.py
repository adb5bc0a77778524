"""`make bench`: the tiny model served by Triton against the same pipeline called in-process.

One run, one machine, the same request (batch 1):
  - Triton p50 / in-process p50 (target <= 1.05), the serving overhead: the pipeline core
    called directly and the real tritonserver called over gRPC, one call of each in turn,
    so that drift on a shared machine weighs on both sides alike;
  - perf_analyzer through Triton at concurrency 1, 2 and 4, and images/s at concurrency 4
    over concurrency 1, the dynamic batching gain.
Writes perf/results/cpu-tiny-triton.json and perf_analyzer's CSVs beside it.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "model_repository" / "stable_diffusion" / "1"))

import tritonclient.grpc as grpcclient  # noqa: E402

from gateway.triton_client import MODEL_NAME, ImageParams, make_inputs, make_outputs  # noqa: E402
from launcher.triton import Triton  # noqa: E402
from perf import perf_analyzer  # noqa: E402

REQUEST: dict[str, Any] = {
    "prompt": "a frost-forged legendary axe, game item icon",
    "seed": 42,
    "steps": 25,
    "guidance_scale": 7.5,
    "width": 128,
    "height": 128,
    "scheduler": "dpmpp_2m",
}
THREADS = 2  # the model instance's intra_op_threads in config.pbtxt
PAIRS = 40
RESULTS = ROOT / "perf" / "results"


class InProcess:
    """The pipeline core called directly, as Triton's model calls it, with the same threads."""

    def __init__(self, weights: Path) -> None:
        from sd_pipeline import StableDiffusionCore
        from sd_requests import GenerationRequest

        self.core = StableDiffusionCore(weights, threads=THREADS)
        self.request = GenerationRequest(**REQUEST)
        for _ in range(3):  # warm-up: thread pools, allocator
            self.once()

    def once(self) -> float:
        start = time.perf_counter()
        self.core.generate([self.core.row(self.request)])
        return time.perf_counter() - start


def triton_once(client: grpcclient.InferenceServerClient) -> float:
    """One request over a kept-open gRPC channel, as a serving client would make it."""
    start = time.perf_counter()
    client.infer(
        MODEL_NAME,
        make_inputs(grpcclient, [ImageParams(**REQUEST)]),
        outputs=make_outputs(grpcclient),
    )
    return time.perf_counter() - start


def main() -> int:
    repository = ROOT / "model_repository"
    weights = repository / "stable_diffusion" / "1" / "weights"
    RESULTS.mkdir(parents=True, exist_ok=True)
    in_process = InProcess(weights)
    triton = Triton(repository, ROOT / "var" / "bench" / "triton").start()
    rows = {}
    direct: list[float] = []
    served: list[float] = []
    try:
        triton.load()
        with grpcclient.InferenceServerClient(triton.grpc_url) as client:
            for _ in range(3):
                triton_once(client)
            # The ratio: one in-process call, then one Triton call (gRPC, batch 1), in
            # turn, so that drift on a shared machine weighs on both sides alike.
            for _ in range(PAIRS):
                direct.append(in_process.once())
                served.append(triton_once(client))
        data = perf_analyzer.write_input_data(RESULTS / "tiny-input.json", REQUEST)
        for concurrency in (1, 2, 4):
            csv_file = RESULTS / f"cpu-tiny-perf-analyzer-c{concurrency}.csv"
            rows[concurrency] = perf_analyzer.run(
                triton.grpc_url, "stable_diffusion", data, concurrency, csv_file
            )
    finally:
        triton.stop()
    p50 = {c: row["p50 latency"] / 1e6 for c, row in rows.items()}
    throughput = {c: row["Inferences/Second"] for c, row in rows.items()}
    report: dict[str, Any] = {
        "benchmark": "make bench (perf/bench_triton.py)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, CPU only",
        "request": REQUEST,
        "in_process_p50_s": statistics.median(direct),
        "triton_grpc_p50_s": statistics.median(served),
        "triton_over_in_process_p50": statistics.median(served) / statistics.median(direct),
        "perf_analyzer_p50_s": p50,
        "perf_analyzer_images_per_s": throughput,
        "batching_gain_c4_over_c1": throughput[4] / throughput[1],
    }
    (RESULTS / "cpu-tiny-triton.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"in-process p50                  {report['in_process_p50_s'] * 1000:8.1f} ms")
    print(f"Triton p50 (gRPC, interleaved)  {report['triton_grpc_p50_s'] * 1000:8.1f} ms")
    for c in rows:
        print(f"perf_analyzer c={c}: p50 {p50[c] * 1000:8.1f} ms, {throughput[c]:6.2f} images/s")
    print(
        f"Triton p50 / in-process p50: {report['triton_over_in_process_p50']:.3f}  (target <= 1.05)"
    )
    print(f"images/s c=4 / c=1 (batching gain): {report['batching_gain_c4_over_c1']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
