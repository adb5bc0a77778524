"""`make bench`: the tiny model served by Triton against the same pipeline called in-process.

One run, one machine, the same request (batch 1):
  - Triton p50 / in-process p50 (target <= 1.05 on the median of the rounds), the serving
    overhead: the pipeline core called directly and the real tritonserver called over gRPC,
    in rounds of alternating calls (perf/rounds.py), so that drift on a shared machine weighs
    on both sides alike; the median ratio and its spread over the rounds;
  - perf_analyzer through Triton at concurrency 1, 2 and 4, and images/s at concurrency 4
    over concurrency 1, the dynamic batching gain.
Triton is started by `python -m launcher up --services triton --free-ports`; the in-process
side builds the core with the parameters of the model config Triton serves. Writes
perf/results/cpu-tiny-triton.json and perf_analyzer's CSVs beside it.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tritonclient.grpc as grpcclient  # noqa: E402

from perf import perf_analyzer, rounds, triton_grpc, workload  # noqa: E402
from perf.launch import stack  # noqa: E402

REQUEST: dict[str, Any] = {**workload.REQUEST, "seed": 42}
PAIRS = 16  # per round
REPOSITORY = ROOT / "model_repository"
RESULTS = ROOT / "perf" / "results"


def in_process_baseline(
    weights: Path, parameters: dict[str, str], max_batch_size: int
) -> Callable[[], object]:
    """The pipeline core called directly, built as Triton's model builds it: one image per call.

    The one place perf uses the model's code: the pipeline core's public API
    (`StableDiffusionCore`, `GenerationRequest`) from the model folder, given the model
    config Triton serves, so both sides run the same runtime, threads and contract.
    """
    sys.path.insert(0, str(REPOSITORY / "stable_diffusion" / "1"))
    import torch
    from sd_pipeline import StableDiffusionCore
    from sd_requests import GenerationRequest

    core = StableDiffusionCore(weights, parameters, max_batch_size=max_batch_size)
    torch.set_num_threads(core.settings.torch_threads)  # as the model sets its process's
    request = GenerationRequest(**REQUEST)
    return lambda: core.generate([core.row(request)])


def overhead(grpc_url: str) -> list[rounds.Round]:
    """Rounds of alternating in-process and Triton calls (a kept-open gRPC channel, batch 1,
    as a serving client would call)."""
    parameters, max_batch_size = triton_grpc.served_config(grpc_url)
    baseline = in_process_baseline(
        REPOSITORY / "stable_diffusion" / "1" / "weights", parameters, max_batch_size
    )
    with grpcclient.InferenceServerClient(grpc_url) as client:
        return rounds.alternating(
            baseline, lambda: triton_grpc.infer(client, [REQUEST]), pairs=PAIRS
        )


def measure(state_dir: Path) -> dict[str, Any]:
    """Start Triton, run the interleaved pairs and perf_analyzer; the report's figures."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    # The model measured, alone: an idle second model (the streaming one) is a process of
    # its own on this 2-core machine; bench_stream.py measures streaming.
    with stack(state_dir, ["triton"], repository=REPOSITORY, load_model=False) as state:
        grpc_url = state["services"]["triton"]["grpc"]
        triton_grpc.load_model(grpc_url)
        measured = overhead(grpc_url)
        data = perf_analyzer.write_input_data(RESULTS / "tiny-input.json", REQUEST)
        rows = {
            c: perf_analyzer.run(
                grpc_url,
                triton_grpc.MODEL,
                data,
                c,
                RESULTS / f"cpu-tiny-perf-analyzer-c{c}.csv",
            )
            for c in (1, 2, 4)
        }
    p50 = {c: row["p50 latency"] / 1e6 for c, row in rows.items()}
    throughput = {c: row["Inferences/Second"] for c, row in rows.items()}
    return {
        "benchmark": "make bench (perf/bench_triton.py)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, CPU only",
        "request": REQUEST,
        "triton_over_in_process_p50": rounds.summary(measured),
        "perf_analyzer_p50_s": p50,
        "perf_analyzer_images_per_s": throughput,
        "batching_gain_c4_over_c1": throughput[4] / throughput[1],
    }


def main() -> int:
    """Run the benchmark, write perf/results/cpu-tiny-triton.json, print the figures."""
    with tempfile.TemporaryDirectory(prefix="forge-bench-triton-") as work:
        report = measure(Path(work))
    (RESULTS / "cpu-tiny-triton.json").write_text(json.dumps(report, indent=2) + "\n")
    ratio = report["triton_over_in_process_p50"]
    print(f"in-process p50 (median of rounds) {ratio['baseline_p50_ms_median']:8.1f} ms")
    for c, p50 in report["perf_analyzer_p50_s"].items():
        images = report["perf_analyzer_images_per_s"][c]
        print(f"perf_analyzer c={c}: p50 {p50 * 1000:8.1f} ms, {images:6.2f} images/s")
    spread = f"{ratio['ratio_min']:.3f}..{ratio['ratio_max']:.3f}"
    print(
        f"Triton p50 / in-process p50: median {ratio['ratio_median']:.3f} over "
        f"{len(ratio['rounds'])} rounds (spread {spread}, +{ratio['added_ms_median']} ms)"
        "  (target <= 1.05)"
    )
    print(f"images/s c=4 / c=1 (batching gain): {report['batching_gain_c4_over_c1']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
