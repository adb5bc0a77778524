"""Plain diffusers, what a team would otherwise deploy: the baseline of perf/gpu_bench.py.

diffusers' own StableDiffusionPipeline (fp16 on CUDA, SDPA attention, DPM-Solver++ 2M as the
served model's `dpmpp_2m`), the same prompts, steps, size and guidance as the served requests,
one call per batch. Each timed call is bracketed by CUDA synchronisation; the peak memory of a
call is torch.cuda.max_memory_allocated after resetting it (None on a CPU).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

PROMPT = "a frost-forged legendary axe, game item icon, runes, studio light"
NEGATIVE = "blurry, low quality"
GUIDANCE = 7.5


class PlainDiffusers:
    """diffusers' StableDiffusionPipeline on `device`, fp16 on CUDA, fp32 on a CPU."""

    def __init__(self, model: Path, device: str, *, size: int, steps: int) -> None:
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        start = time.perf_counter()
        self.device = torch.device(device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.pipe = StableDiffusionPipeline.from_pretrained(
            model, dtype=dtype, safety_checker=None, requires_safety_checker=False
        ).to(self.device)
        self.pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            self.pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.eager_unet = self.pipe.unet
        self.size, self.steps = size, steps
        self.load_s = time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def call(self, n: int, seed: int) -> tuple[float, int | None]:
        """One pipeline call making `n` images: its seconds and peak memory in bytes."""
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        self.pipe(
            [PROMPT] * n,
            negative_prompt=[NEGATIVE] * n,
            num_inference_steps=self.steps,
            guidance_scale=GUIDANCE,
            width=self.size,
            height=self.size,
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)],
            output_type="np",
        )
        self._sync()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return seconds, peak

    def one_at_a_time(self, calls: int) -> dict[str, Any]:
        """(a): one image per call after one warm-up call; every call's seconds."""
        self.call(1, 0)
        timed = [self.call(1, 1 + i) for i in range(calls)]
        return {
            "seconds": [s for s, _ in timed],
            "peak_memory_bytes": max((p for _, p in timed if p is not None), default=None),
        }

    def batch(self, n: int, calls: int = 2) -> dict[str, Any]:
        """(b): `n` images per call after one warm-up call of that size; every call's seconds
        and the largest peak memory."""
        self.call(n, 0)
        timed = [self.call(n, 100 + i) for i in range(calls)]
        return {
            "seconds": [s for s, _ in timed],
            "peak_memory_bytes": max((p for _, p in timed if p is not None), default=None),
        }

    def compiled_one_at_a_time(self, mode: str, calls: int) -> dict[str, Any]:
        """(c): the pipeline's UNet under torch.compile(`mode`), one image per call. The first
        call compiles (and records the CUDA graphs of `reduce-overhead`): its seconds are the
        compilation's; then as `one_at_a_time`. The eager UNet is put back afterwards."""
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        self.pipe.unet = torch.compile(self.eager_unet, mode=mode)
        try:
            first, _ = self.call(1, 0)
            result = self.one_at_a_time(calls)
        finally:
            self.pipe.unet = self.eager_unet
        return {
            "mode": mode,
            "first_call_s": first,
            "graphs_compiled": counters["stats"]["unique_graphs"] - graphs,
            **result,
        }
