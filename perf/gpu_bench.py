"""The GPU benchmark: our served model against plain diffusers, in one call on a GPU machine.

It runs on a CUDA GPU (workloads `gpu` and `quick`); its results are committed under
perf/results/ when it has run, and perf/RESULTS.md lists the GPU figures as not measured
until then. The `smoke` workload runs the whole script on a CPU with the tiny model
(tests/test_gpu_bench.py), so that a GPU call does not fail on something a CPU can catch.

Parts, in this order (`--parts` selects; the default runs all), each guarded: a failure is
recorded in the results with its traceback and the next part runs. The results file is
rewritten after every part (and every sweep level), so a run cut short still returns what it
did; with a time budget (`gpu`: 470 s of script time) a part that cannot start in the time left
is skipped, saying why, and a timer ends the part that runs past the budget or its own cap
(PART_CAP_S), so that a runaway check leaves the later parts their time.
  1. correctness (perf/gpu_checks.py), before anything is timed: every scheduler's image of
     the tiny model on the device (runtime `torch`: fp16 on CUDA) against the same core on the
     CPU in fp32; the served architecture at a small size likewise; a row alone against the
     same row among batch mates; the UNet under torch.compile (`reduce-overhead`: CUDA
     graphs) against eager, with no recompilation after the warm-up under a mix of batches.
  2. serving (perf/gpu_serving.py): an SD 1.5-sized model with random weights (UNet (320,
     640, 1280, 1280), cross-attention 768, CLIP ViT-L-sized text encoder, SD VAE), 512x512,
     25 steps, dpmpp_2m, guidance 7.5, fp16, served by the real tritonserver (runtime `torch`,
     `reduce-overhead`, KIND_GPU, the dynamic batcher up to --max-batch-size): cold start
     (server start, model load with compilation and warm-up), images/s and P50/P95/P99 at each
     concurrency of a sweep, the operating point (the best level again, more requests), the
     batches formed and the model's compute time per image at each, GPU memory.used;
  3. diffusers (perf/plain_diffusers.py): plain diffusers one request at a time (a) and at
     each batch size the batcher formed (b), with peak memory per batch size;
  4. unet_work (perf/unet_work.py): FLOPs and bytes per UNet call at each batch size, and of
     the text encoder and VAE decoder, for the T4 projection (perf/t4_projection.py);
  5. diffusers_compiled: (c) plain diffusers with its UNet under the same torch.compile mode,
     one request at a time. It compiles a second UNet, so it comes last.
The ratios (targets in TARGETS) and the projections are recomputed from whatever parts have
results after each part. Triton is stopped before diffusers runs, so they never share the GPU.

The system is driven through its commands, as an operator would: `python -m export tiny`,
`python -m launcher repository`, `python -m export onnx --torch-only`, `python -m export
config`, and `python -m launcher up --services triton --free-ports --no-load`; the model is
loaded and requests are sent over gRPC. The tiny model and the served one are prepared at the
same time, in the background, while the checks run.

The GPU machine has torch with CUDA, transformers and onnx, but not diffusers, tritonclient,
nvidia-pytriton (the tritonserver binary), open-clip-torch (the CLIP vocabulary) or
jsonschema, nor TensorRT or onnxruntime-gpu: so the served runtime is `torch` and the export
is `--torch-only`, and perf/gpu_bundle.sh packs what is missing. From the repository root:

  echo /.whl/ >> .git/info/exclude
  perf/gpu_bundle.sh            # .whl/gpu-site.tar.xz for the GPU machine's Python 3.12
  # then, on the GPU machine (the device tool); the script's own budget is 470 s, the rest
  # of the limit is for unpacking the archive and stopping what runs when the budget ends:
  run(command="perf/gpu_device.sh", carry=[".whl"], timeout_s=540)

Results: `$OUT/<workload>-bench.json` (copy it to perf/results/), the run's log and the end
of tritonserver.log beside it, and a summary on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from perf import gpu_checks, gpu_serving, t4_projection  # noqa: E402
from perf.gpu_serving import percentiles  # noqa: E402
from perf.launch import command  # noqa: E402
from perf.pipeline_core import load_core  # noqa: E402
from perf.plain_diffusers import GUIDANCE, NEGATIVE, PROMPT, PlainDiffusers  # noqa: E402

SCHEDULER = "dpmpp_2m"
# A published figure for SD 1.5 on a T4 (fp16, 512x512, 25 steps, one image at a time),
# not measured here: the basis of the published-scaling T4 projection.
T4_PUBLISHED_SECONDS_PER_IMAGE = 2.4
MAX_QUEUE_DELAY_US = 20_000  # the batcher waits up to 20 ms to fill a batch
# name -> (">=" or "<=", target); speed_vs_diffusers_batch<b> share one target.
TARGETS = {
    "throughput_vs_diffusers_one_at_a_time": (">=", 6.0),
    "batch1_p50_vs_diffusers_p50": ("<=", 0.4),
    "speed_vs_diffusers_batch": (">=", 1.7),
    "batch1_p50_vs_compiled_diffusers_p50": ("<=", 1.10),
}


@dataclass(frozen=True)
class Workload:
    """What is served, how hard it is driven, what is checked, and the time it may take."""

    architecture: str  # the served model: `python -m export tiny --architecture`
    size: int
    steps: int
    device: str
    concurrencies: tuple[int, ...]
    level_requests: int  # requests at each concurrency of the sweep
    operating_requests: int  # requests at the operating point
    one_at_a_time: int  # timed diffusers calls for (a) and (c)
    torch_compile: str  # the model's torch_compile parameter ("" = eager)
    check_size: int  # the served architecture's device-vs-CPU check: size and steps
    check_steps: int
    budget_s: float | None  # script time; None: no budget

    @property
    def instance_kind(self) -> str:
        """Triton's instance kind for the workload's device."""
        return "KIND_GPU" if self.device == "cuda" else "KIND_CPU"


WORKLOADS = {
    "gpu": Workload(
        "sd15", 512, 25, "cuda", (1, 4, 8, 16), 32, 100, 16, "reduce-overhead", 256, 4, 470.0
    ),
    "quick": Workload("sd15", 512, 25, "cuda", (1, 8), 16, 32, 8, "reduce-overhead", 256, 2, 300.0),
    # The whole script on a CPU with the tiny model, the UNet compiled as on the GPU less the
    # CUDA graphs: a check that it runs (tests/test_gpu_bench.py), not a figure.
    "smoke": Workload("tiny", 64, 3, "cpu", (1, 2), 4, 6, 2, "default", 64, 3, None),
}
# The least time each part needs on the GPU, from the sizes of its work: a part is skipped
# when the budget has less left. Most of serving's is compiling the SD 1.5 UNet at load.
PART_MIN_S = {
    "correctness": 0.0,
    "serving": 150.0,
    "diffusers": 40.0,
    "unet_work": 10.0,
    "diffusers_compiled": 60.0,
}
# The most a part may take on the GPU before the timer ends it, so that a check or a
# compilation that runs away leaves the rest their time (the budget bounds it too).
PART_CAP_S = {
    "correctness": 200.0,
    "serving": 320.0,
    "diffusers": 120.0,
    "unet_work": 60.0,
    "diffusers_compiled": 300.0,
}
PARTS = tuple(PART_MIN_S)
CHECK_MODEL = "tiny"  # the model of the scheduler and compile checks


class OutOfTime(Exception):
    """The run's time budget is spent."""


