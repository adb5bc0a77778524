"""The served model under load (perf/gpu_bench.py): the real tritonserver, driven over gRPC.

Triton is started by the launcher's command without the model, then the model is loaded over
gRPC, so that the cold start splits into the server's start and the model's load (weights to
the device, torch.compile, the warm-up of every batch size). Then a concurrency sweep (each
level a fixed number of one-row requests from that many client threads, each request on a
channel of its own), then the operating point: the level with the best images/s again, with
more requests, for its latency percentiles. Triton's statistics give the batches it formed and
the model's compute time per image at each batch size; nvidia-smi's memory.used, sampled,
gives the GPU memory of the whole card (this process's own CUDA context included, given as
the baseline before the server starts). The backend stub runs with TORCH_LOGS naming
recompilations and CUDA-graph skips; their lines in tritonserver.log are counted.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from perf import triton_grpc
from perf.launch import stack

TORCH_LOGS = "recompiles,cudagraphs"
LOG_MARKERS = {"recompilations": "Recompiling function", "cudagraph_skips": "skipping cudagraph"}


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50, p95, p99 and the count of a list of latencies."""
    if len(seconds) == 1:
        return {"p50": seconds[0], "p95": seconds[0], "p99": seconds[0], "n": 1}
    q = statistics.quantiles(seconds, n=100, method="inclusive")
    return {"p50": statistics.median(seconds), "p95": q[94], "p99": q[98], "n": len(seconds)}


class MemorySampler:
    """nvidia-smi's memory.used of GPU 0 (MiB) every 250 ms, with time stamps, in a thread;
    `available` is False where there is no nvidia-smi (a CPU machine)."""

    def __init__(self) -> None:
        """Start sampling, where nvidia-smi exists."""
        self.samples: list[tuple[float, int]] = []
        self.available = shutil.which("nvidia-smi") is not None
        self.process: subprocess.Popen[str] | None = None
        if not self.available:
            return
        argv = ["nvidia-smi", "--id=0", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        self.process = subprocess.Popen(
            [*argv, "-lms", "250"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            if line.strip().isdigit():
                self.samples.append((time.perf_counter(), int(line)))

    def now(self) -> int | None:
        """The latest sample (MiB), or None."""
        return self.samples[-1][1] if self.samples else None

    def peak(self, since: float, until: float | None = None) -> int | None:
        """The largest sample between two perf_counter times (MiB), or None."""
        end = until if until is not None else time.perf_counter()
        window = [mib for t, mib in self.samples if since <= t <= end]
        return max(window) if window else None

    def stop(self) -> None:
        """Stop nvidia-smi."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)


def log_counts(log: Path) -> dict[str, int]:
    """How many lines of the server's log name a recompilation or a CUDA-graph skip."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return {name: text.count(marker) for name, marker in LOG_MARKERS.items()}


def log_tail(state_dir: Path, chars: int = 6000) -> str:
    """The end of the tritonserver log under a stack's state folder ("" if none)."""
    logs = sorted(state_dir.rglob("tritonserver.log"))
    return logs[0].read_text(errors="replace")[-chars:] if logs else ""


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Environment variables set for the commands started inside the block."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _formed(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict:
    """The executions between two readings of Triton's batch statistics, by batch size."""
    formed = {}
    for b, (count, ns) in after.items():
        warm_count, warm_ns = before.get(b, (0, 0))
        count, ns = count - warm_count, ns - warm_ns
        if count > 0:
            formed[b] = {"executions": count, "compute_s_per_image": ns / 1e9 / count / b}
    return formed


def drive(url: str, rows: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """`rows` as one-row requests from `concurrency` client threads: images/s, latency
    percentiles and the batches Triton formed meanwhile."""

    def one(row: dict[str, Any]) -> float:
        start = time.perf_counter()
        triton_grpc.generate(url, [row])
        return time.perf_counter() - start

    before = triton_grpc.batch_stats(url)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, rows))
    wall = time.perf_counter() - start
    formed = _formed(before, triton_grpc.batch_stats(url))
    return {
        "concurrency": concurrency,
        "images_per_s": len(rows) / wall,
        "wall_s": wall,
        **percentiles(latencies),
        "batches_formed": {b: v["executions"] for b, v in sorted(formed.items())},
    }


def sweep(
    url: str,
    rows: list[dict[str, Any]],
    plan: dict[str, Any],
    record: dict[str, Any],
    save: Callable[[], None],
    memory: MemorySampler,
) -> None:
    """The concurrency sweep, then the operating point, into `record` (saved after each
    level); and the batches formed over both, warm-up excluded, with their compute time."""
    for row in rows[:2]:  # through gRPC first, as diffusers gets a warm-up call too
        triton_grpc.generate(url, [row])
    before = triton_grpc.batch_stats(url)
    record["levels"] = []
    for c in plan["concurrencies"]:
        since = time.perf_counter()
        level = drive(url, rows[: plan["level_requests"]], c)
        level["gpu_memory_used_mib_peak"] = memory.peak(since)
        record["levels"].append(level)
        print(f"triton c={c}: {level}", flush=True)
        save()
    best = max(record["levels"], key=lambda lv: lv["images_per_s"])
    since = time.perf_counter()
    point = drive(url, rows[: plan["operating_requests"]], best["concurrency"])
    point["gpu_memory_used_mib_peak"] = memory.peak(since)
    point["chosen"] = "the sweep's concurrency with the best images/s"
    record["operating_point"] = point
    print(f"triton operating point: {point}", flush=True)
    record["batches_formed"] = _formed(before, triton_grpc.batch_stats(url))


def serve_and_sweep(
    repository: Path,
    state_dir: Path,
    rows: list[dict[str, Any]],
    plan: dict[str, Any],
    record: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """Start Triton (no model), load the model over gRPC, sweep, stop; all into `record`."""
    memory = MemorySampler()
    time.sleep(0.5 if memory.available else 0)
    record["gpu_memory_used_mib"] = {"before_server": memory.now()}
    start = time.perf_counter()
    try:
        with (
            environment(TORCH_LOGS=TORCH_LOGS),
            stack(state_dir, ["triton"], repository=repository, load_model=False) as state,
        ):
            record["server_start_s"] = time.perf_counter() - start
            url, log = state["services"]["triton"]["grpc"], Path(state["services"]["triton"]["log"])
            loading = time.perf_counter()
            triton_grpc.load_model(url)
            record["model_load_s"] = time.perf_counter() - loading
            record["cold_start_s"] = time.perf_counter() - start
            record["gpu_memory_used_mib"].update(after_load=memory.now())
            record["log_lines_at_load"] = log_counts(log)
            print(
                f"Triton up in {record['server_start_s']:.0f} s, model loaded in "
                f"{record['model_load_s']:.0f} s",
                flush=True,
            )
            save()
            sweeping = time.perf_counter()
            sweep(url, rows, plan, record, save, memory)
            record["gpu_memory_used_mib"].update(peak_during_sweep=memory.peak(sweeping))
            record["log_lines_after_sweep"] = log_counts(log)
    except BaseException:
        record["tritonserver_log_tail"] = log_tail(state_dir)
        raise
    finally:
        memory.stop()
