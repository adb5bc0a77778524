"""`make bench`: the tiny model served by Triton against the same pipeline called in-process.

One run, one machine: the in-process pipeline core (the baseline, no server), then
perf_analyzer through the real tritonserver at concurrency 1, 2 and 4. Reports
  - Triton p50 / in-process p50 at concurrency 1 (target <= 1.05): the serving overhead;
  - images/s at concurrency 4 / concurrency 1: the dynamic batching gain.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "model_repository" / "stable_diffusion" / "1"))

from launcher.triton import Triton  # noqa: E402
from perf import perf_analyzer  # noqa: E402

REQUEST = {
    "prompt": "a frost-forged legendary axe, game item icon",
    "seed": 42,
    "steps": 25,
    "guidance_scale": 7.5,
    "width": 128,
    "height": 128,
    "scheduler": "dpmpp_2m",
}
THREADS = 2  # the model instance's intra_op_threads in config.pbtxt
RESULTS = ROOT / "perf" / "results"


class InProcess:
    """The pipeline core called directly, as Triton's model calls it, with the same threads."""

    def __init__(self, weights: Path) -> None:
        from sd_pipeline import StableDiffusionCore
        from sd_requests import GenerationRequest

        self.core = StableDiffusionCore(weights, threads=THREADS)
        self.request = GenerationRequest(**REQUEST)  # type: ignore[arg-type]
        self.seconds: list[float] = []
        for _ in range(3):  # warm-up: thread pools, allocator
            self.core.generate([self.core.row(self.request)])

    def measure(self, runs: int = 15) -> None:
        for _ in range(runs):
            start = time.perf_counter()
            self.core.generate([self.core.row(self.request)])
            self.seconds.append(time.perf_counter() - start)


def main() -> int:
    repository = ROOT / "model_repository"
    weights = repository / "stable_diffusion" / "1" / "weights"
    RESULTS.mkdir(parents=True, exist_ok=True)
    # In-process runs before and after the Triton runs, so drift on a shared machine
    # weighs on both sides of the ratio alike.
    in_process = InProcess(weights)
    in_process.measure()
    triton = Triton(repository, ROOT / "var" / "bench" / "triton").start()
    rows = {}
    try:
        triton.load()
        data = perf_analyzer.write_input_data(RESULTS / "tiny-input.json", REQUEST)
        for concurrency in (1, 2, 4):
            csv_file = RESULTS / f"cpu-tiny-perf-analyzer-c{concurrency}.csv"
            rows[concurrency] = perf_analyzer.run(
                triton.grpc_url, "stable_diffusion", data, concurrency, csv_file
            )
    finally:
        triton.stop()
    in_process.measure()
    direct = statistics.median(in_process.seconds)
    p50 = {c: row["p50 latency"] / 1e6 for c, row in rows.items()}
    throughput = {c: row["Inferences/Second"] for c, row in rows.items()}
    report = {
        "benchmark": "make bench (perf/bench_triton.py)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, CPU only",
        "request": REQUEST,
        "in_process_p50_s": direct,
        "triton_p50_s": p50,
        "triton_images_per_s": throughput,
        "triton_over_in_process_p50": p50[1] / direct,
        "batching_gain_c4_over_c1": throughput[4] / throughput[1],
    }
    (RESULTS / "cpu-tiny-triton.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"in-process p50            {direct * 1000:8.1f} ms")
    for c in rows:
        print(f"Triton c={c}: p50 {p50[c] * 1000:8.1f} ms, {throughput[c]:6.2f} images/s")
    print(
        f"Triton p50 / in-process p50 (c=1): {report['triton_over_in_process_p50']:.3f}"
        "  (target <= 1.05)"
    )
    print(f"images/s c=4 / c=1 (batching gain): {report['batching_gain_c4_over_c1']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