def served_requests(work: Workload) -> list[dict[str, Any]]:
    """The served requests, one row each, named as the model's public inputs."""
    count = max(work.level_requests, work.operating_requests) + 2
    return [
        {
            "prompt": f"{PROMPT}, variant {i}",
            "negative_prompt": NEGATIVE,
            "seed": i,
            "steps": work.steps,
            "guidance_scale": GUIDANCE,
            "width": work.size,
            "height": work.size,
            "scheduler": SCHEDULER,
        }
        for i in range(count)
    ]


def prepare(workdir: Path, architecture: str, work: Workload, max_batch_size: int) -> dict:
    """A random-weight model of `architecture`, exported --torch-only into a repository of
    its own, its config set to the torch runtime, the workload's device and batching."""
    start = time.perf_counter()
    model = workdir / f"{architecture}-random"
    repo = workdir / f"{architecture}-repository"
    command("export", "tiny", f"--out={model}", f"--architecture={architecture}")
    command("launcher", "repository", f"--out={repo}")
    command("export", "onnx", f"--model={model}", f"--repository={repo}", "--torch-only")
    command(
        "export",
        "config",
        f"--repository={repo}",
        "--runtime=torch",
        f"--instance-kind={work.instance_kind}",
        "--instances=1",
        f"--max-batch-size={max_batch_size}",
        f"--max-queue-delay-us={MAX_QUEUE_DELAY_US}",
        f"--parameter=torch_compile={work.torch_compile}",
    )
    return {"model": model, "repository": repo, "seconds": time.perf_counter() - start}


