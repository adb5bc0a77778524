"""Correctness of the model's device path before anything is timed (perf/gpu_bench.py).

Each check runs the model's pipeline core in this process (perf/pipeline_core.py) on the
device torch sees (CUDA: runtime `torch` in fp16) and reports how far its images are from a
reference, in 8-bit levels:
  - against the same core on the CPU in fp32, run in a subprocess that sees no GPU
    (`python -m perf.gpu_checks reference ...`, CUDA_VISIBLE_DEVICES empty);
  - a row alone against the same row in batches of other compositions (batch independence);
  - the UNet under torch.compile (`reduce-overhead`: CUDA graphs) against eager, with
    torch._dynamo's error_on_recompile set after the warm-up, under a mix of batch sizes.

Tolerance, stated rather than asserted (the numbers are reported either way): fp16 keeps 11
significant bits against fp32's 24, and CUDA's kernels (cuBLAS, cuDNN, fused attention)
accumulate in another order than the CPU's, so the difference grows over the denoising steps
and a few pixels near a rounding edge or in a high-gain region of a random-weight model can
move many levels. An image is judged by its mean difference and PSNR, not by its largest one:
within tolerance when the mean is at most MEAN_LEVELS and the PSNR at least MIN_PSNR_DB
(fp16 against fp32); on one device and dtype (batch mates, compiled against eager) the
bounds are SAME_DEVICE_MEAN_LEVELS and SAME_DEVICE_MIN_PSNR_DB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from perf.pipeline_core import generation_request, load_core  # noqa: E402

MEAN_LEVELS, MIN_PSNR_DB = 2.0, 30.0  # fp16 on the device against fp32 on the CPU
SAME_DEVICE_MEAN_LEVELS, SAME_DEVICE_MIN_PSNR_DB = 0.5, 40.0
SCHEDULERS = ("ddim", "euler", "euler_ancestral", "dpmpp_2m", "lcm", "pndm")
# The checks' cores: eager torch, every scheduler offered (lcm takes at most 50 steps).
EAGER = {
    "runtime": "torch",
    "torch_compile": "",
    "schedulers": ",".join(SCHEDULERS),
    "max_steps": "50",
}
PROMPT = "a frost-forged legendary axe"

Request = dict[str, Any]  # GenerationRequest fields


def request(**overrides: Any) -> Request:
    """A guided request of the checks, as GenerationRequest fields."""
    fields: Request = dict(
        prompt=PROMPT,
        negative_prompt="blurry",
        seed=42,
        steps=6,
        guidance_scale=7.5,
        width=128,
        height=144,
        scheduler="euler_ancestral",
    )
    return {**fields, **overrides}


def compare(ours: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """How far two uint8 images are apart: largest and mean difference in 8-bit levels, the
    share of pixels with any channel differing, and the PSNR (None where identical)."""
    diff = np.abs(ours.astype(np.int32) - reference.astype(np.int32))
    mse = float((diff.astype(np.float64) ** 2).mean())
    return {
        "max_levels": int(diff.max()),
        "mean_levels": float(diff.mean()),
        "share_of_pixels_differing": float((diff.max(axis=-1) > 0).mean()),
        "psnr_db": None if mse == 0 else 10 * math.log10(255.0**2 / mse),
        "identical": mse == 0,
    }


def judged(stats: dict[str, Any], *, same_device: bool) -> dict[str, Any]:
    """`stats` with the tolerance it is judged by and whether it holds."""
    mean_bound, psnr_bound = (
        (SAME_DEVICE_MEAN_LEVELS, SAME_DEVICE_MIN_PSNR_DB)
        if same_device
        else (MEAN_LEVELS, MIN_PSNR_DB)
    )
    psnr = stats["psnr_db"]
    within = stats["mean_levels"] <= mean_bound and (psnr is None or psnr >= psnr_bound)
    return {**stats, "within_tolerance": within}


def tolerance(*, same_device: bool) -> str:
    """The stated tolerance, in words, for the results."""
    if same_device:
        return (
            f"mean <= {SAME_DEVICE_MEAN_LEVELS} levels and PSNR >= {SAME_DEVICE_MIN_PSNR_DB} "
            "dB (one device and dtype; kernels differ by batch shape and by fusion)"
        )
    return (
        f"mean <= {MEAN_LEVELS} levels and PSNR >= {MIN_PSNR_DB} dB (fp16 against fp32, "
        "other kernels and accumulation order; the largest difference is reported, not judged)"
    )


def generate_each(core: Any, requests: Sequence[Request]) -> list[np.ndarray]:
    """One image per request, each generated alone."""
    images = []
    for fields in requests:
        (image,) = core.generate([core.row(generation_request(**fields))])
        images.append(image)
    return images


class CpuReference:
    """The same core on the CPU in fp32, in a subprocess that sees no GPU, started now and
    collected with `images()`; it runs beside the device checks."""

    def __init__(self, repository: Path, requests: Sequence[Request], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.requests_file = workdir / "requests.json"
        self.out = workdir / "images.npz"
        self.log = workdir / "reference.log"
        self.requests_file.write_text(json.dumps(list(requests)))
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        argv = [sys.executable, "-m", "perf.gpu_checks", "reference"]
        argv += [f"--repository={repository}", f"--requests={self.requests_file}"]
        argv += [f"--out={self.out}"]
        self.started = time.perf_counter()
        with self.log.open("w") as log:
            self.process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=log)

    def images(self, timeout: float = 240) -> tuple[list[np.ndarray], float]:
        """The reference images, in request order, and the seconds the subprocess took; the
        subprocess is killed if it takes longer than `timeout` seconds from now."""
        try:
            code = self.process.wait(timeout)
        except BaseException:
            self.process.kill()
            raise
        seconds = time.perf_counter() - self.started
        if code != 0:
            tail = self.log.read_text()[-3000:]
            raise RuntimeError(f"the CPU reference exited with {code}:\n{tail}")
        with np.load(self.out) as data:
            return [data[f"image{i}"] for i in range(len(data.files))], seconds


def against_reference(
    ours: Sequence[np.ndarray], reference: Sequence[np.ndarray], names: Sequence[str]
) -> dict[str, Any]:
    """Per image, the device image against the CPU fp32 one, judged."""
    return {
        name: judged(compare(a, b), same_device=False)
        for name, a, b in zip(names, ours, reference, strict=True)
    }


def batch_mates(base: Request, count: int) -> list[Request]:
    """`count` other rows that share the base's group (scheduler, steps, size), every other
    one unguided (guidance 1.0: no unconditional pass), with other prompts and seeds."""
    return [
        {
            **base,
            "prompt": f"a rusty sword, variant {i}",
            "seed": 1000 + i,
            "guidance_scale": 1.0 if i % 2 else base["guidance_scale"],
        }
        for i in range(count)
    ]


def batch_independence(core: Any, base: Request, max_batch_size: int) -> dict[str, Any]:
    """The base row alone against the same row in batches of other compositions, on the
    core's device: each composition's difference, judged on one device."""
    mates = batch_mates(base, max_batch_size - 1)
    wide = [*mates[:3], base, *mates[3:]]
    compositions = {
        "with_a_guided_mate": [base, mates[0]],
        "after_an_unguided_mate": [mates[1], base],
        "beside_itself": [base, base],
        f"in_a_batch_of_{len(wide)}_mixed": wide,
    }
    (alone,) = core.generate([core.row(generation_request(**base))])
    out: dict[str, Any] = {"tolerance": tolerance(same_device=True), "compositions": {}}
    for name, rows in compositions.items():
        images = core.generate([core.row(generation_request(**fields)) for fields in rows])
        position = rows.index(base)
        guided = sum(1 for fields in rows if fields["guidance_scale"] > 1.0)
        out["compositions"][name] = {
            "rows": len(rows),
            "unet_batch": guided + len(rows),
            **judged(compare(images[position], alone), same_device=True),
        }
    return out


def compile_mixes(default_size: int, max_batch_size: int) -> dict[str, list[Request]]:
    """Batches after the warm-up (which saw 1..max_batch_size guided rows at the default
    size): guided, unguided and mixed rows, and a size the warm-up never saw."""
    guided = request(steps=3, width=default_size, height=default_size, scheduler="dpmpp_2m")
    unguided = {**guided, "guidance_scale": 1.0}
    other = max(64, default_size // 2)
    mixed = [
        {**(unguided if i % 3 == 2 else guided), "seed": 50 + i} for i in range(max_batch_size)
    ]
    return {
        "1_guided": [guided],
        "3_guided": [{**guided, "seed": 7 + i} for i in range(3)],
        f"{max_batch_size}_mixed_guided_and_unguided": mixed,
        "1_unguided": [unguided],
        f"2_guided_at_{other}x{other}": [
            {**guided, "width": other, "height": other, "seed": 9 + i} for i in range(2)
        ],
    }


def compiled_vs_eager(repository: Path, mode: str) -> dict[str, Any]:
    """The UNet under torch.compile(`mode`) against eager on this device: the warm-up's time
    and the graphs it compiled (one: a second means a recompilation inside the warm-up, a
    guard on a shape it saw), then a mix of batches with error_on_recompile set (a
    recompilation is recorded, not raised), each row against eager, and the CUDA-graph skips
    inductor counted."""
    import torch
    from torch._dynamo.exc import RecompileError
    from torch._dynamo.utils import counters

    eager = load_core(repository, **EAGER)
    compiled = load_core(repository, **{**EAGER, "torch_compile": mode})
    skips_before = counters["inductor"]["cudagraph_skips"]
    graphs_before = counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    compiled.warm_up()
    graphs_warm = counters["stats"]["unique_graphs"]
    out: dict[str, Any] = {
        "mode": mode,
        "device": str(compiled.device),
        "warm_up_s": time.perf_counter() - start,
        "graphs_compiled_by_warm_up": graphs_warm - graphs_before,
        "tolerance": tolerance(same_device=True),
        "batches": {},
    }
    mixes = compile_mixes(compiled.contract.default_size, compiled.contract.max_batch_size)
    for name, rows in mixes.items():
        entry: dict[str, Any] = {"rows": len(rows)}
        out["batches"][name] = entry
        try:
            with torch._dynamo.config.patch(error_on_recompile=True):
                ours = compiled.generate([compiled.row(generation_request(**r)) for r in rows])
            entry["recompiled"] = False
        except RecompileError as exc:
            entry.update(recompiled=True, error=str(exc)[:2000])
            continue
        theirs = eager.generate([eager.row(generation_request(**r)) for r in rows])
        worst = max(
            (compare(a, b) for a, b in zip(ours, theirs, strict=True)),
            key=lambda s: s["mean_levels"],
        )
        entry.update(judged(worst, same_device=True), compared="the row farthest from eager")
    out["recompiled_after_warm_up"] = any(b["recompiled"] for b in out["batches"].values())
    out["graphs_compiled_after_warm_up"] = counters["stats"]["unique_graphs"] - graphs_warm
    out["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips_before
    return out


def reference_main(argv: Sequence[str]) -> int:
    """`reference`: each request's image from the core on this process's device (the CPU
    when started with CUDA_VISIBLE_DEVICES empty), saved as image<i> in an .npz file."""
    parser = argparse.ArgumentParser(prog="python -m perf.gpu_checks reference")
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--requests", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    core = load_core(args.repository, **EAGER)
    print(f"reference on {core.device}", flush=True)
    images = generate_each(core, json.loads(args.requests.read_text()))
    np.savez(args.out, **{f"image{i}": image for i, image in enumerate(images)})
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["reference"]:
        sys.exit("usage: python -m perf.gpu_checks reference --repository R --requests F --out F")
    raise SystemExit(reference_main(sys.argv[2:]))
