"""`make bench-styles`: what studio styles (LoRAs) cost the in-process pipeline, per runtime.

One run, one machine, the tiny model, each runtime that runs on a CPU (torch: PEFT adapters;
onnxruntime: merged weights fed as initializer overrides), one fresh pipeline core each:
  - memory: the style tensors the library holds (`StyleLibrary.resident_bytes`), what the
    runtime holds for them (torch: the adapters' parameters; onnxruntime: the merged
    override weights of the active style) and the process's growth (RSS after a collection
    and malloc_trim; tracemalloc, which sees numpy's arrays but not torch's or ONNX Runtime's
    own allocations) with no style, then 1 and 2 styles resident, then 2 resident and none
    active;
  - switch cost: batches of one shape (rows, prompts, steps, size) with no style, with style A
    batch after batch, and alternating A, B, A, B, in rounds of interleaved calls (the order
    rotates, as in perf/rounds.py), so that drift weighs on all three alike: per-batch medians,
    and per round the alternating median minus the same-style median (the switch cost) and
    the same-style median minus the no-style median (what running a style costs);
  - first use: a batch with a style that is not resident (load + merge), once per style
    never used before in this core, each paired with a same-style batch run right after it.
Each batch also records the seconds spent in `StyleLibrary.activate` (loading, merging,
switching), timed by wrapping that method of the core's library: the switch itself, without
the batch's noise around it.

The styles are made as the tests make them: seeded random LoRAs (export/tiny_lora.py) for the
published base model, one in the diffusers/PEFT layout and one in kohya's, so both import
paths run; they are published with `python -m export style add` into a copy of the model
repository (the repository itself is left as it was). Writes
perf/results/cpu-tiny-styles.json.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from perf import pipeline_core, rounds, workload
from perf.launch import command

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "model_repository"
RESULTS = ROOT / "perf" / "results"
RUNTIMES = ("torch", "onnxruntime")
PAIRS = 4  # interleaved calls of each kind per round
TIMED_BATCHES = 2  # timed batches per call, after one untimed batch that sets the style
CONDITIONS = ("none", "same", "alternating")
# torch's CPU threads during each runtime's measurement (0 keeps torch's default, one per core,
# which the model leaves as it is): the torch runtime's networks, and on both runtimes the torch
# work around them (schedulers; onnxruntime's merge of a style's B @ A). On a shared 2-core VM
# with other work running, two OpenMP threads wait on each other for a core: identical batches
# then take several times as long as with one thread, and vary as much from one to the next.
TORCH_THREADS = 1

# name -> (layout, seed): A and B alternate; the cold ones are each used once per runtime.
STYLES = {
    "studio-a": ("peft", 101),
    "studio-b": ("kohya", 102),
    "cold-1": ("peft", 103),
    "cold-2": ("kohya", 104),
    "cold-3": ("peft", 105),
}
PAIR = ("studio-a", "studio-b")
COLD = ("cold-1", "cold-2", "cold-3")

# Run as `python -c` (perf imports nothing of export): the published base model's UNet and
# text encoder, and one seeded LoRA per argument `name:layout:seed` in the folder argv[2].
MAKE_LORAS = """
import sys
from pathlib import Path
from types import SimpleNamespace

from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from export.tiny_lora import write_test_loras

source, out = Path(sys.argv[1]), Path(sys.argv[2])
pipe = SimpleNamespace(
    unet=UNet2DConditionModel.from_pretrained(source / "unet"),
    text_encoder=CLIPTextModel.from_pretrained(source / "text_encoder"),
)
for spec in sys.argv[3:]:
    name, layout, seed = spec.split(":")
    print(write_test_loras(pipe, out / name, seed=int(seed))[layout])
"""


@dataclass(frozen=True)
class Shape:
    """The batch every measurement runs: `rows` rows of the benchmarks' request (one prompt
    set), `steps` steps."""

    rows: int = 2
    steps: int = 10

    def requests(self, style: str | None) -> list[dict[str, Any]]:
        """The rows' GenerationRequest fields, with `style` (None: no style)."""
        return [
            {**workload.REQUEST, "steps": self.steps, "seed": 7 + i, "style": style}
            for i in range(self.rows)
        ]