def guarded(record: dict[str, Any], body: Callable[[], None]) -> None:
    """Run `body`; record its status, seconds, and the error and traceback if it failed."""
    start = time.perf_counter()
    record["status"] = "running"
    try:
        body()
        record["status"] = "ok"
    except Exception as exc:
        record.update(status="failed", error=repr(exc)[:4000], traceback=traceback.format_exc())
        print(f"FAILED: {exc!r}", file=sys.stderr, flush=True)
    finally:
        record["seconds"] = time.perf_counter() - start


class Run:
    """One benchmark run: its workload, folders, results (saved as they grow), the models
    prepared in the background, the plain diffusers pipeline, and the time budget."""

    def __init__(self, work: Workload, name: str, out: Path, workdir: Path, batch: int) -> None:
        """Start the clock and the preparation of every model the parts need."""
        self.work, self.workdir, self.max_batch_size = work, workdir, batch
        self.out_file = out / f"{name}-bench.json"
        self.started = time.perf_counter()
        self.results: dict[str, Any] = {}
        self.pool = ThreadPoolExecutor(2)
        self.models: dict[str, Future[dict[str, Any]]] = {
            arch: self.pool.submit(prepare, workdir, arch, work, batch)
            for arch in dict.fromkeys([CHECK_MODEL, work.architecture])
        }
        self._plain: PlainDiffusers | None = None
        self.timer = BudgetTimer(work.budget_s)

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.started

    def left_s(self) -> float | None:
        """Seconds of the budget left, or None without a budget."""
        budget = self.work.budget_s
        return None if budget is None else budget - self.elapsed()

    def save(self) -> None:
        """Write the results file (whole, by rename, so a cut-off run leaves a valid one)."""
        self.results["elapsed_s"] = self.elapsed()
        update_derived(self.results, self.work)
        tmp = self.out_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        os.replace(tmp, self.out_file)

    def model(self, architecture: str) -> tuple[Path, Path]:
        """The prepared model's diffusers folder and repository (waits for it); its
        preparation is recorded under "prepare"."""
        record = self.results.setdefault("prepare", {}).setdefault(architecture, {})
        try:
            prepared = self.models[architecture].result()
        except Exception as exc:
            record.update(status="failed", error=repr(exc), traceback=traceback.format_exc())
            raise
        record.update(status="ok", seconds=prepared["seconds"])
        return prepared["model"], prepared["repository"]

    def plain(self) -> PlainDiffusers:
        """Plain diffusers on the served architecture's model, loaded once."""
        if self._plain is None:
            model, _ = self.model(self.work.architecture)
            work = self.work
            self._plain = PlainDiffusers(model, work.device, size=work.size, steps=work.steps)
        return self._plain

    def batch_sizes(self) -> list[int]:
        """The batch sizes Triton formed; every one up to max_batch_size if it formed none."""
        formed = self.results.get("triton", {}).get("batches_formed") or {}
        return sorted(int(b) for b in formed) or list(range(1, self.max_batch_size + 1))


