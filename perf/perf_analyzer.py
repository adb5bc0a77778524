"""perf_analyzer (shipped in the tritonclient 2.51 wheel): input file, environment, CSV rows."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nvidia.cuda_runtime

VENV_BIN = Path(sys.executable).parent


def environment() -> dict[str, str]:
    """perf_analyzer links libcudart.so.12 even on a CPU-only run; the PyPI runtime has it."""
    cudart = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(cudart), env.get("LD_LIBRARY_PATH", "")) if p
    )
    return env


def write_input_data(path: Path, request: dict[str, Any]) -> Path:
    """String inputs must come from a file: one request, every tensor shaped [1]."""
    data = {name: {"content": [value], "shape": [1]} for name, value in request.items()}
    path.write_text(json.dumps({"data": [data]}, indent=2))
    return path


def run(
    grpc_url: str,
    model: str,
    input_data: Path,
    concurrency: int,
    csv_file: Path,
    *,
    requests_per_window: int = 20,
) -> dict[str, float]:
    """One concurrency level; returns perf_analyzer's CSV row (latencies in microseconds)."""
    argv = [
        str(VENV_BIN / "perf_analyzer"),
        "-m",
        model,
        "-u",
        grpc_url,
        "-i",
        "grpc",
        "--input-data",
        str(input_data),
        "-b",
        "1",
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "--measurement-mode",
        "count_windows",
        "--measurement-request-count",
        str(requests_per_window),
        # A shared 2-core VM drifts: accept windows within 50% of each other.
        "--stability-percentage",
        "50",
        "--max-trials",
        "10",
        "--percentile",
        "50",
        "-f",
        str(csv_file),
    ]
    run = subprocess.run(argv, env=environment(), capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({run.returncode}):\n{run.stdout[-3000:]}")
    with csv_file.open() as f:
        (row,) = list(csv.DictReader(f))
    return {k: float(v) for k, v in row.items() if v not in ("", None)}