class ActivationClock:
    """Wraps the core's `StyleLibrary.activate` (on this instance only) and keeps the
    seconds each call took, so a batch's style work is timed apart from its denoising."""

    def __init__(self, core: Any) -> None:
        self.library = core.styles
        self.original = core.styles.activate
        self.seconds: list[float] = []
        self.library.activate = self._timed

    def _timed(self, style: Any, weight: float) -> None:
        start = time.perf_counter()
        try:
            self.original(style, weight)
        finally:
            self.seconds.append(time.perf_counter() - start)

    def take(self) -> float:
        """Seconds spent in activate since the last take."""
        spent = sum(self.seconds)
        self.seconds.clear()
        return spent


class Runner:
    """One core, its activation clock, and the batch it runs."""

    def __init__(self, core: Any, shape: Shape) -> None:
        self.core, self.shape = core, shape
        self.clock = ActivationClock(core)
        _, self.sd_requests = pipeline_core.import_pipeline_core()

    def batch(self, style: str | None) -> tuple[float, float]:
        """Run one batch with `style`: (its seconds, the seconds of it spent in activate).
        Rows are made before the clock starts (finding a style reads its folder)."""
        rows = [
            self.core.row(self.sd_requests.GenerationRequest(**fields))
            for fields in self.shape.requests(style)
        ]
        self.clock.take()
        seconds = rounds.timed(lambda: self.core.generate(rows))
        return seconds, self.clock.take()


def ms(seconds: float) -> float:
    """Seconds as milliseconds, to the microsecond."""
    return round(seconds * 1000, 3)


def median_ms(values: Sequence[float]) -> float:
    """The median of `values` (seconds), in milliseconds."""
    return ms(statistics.median(values))


def process_memory() -> int:
    """This process's RSS in bytes, after a collection and (glibc) giving freed heap back."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS as it is
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(psutil.Process().memory_info().rss)


def runtime_held_bytes(core: Any) -> dict[str, int]:
    """What the runtime holds for styles beyond the library's tensors: torch's adapter
    parameters in the UNet and text encoder; onnxruntime's merged override weights."""
    held: dict[str, int] = {}
    for name in ("unet", "text_encoder"):
        component = core.components[name]
        module = getattr(component, "module", None)
        if module is not None:  # torch: PEFT's lora_A / lora_B layers
            held[f"{name}_adapter_parameters"] = sum(
                p.numel() * p.element_size()
                for key, p in module.named_parameters()
                if ".lora_A." in key or ".lora_B." in key
            )
        overrides = getattr(component, "overrides", None)
        if overrides is not None:  # onnxruntime: the active style's merged weights
            held[f"{name}_override_weights"] = sum(a.nbytes for a in overrides.values())
    return held


def memory(runner: Runner, styles: tuple[str, str]) -> dict[str, Any]:
    """Memory with no style, 1 and 2 styles resident (each made active by a batch), and 2
    resident with none active; growth against the first. Needs a core where no style was
    used yet. One sample per state; also the first styled batch's time (on onnxruntime it
    makes the session whose weights a run may override)."""
    a, b = styles
    for _ in range(2):  # warm: the first batches of a core pay lazy initialisation
        runner.batch(None)
    tracemalloc.start()
    try:
        states: list[dict[str, Any]] = []
        first_styled: dict[str, float] = {}
        for state, style in (
            ("no style", None),
            ("1 style resident, active", a),
            ("2 styles resident, the second active", b),
            ("2 styles resident, none active", None),
        ):
            seconds, activate = runner.batch(style)
            if style == a:
                first_styled = {"samples": 1, "batch_ms": ms(seconds), "activate_ms": ms(activate)}
            rss = process_memory()
            traced, _ = tracemalloc.get_traced_memory()
            states.append(
                {
                    "state": state,
                    "resident_styles": len(runner.core.styles.resident),
                    "resident_bytes": runner.core.styles.resident_bytes(),
                    "runtime_held_bytes": runtime_held_bytes(runner.core),
                    "rss_bytes": rss,
                    "traced_bytes": traced,
                }
            )
    finally:
        tracemalloc.stop()
    for s in states:
        s["rss_growth_bytes"] = s["rss_bytes"] - states[0]["rss_bytes"]
        s["traced_growth_bytes"] = s["traced_bytes"] - states[0]["traced_bytes"]
    return {"samples_per_state": 1, "states": states, "first_styled_batch": first_styled}