def free_device_memory() -> None:
    """Drop compiled code, CUDA graphs and cached blocks this process holds."""
    import torch

    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Checks:
    """Part 1's checks (perf/gpu_checks.py), each guarded and saved as it ends, and the
    eager device cores they share."""

    def __init__(self, run: Run, checks: dict[str, Any]) -> None:
        """Checks of `run`, recorded into `checks`."""
        self.run, self.checks = run, checks
        self.cores: dict[Path, Any] = {}
        self.references: list[gpu_checks.CpuReference] = []

    def reference(
        self, repository: Path, requests: list[dict[str, Any]], folder: str
    ) -> gpu_checks.CpuReference:
        """The CPU reference of `requests`, started now in a subprocess."""
        started = gpu_checks.CpuReference(repository, requests, self.run.workdir / folder)
        self.references.append(started)
        return started

    def core(self, repository: Path) -> Any:
        """The eager core on the device for `repository`, loaded once."""
        if repository not in self.cores:
            self.cores[repository] = load_core(repository, **gpu_checks.EAGER)
        return self.cores[repository]

    def release(self) -> None:
        """Drop the cores and whatever the device holds for them; stop the CPU references
        still running (their checks have ended)."""
        self.cores.clear()
        free_device_memory()
        for reference in self.references:
            if reference.process.poll() is None:
                reference.process.kill()
                reference.process.wait()

    def check(self, name: str, body: Callable[[], dict[str, Any]]) -> None:
        """Run one check into checks[name], guarded; save the results."""
        record = self.checks[name] = {}
        guarded(record, lambda: record.update(body()))
        print(f"[{self.run.elapsed():6.1f} s] check {name}: {record['status']}", flush=True)
        self.run.save()
        if self.run.timer.fired:  # the timer ends the part, not only the check it cut
            raise OutOfTime(self.run.timer.message)

    def independence(self, repository: Path, base: dict[str, Any]) -> dict[str, Any]:
        """`base` alone and among batch mates on the device."""
        core = self.core(repository)
        result = gpu_checks.batch_independence(core, base, self.run.max_batch_size)
        return {"device": str(core.device), **result}

    def against_cpu(
        self,
        repository: Path,
        reference: gpu_checks.CpuReference,
        requests: list[dict[str, Any]],
        names: list[str],
    ) -> dict[str, Any]:
        """Each request's image on the device against the CPU reference's."""
        core = self.core(repository)
        ours = gpu_checks.generate_each(core, requests)
        images, seconds = reference.images()
        return {
            "device": str(core.device),
            "tolerance": gpu_checks.tolerance(same_device=False),
            "requests": requests,
            "reference_s": seconds,
            "images": gpu_checks.against_reference(ours, images, names),
        }


def correctness(run: Run, record: dict[str, Any]) -> None:
    """Part 1: the tiny model's schedulers against the CPU and among batch mates, its UNet
    compiled against eager, then the served architecture against the CPU and among batch
    mates. Each CPU reference runs in a subprocess beside the device work. Whatever ends the
    part, the device memory is released and the summary written."""
    checks = Checks(run, record.setdefault("checks", {}))
    try:
        tiny_checks(run, checks)
        served_checks(run, checks)
    finally:
        checks.release()
        record["summary"] = correctness_summary(record["checks"])


def tiny_checks(run: Run, checks: Checks) -> None:
    """The tiny model: batch mates and every scheduler against the CPU, then compiled
    against eager."""
    _, tiny = run.model(CHECK_MODEL)
    requests = [gpu_checks.request(scheduler=s) for s in gpu_checks.SCHEDULERS]
    reference = checks.reference(tiny, requests, "reference-tiny")
    base = gpu_checks.request(scheduler=SCHEDULER)
    checks.check("batch_independence_tiny", lambda: checks.independence(tiny, base))
    checks.check(
        "schedulers_vs_cpu",
        lambda: checks.against_cpu(tiny, reference, requests, list(gpu_checks.SCHEDULERS)),
    )
    checks.release()
    mode = run.work.torch_compile
    checks.check("compiled_vs_eager", lambda: gpu_checks.compiled_vs_eager(tiny, mode))
    free_device_memory()


def served_checks(run: Run, checks: Checks) -> None:
    """The served architecture at the workload's check size: batch mates, and against the
    CPU (whose reference runs beside the batch-mates check)."""
    work = run.work
    _, served = run.model(work.architecture)
    size, steps = work.check_size, work.check_steps
    base = gpu_checks.request(width=size, height=size, steps=steps, scheduler=SCHEDULER)
    reference = checks.reference(served, [base], "reference-served")
    checks.check("batch_independence_served_model", lambda: checks.independence(served, base))
    name = f"{work.architecture}_{size}x{size}_{steps}_steps"
    checks.check(
        "served_model_vs_cpu", lambda: checks.against_cpu(served, reference, [base], [name])
    )


def correctness_summary(checks: dict[str, Any]) -> dict[str, Any]:
    """Whether every judged image was within its tolerance, and whether any recompilation
    happened after the warm-up; None where the check did not run."""
    verdicts: list[bool] = []
    for check in checks.values():
        for entry in [
            *check.get("images", {}).values(),
            *check.get("compositions", {}).values(),
            *check.get("batches", {}).values(),
        ]:
            if "within_tolerance" in entry:
                verdicts.append(bool(entry["within_tolerance"]))
    compiled = checks.get("compiled_vs_eager", {})
    return {
        "checks_ok": sorted(n for n, c in checks.items() if c.get("status") == "ok"),
        "checks_failed": sorted(n for n, c in checks.items() if c.get("status") == "failed"),
        "images_judged": len(verdicts),
        "all_within_tolerance": all(verdicts) if verdicts else None,
        "no_recompilation_after_warm_up": (
            not compiled["recompiled_after_warm_up"]
            if "recompiled_after_warm_up" in compiled
            else None
        ),
        "graphs_compiled_by_warm_up": compiled.get("graphs_compiled_by_warm_up"),
        "cudagraph_skips": compiled.get("cudagraph_skips"),
    }


def serving(run: Run, record: dict[str, Any]) -> None:
    """Part 2: the served model under load (perf/gpu_serving.py); the end of
    tritonserver.log is copied beside the results."""
    work = run.work
    _, repository = run.model(work.architecture)
    plan = {
        "concurrencies": list(work.concurrencies),
        "level_requests": work.level_requests,
        "operating_requests": work.operating_requests,
    }
    record["plan"] = plan
    state_dir = run.workdir / "stack"
    try:
        gpu_serving.serve_and_sweep(
            repository, state_dir, served_requests(work), plan, record, run.save
        )
    finally:
        tail = gpu_serving.log_tail(state_dir, chars=4_000_000)
        if tail:
            (run.out_file.parent / f"{run.out_file.stem}-tritonserver.log").write_text(tail)


def summarise(seconds: list[float], peak: int | None) -> dict[str, Any]:
    """Images/s (one image per call), latency percentiles and peak memory of timed calls."""
    return {
        "images_per_s": len(seconds) / sum(seconds),
        **percentiles(seconds),
        "peak_memory_bytes": peak,
    }


def diffusers(run: Run, record: dict[str, Any]) -> None:
    """Part 3: (a) plain diffusers one request at a time, (b) at each batch size the batcher
    formed (every size up to max_batch_size if serving formed none)."""
    plain = run.plain()
    record["load_s"] = plain.load_s
    single = plain.one_at_a_time(run.work.one_at_a_time)
    record["one_at_a_time"] = summarise(single["seconds"], single["peak_memory_bytes"])
    print(f"diffusers one at a time: {record['one_at_a_time']}", flush=True)
    run.save()
    record["batched"] = {}
    for b in run.batch_sizes():
        result = plain.batch(b)
        median = statistics.median(result["seconds"])
        record["batched"][b] = {
            "seconds_per_call": median,
            "per_image": median / b,
            "calls": len(result["seconds"]),
            "peak_memory_bytes": result["peak_memory_bytes"],
        }
        print(f"diffusers batch {b}: {record['batched'][b]}", flush=True)
        run.save()