def switching(
    runner: Runner,
    styles: tuple[str, str],
    *,
    rounds_count: int = rounds.ROUNDS,
    pairs: int = PAIRS,
    timed_batches: int = TIMED_BATCHES,
) -> dict[str, Any]:
    """Rounds of interleaved calls of the three kinds (their order rotates call by call).
    A call is one untimed batch that sets its starting style, then `timed_batches` timed
    ones: no style; style A each time; B, A, B, ... (every timed batch a switch). Both
    styles must be resident already (`memory` made them so)."""
    a, b = styles
    calls: dict[str, tuple[str | None, list[str | None]]] = {
        "none": (None, [None] * timed_batches),
        "same": (a, [a] * timed_batches),
        "alternating": (a, [b if i % 2 == 0 else a for i in range(timed_batches)]),
    }

    def call(kind: str) -> list[tuple[float, float]]:
        first, timed = calls[kind]
        runner.batch(first)
        return [runner.batch(style) for style in timed]

    for kind in CONDITIONS:  # warm-up, untimed
        call(kind)
    per_round: list[dict[str, list[tuple[float, float]]]] = []
    for r in range(rounds_count):
        samples: dict[str, list[tuple[float, float]]] = {kind: [] for kind in CONDITIONS}
        for i in range(pairs):
            shift = (r * pairs + i) % len(CONDITIONS)
            for kind in CONDITIONS[shift:] + CONDITIONS[:shift]:
                samples[kind].extend(call(kind))
        per_round.append(samples)

    def p50(samples: list[tuple[float, float]], part: int = 0) -> float:
        return statistics.median(s[part] for s in samples)

    def compare(baseline: str, served: str) -> dict[str, Any]:
        return rounds.summary([rounds.Round(p50(s[baseline]), p50(s[served])) for s in per_round])

    every = {kind: [x for s in per_round for x in s[kind]] for kind in CONDITIONS}
    switch = compare("same", "alternating")
    styled = compare("none", "same")
    return {
        "rounds": rounds_count,
        "pairs_per_round": pairs,
        "timed_batches_per_call": timed_batches,
        "samples_per_condition": {kind: len(every[kind]) for kind in CONDITIONS},
        "batch_p50_ms": {
            kind: ms(statistics.median(p50(s[kind]) for s in per_round)) for kind in CONDITIONS
        },
        "activate_p50_ms": {kind: median_ms([x[1] for x in every[kind]]) for kind in CONDITIONS},
        "switch_cost_ms_median": switch["added_ms_median"],
        "style_cost_ms_median": styled["added_ms_median"],
        "alternating_over_same": switch,
        "same_over_none": styled,
    }


def first_use(runner: Runner, cold: Sequence[str], resident: str) -> dict[str, Any]:
    """One batch with each of `cold` (styles this core never used: not resident), right
    after a batch with no style, paired with a same-style batch of `resident` run just after
    it (after one untimed batch that makes `resident` active): the first use's time, the
    time spent loading and merging, and what the batch took over its same-style pair."""
    batches: list[float] = []
    activations: list[float] = []
    added: list[float] = []
    for style in cold:
        assert runner.core.styles.find(style).key not in runner.core.styles.resident
        runner.batch(None)
        seconds, activate = runner.batch(style)
        runner.batch(resident)
        same, _ = runner.batch(resident)
        batches.append(seconds)
        activations.append(activate)
        added.append(seconds - same)
    return {
        "samples": len(batches),
        "batch_ms": [ms(s) for s in batches],
        "batch_p50_ms": median_ms(batches),
        "activate_ms": [ms(s) for s in activations],
        "activate_p50_ms": median_ms(activations),
        "added_over_same_ms": [ms(s) for s in added],
        "added_over_same_p50_ms": median_ms(added),
    }