def unet_work(run: Run, record: dict[str, Any]) -> None:
    """Part 4: FLOPs and bytes per network call (perf/unet_work.py) at the served size."""
    from perf.unet_work import pipeline_work

    sizes = list(range(1, run.max_batch_size + 1))
    record.update(pipeline_work(run.plain().pipe, size=run.work.size, batch_sizes=sizes))
    record["steps"] = run.work.steps
    record["how"] = {
        "flops": "torch.utils.flop_counter.FlopCounterMode over one call",
        "operand_bytes": "bytes of every aten operation's tensor arguments and results, "
        "views excluded: unfused traffic with no cache reuse",
        "peak_activation_bytes": "torch.cuda.max_memory_allocated over the call, above "
        "what was allocated before it",
        "unet_rows": "2 per image (guided: unconditional and conditional)",
    }


def diffusers_compiled(run: Run, record: dict[str, Any]) -> None:
    """Part 5: (c) plain diffusers, its UNet under the served torch.compile mode, one
    request at a time."""
    result = run.plain().compiled_one_at_a_time(run.work.torch_compile, run.work.one_at_a_time)
    record.update({k: result[k] for k in ("mode", "first_call_s", "graphs_compiled")})
    record["one_at_a_time"] = summarise(result["seconds"], result["peak_memory_bytes"])
    print(f"compiled diffusers one at a time: {record['one_at_a_time']}", flush=True)


PART_BODIES: dict[str, Callable[[Run, dict[str, Any]], None]] = {
    "correctness": correctness,
    "serving": serving,
    "diffusers": diffusers,
    "unet_work": unet_work,
    "diffusers_compiled": diffusers_compiled,
}
RESULT_KEYS = {"serving": "triton"}  # the part's key in the results, where not its name


def ok(part: Any) -> dict[str, Any] | None:
    """A part's results if it ran to the end, else None."""
    return part if isinstance(part, dict) and part.get("status") == "ok" else None


def ratios(
    served: dict[str, Any] | None,
    plain: dict[str, Any] | None,
    compiled: dict[str, Any] | None = None,
) -> dict[str, float]:
    """The ratios the GPU run is judged by (TARGETS), from whichever parts have results."""
    out: dict[str, float] = {}
    levels = (served or {}).get("levels") or []
    single = (plain or {}).get("one_at_a_time")
    c1 = next((lv for lv in levels if lv["concurrency"] == 1), None)
    if levels and single:
        best = max(lv["images_per_s"] for lv in levels)
        out["throughput_vs_diffusers_one_at_a_time"] = best / single["images_per_s"]
    if c1 and single:
        out["batch1_p50_vs_diffusers_p50"] = c1["p50"] / single["p50"]
    # At each batch size the batcher formed: diffusers' seconds per image over the model's
    # (Triton's compute time for executions of that size, which excludes queueing and gRPC).
    batched = {int(b): v for b, v in ((plain or {}).get("batched") or {}).items()}
    for b, run in ((served or {}).get("batches_formed") or {}).items():
        if int(b) in batched:
            out[f"speed_vs_diffusers_batch{int(b)}"] = (
                batched[int(b)]["per_image"] / run["compute_s_per_image"]
            )
    if c1 and ok(compiled):
        out["batch1_p50_vs_compiled_diffusers_p50"] = (
            c1["p50"] / compiled["one_at_a_time"]["p50"]  # type: ignore[index]
        )
    return out


def meets_targets(values: dict[str, float]) -> dict[str, bool]:
    """Whether each ratio meets its target in TARGETS."""
    out = {}
    for name, value in values.items():
        key = "speed_vs_diffusers_batch" if name.startswith("speed_vs_diffusers_batch") else name
        op, target = TARGETS[key]
        out[name] = value >= target if op == ">=" else value <= target
    return out


def t4_projection_published(levels: list[dict[str, Any]], diffusers_seconds: float) -> dict:
    """Served figures scaled to a T4 by how much slower a T4 runs the plain batch-1 call.

    k = published T4 seconds per image / this GPU's plain diffusers seconds per image; the
    projection divides throughput by k and multiplies latencies by k. "At 70% load" is the
    lowest concurrency whose throughput reached 70% of the best. Optimistic where batching
    helped: a T4 runs out of arithmetic at smaller batches than a large GPU does.
    """
    k = T4_PUBLISHED_SECONDS_PER_IMAGE / diffusers_seconds
    best = max(lv["images_per_s"] for lv in levels)
    loaded = min(
        (lv for lv in levels if lv["images_per_s"] >= 0.7 * best),
        key=lambda lv: lv["concurrency"],
    )
    return {
        "kind": "PROJECTION, not a measurement",
        "basis": f"published T4 ~{T4_PUBLISHED_SECONDS_PER_IMAGE} s/image at 25 steps over "
        "this GPU's plain diffusers batch-1 time gives the slow-down k; served throughput "
        "/ k, served latency x k",
        "slowdown_k": k,
        "images_per_hour": best * 3600 / k,
        "load_concurrency": loaded["concurrency"],
        "p50_s": loaded["p50"] * k,
        "p99_s": loaded["p99"] * k,
    }


def update_derived(results: dict[str, Any], work: Workload) -> None:
    """Recompute the ratios, their verdicts and the T4 projections from the parts so far."""
    served, plain = results.get("triton"), ok(results.get("diffusers"))
    try:
        values = ratios(served, plain, results.get("diffusers_compiled"))
        results["ratios"] = values
        results["meets_targets"] = meets_targets(values)
        projections: dict[str, Any] = {}
        levels = (served or {}).get("levels")
        if levels and plain:
            projections["published_scaling"] = t4_projection_published(
                levels, plain["one_at_a_time"]["p50"]
            )
        if ok(results.get("unet_work")):
            projections["roofline"] = t4_projection.project(results["unet_work"], work.steps)
        results["t4_projection"] = projections
    except Exception as exc:  # a report, never a reason to lose the measurements
        results["derived_error"] = traceback.format_exc()
        print(f"derived figures failed: {exc!r}", file=sys.stderr, flush=True)


def run_part(run: Run, name: str) -> None:
    """One part, guarded, timed and saved; skipped when the budget has too little left."""
    key = RESULT_KEYS.get(name, name)
    record: dict[str, Any] = {"started_at_s": run.elapsed()}
    run.results[key] = record
    left = run.left_s()
    stamp = f"[{run.elapsed():6.1f} s {datetime.now(UTC):%H:%M:%S}]"
    if left is not None and left < max(PART_MIN_S[name], 1.0):
        record.update(
            status="skipped",
            reason=f"needs at least {PART_MIN_S[name]:.0f} s; {max(left, 0):.0f} s of the "
            f"{run.work.budget_s:.0f} s budget left",
        )
        print(f"{stamp} {name}: skipped ({record['reason']})", flush=True)
        run.save()
        return
    print(
        f"{stamp} {name}: start" + (f" ({left:.0f} s left)" if left is not None else ""), flush=True
    )
    try:
        run.timer.start_part(name, left)
        guarded(record, lambda: PART_BODIES[name](run, record))
    finally:
        run.timer.end_part(run.left_s())
    print(
        f"[{run.elapsed():6.1f} s] {name}: {record['status']} in {record['seconds']:.0f} s",
        flush=True,
    )
    run.save()