def measure_runtime(
    core: Any,
    shape: Shape,
    *,
    pair: tuple[str, str] = PAIR,
    cold: Sequence[str] = COLD,
    rounds_count: int = rounds.ROUNDS,
    pairs: int = PAIRS,
    timed_batches: int = TIMED_BATCHES,
) -> dict[str, Any]:
    """Memory, switch cost and first use on one fresh core (no style used yet)."""
    runner = Runner(core, shape)
    started = time.perf_counter()
    mem = memory(runner, pair)
    switch = switching(
        runner, pair, rounds_count=rounds_count, pairs=pairs, timed_batches=timed_batches
    )
    first = first_use(runner, cold, pair[0])
    return {
        "memory": mem,
        "switch": switch,
        "first_use": first,
        "seconds": round(time.perf_counter() - started, 1),
    }


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[int]:
    """torch's intra-op threads set to `threads` (0: left as they are), restored after;
    yields the number in use."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def publish_styles(repository: Path, work: Path) -> dict[str, Any]:
    """Make the LoRAs of STYLES (export/tiny_lora.py) and publish each with `python -m
    export style add` in `repository`; each style's manifest."""
    weights = pipeline_core.weights_dir(repository)
    source = weights / json.loads((weights / "manifest.json").read_text())["diffusers"]
    specs = [f"{name}:{layout}:{seed}" for name, (layout, seed) in STYLES.items()]
    made = subprocess.run(
        [sys.executable, "-c", MAKE_LORAS, str(source), str(work / "loras"), *specs],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    files = dict(zip(STYLES, made.stdout.split(), strict=True))
    manifests = {}
    for name, file in files.items():
        out = command(
            "export", "style", "add", f"--repository={repository}", f"--name={name}",
            f"--file={file}",
        )  # fmt: skip
        manifest = json.loads(out)
        manifests[name] = {
            **{k: manifest[k] for k in ("version", "source_format", "rank", "modules")},
            "lora_file_bytes": Path(file).stat().st_size,
        }
    return manifests


def versions() -> dict[str, str]:
    """Python's and the measured libraries' versions."""
    found = {"python": platform.python_version()}
    for name in ("torch", "onnxruntime", "diffusers", "transformers", "peft", "numpy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def machine() -> dict[str, Any]:
    """The machine, in words and numbers."""
    import torch

    return {
        "description": f"{platform.node()} {platform.processor() or platform.machine()}, CPU only",
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads_default": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def measure(work: Path, shape: Shape, threads: int = TORCH_THREADS) -> dict[str, Any]:
    """Copy the repository, publish the styles, measure each runtime on a fresh core, with
    torch's CPU threads set to `threads`."""
    started = time.perf_counter()
    repository = work / "model_repository"
    shutil.copytree(REPOSITORY, repository, symlinks=True)
    shutil.rmtree(repository / pipeline_core.MODEL / "styles", ignore_errors=True)
    report: dict[str, Any] = {
        "benchmark": "make bench-styles (perf/bench_styles.py)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "batch": {**shape.requests("studio-a")[0], "rows": shape.rows, "seed": "7 + row"},
        "styles": publish_styles(repository, work),
        "pair": list(PAIR),
        "cold": list(COLD),
        "runtimes": {},
    }
    report["batch"].pop("style")
    for runtime in RUNTIMES:
        core = pipeline_core.load_core(repository, runtime=runtime)
        with torch_threads(threads) as used:
            report["runtimes"][runtime] = measure_runtime(core, shape)
        report["runtimes"][runtime]["torch_threads"] = used
        del core
        gc.collect()
        print(f"{runtime}: {report['runtimes'][runtime]['seconds']} s", file=sys.stderr)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def show(report: dict[str, Any], out: Callable[[str], None] = print) -> None:
    """The figures, one runtime a block."""
    for runtime, figures in report["runtimes"].items():
        switch, first = figures["switch"], figures["first_use"]
        p50 = switch["batch_p50_ms"]
        spread = switch["alternating_over_same"]
        out(f"{runtime}:")
        out(
            f"  batch p50 (ms): none {p50['none']}, same style {p50['same']}, "
            f"alternating {p50['alternating']} ({switch['samples_per_condition']['same']} "
            f"batches each, {switch['rounds']} rounds)"
        )
        out(
            f"  switch cost {switch['switch_cost_ms_median']} ms (alternating/same "
            f"{spread['ratio_median']}, rounds {spread['ratio_min']}..{spread['ratio_max']}); "
            f"style vs none {switch['style_cost_ms_median']} ms; activate p50 (ms) "
            f"{switch['activate_p50_ms']}"
        )
        out(
            f"  first use: batch p50 {first['batch_p50_ms']} ms "
            f"({first['added_over_same_p50_ms']:+} ms over same style), load + merge p50 "
            f"{first['activate_p50_ms']} ms ({first['samples']} styles)"
        )
        for state in figures["memory"]["states"]:
            out(
                f"  {state['state']}: resident {state['resident_bytes']} B, runtime holds "
                f"{state['runtime_held_bytes']}, RSS {state['rss_growth_bytes']:+} B, "
                f"traced {state['traced_growth_bytes']:+} B"
            )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, write perf/results/cpu-tiny-styles.json, print the figures."""
    parser = argparse.ArgumentParser(prog="python -m perf.bench_styles", description=__doc__)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=TORCH_THREADS,
        help=f"torch's CPU threads while measuring (default {TORCH_THREADS}; 0: torch's own "
        "default, one per core)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="forge-bench-styles-") as work:
        report = measure(Path(work), Shape(), args.torch_threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu-tiny-styles.json").write_text(json.dumps(report, indent=2) + "\n")
    show(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