class BudgetTimer:
    """Ends the part that runs past its cap or the run's budget (SIGALRM raises OutOfTime in
    it); between parts the budget check of `run_part` skips what no longer fits. Without a
    budget it does nothing."""

    def __init__(self, budget_s: float | None) -> None:
        """Arm the timer for the whole budget, where there is one."""
        self.in_part = False
        self.fired = False  # in the current part (its error may be wrapped by a library)
        self.armed = budget_s is not None
        self.message = "the run's time budget is spent"
        if budget_s is not None:
            signal.signal(signal.SIGALRM, self._expired)
            signal.setitimer(signal.ITIMER_REAL, max(budget_s, 0.001))

    def _expired(self, signum: int, frame: Any) -> None:
        if self.in_part:
            self.fired = True
            raise OutOfTime(self.message)

    def start_part(self, name: str, left_s: float | None) -> None:
        """A part starts: the timer fires at its cap or the budget's end, whichever is first."""
        self.in_part, self.fired = True, False
        if not self.armed or left_s is None:
            return
        cap = PART_CAP_S[name]
        self.message = (
            f"{name} ran past its {cap:g} s cap"
            if cap < left_s
            else "the run's time budget is spent"
        )
        signal.setitimer(signal.ITIMER_REAL, max(min(cap, left_s), 0.001))

    def end_part(self, left_s: float | None) -> None:
        """The part ended: the timer fires at the budget's end again."""
        self.in_part = False
        if self.armed and left_s is not None:
            self.message = "the run's time budget is spent"
            signal.setitimer(signal.ITIMER_REAL, max(left_s, 0.001))

    def cancel(self) -> None:
        """Disarm the timer."""
        self.in_part = False
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)


def header(work: Workload, name: str, max_batch_size: int, parts: list[str]) -> dict:
    """What ran where: the results' first keys."""
    import importlib.metadata as metadata

    import torch

    versions: dict[str, str | None] = {}
    for package in (
        "torch",
        "diffusers",
        "transformers",
        "numpy",
        "protobuf",
        "tritonclient",
        "nvidia-pytriton",
        "triton",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "workload": name,
        "device": torch.cuda.get_device_name() if work.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "versions": versions,
        "python": sys.version.split()[0],
        "model": f"{work.architecture} architecture, random weights",
        "settings": {
            "steps": work.steps,
            "size": work.size,
            "scheduler": SCHEDULER,
            "guidance": GUIDANCE,
            "max_batch_size": max_batch_size,
            "max_queue_delay_us": MAX_QUEUE_DELAY_US,
            "torch_compile": work.torch_compile,
            "budget_s": work.budget_s,
        },
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "parts_asked": parts,
    }


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The lines printed at the end."""
    parts = {RESULT_KEYS.get(p, p) for p in PARTS}
    return {
        "device": results.get("device"),
        "elapsed_s": results.get("elapsed_s"),
        "status": {k: v.get("status") for k, v in results.items() if k in parts},
        "correctness": results.get("correctness", {}).get("summary"),
        "cold_start_s": results.get("triton", {}).get("cold_start_s"),
        "ratios": results.get("ratios"),
        "meets_targets": results.get("meets_targets"),
        "t4_images_per_hour": {
            k: v.get("images_per_hour") for k, v in (results.get("t4_projection") or {}).items()
        },
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/forge-gpu-bench"))
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="gpu")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}"
    )
    parser.add_argument("--budget-s", type=float, help="script time; default: the workload's")
    parser.add_argument(
        "--torch-compile", help="the model's torch_compile mode ('' = eager); default: workload's"
    )
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the asked parts in order; write <workload>-bench.json to --out as they end."""
    args = parse_args(argv)
    work = WORKLOADS[args.workload]
    if args.torch_compile is not None:
        work = replace(work, torch_compile=args.torch_compile)
    if args.budget_s is not None:
        work = replace(work, budget_s=args.budget_s)
    import torch

    if work.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU: this workload runs on the GPU machine", file=sys.stderr)
        return 2
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(work, args.workload, args.out, args.workdir, args.max_batch_size)
    run.results.update(header(work, args.workload, args.max_batch_size, args.parts))
    run.save()
    try:
        for name in PARTS:
            if name in args.parts:
                try:
                    run_part(run, name)
                except OutOfTime:  # fired between the part's end and the timer's reset
                    continue
    finally:
        run.timer.cancel()
        run.pool.shutdown(wait=False, cancel_futures=True)
        run.save()
    print(json.dumps(summary(run.results), indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
