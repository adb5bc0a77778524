"""One image request as it arrives, as it is resolved, and as a row ready to denoise; and the
schedulers the core supports.

No Triton import here: the Triton adapter (`model.py`) and the tests build these directly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
)
from sd_img2img import first_timestep

# diffusers schedulers share no typed base with set_timesteps/step/scale_model_input.
Scheduler = Any

# What the core supports: name -> factory from the model's scheduler config. The model
# config's `schedulers` parameter offers these or fewer. The diffusers schedulers are used as
# they are, so an image matches the diffusers pipeline with the same scheduler and seed.
SCHEDULERS: dict[str, Callable[[dict[str, Any]], Scheduler]] = {
    "ddim": DDIMScheduler.from_config,
    "euler": EulerDiscreteScheduler.from_config,
    "euler_ancestral": EulerAncestralDiscreteScheduler.from_config,
    "dpmpp_2m": lambda c: DPMSolverMultistepScheduler.from_config(
        c, algorithm_type="dpmsolver++", solver_order=2
    ),
    "lcm": LCMScheduler.from_config,
    "pndm": PNDMScheduler.from_config,
}


# Called after each denoising step of a row with (steps done, steps in all, latents): the
# scheduler's estimate of the finished latents where it gives one (`pred_original_sample`),
# else the latents the step left. A live preview decodes them; the images do not depend on it,
# and an observer must not raise (it would fail the whole batch).
StepObserver = Callable[[int, int, torch.Tensor], None]


class InvalidRequest(ValueError):
    """A request the client must change; the message names the bad value."""


# Rows with the same key can share every UNet call: scheduler, steps, height, width, whether
# they start from an input image, its strength (None without an image), and the style with
# its weight (None and 0 without one).
GroupKey = tuple[str, int, int, int, bool, float | None, str | None, float]


@dataclass(frozen=True)
class GenerationRequest:
    """One image as a client asks for it. None means not given: the core fills it from the
    generation contract (and draws a missing seed), as diffusers' pipeline fills its own.

    `image` (HxWx3 uint8 RGB) makes it image to image: the image's size is the output's, and
    `strength` (the contract's default_strength when None) says how much of it to repaint.
    `style` names a published studio style (a LoRA), applied at `style_weight` (the
    contract's default_style_weight when None).
    """

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    # Out of == and hash (an array has neither) and of repr (megabytes of pixels).
    image: np.ndarray | None = field(default=None, compare=False, repr=False)
    strength: float | None = None
    style: str | None = None
    style_weight: float | None = None


@dataclass(frozen=True)
class ResolvedRequest:
    """Every value of one image, given or filled in, checked against the contract.

    `guided`: classifier-free guidance, i.e. guidance_scale above the contract's
    unguided_at_most; an unguided row skips the unconditional UNet pass. `image` and
    `strength`: the input image (height x width x 3) and its strength, for image to image;
    both None otherwise. `style` and `style_weight`: the studio style and its weight; None
    and 0 without one (a weight of 0 is no style).
    """

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    guided: bool
    image: np.ndarray | None = field(default=None, compare=False, repr=False)
    strength: float | None = None
    style: str | None = None
    style_weight: float = 0.0

    @property
    def group_key(self) -> GroupKey:
        """Rows with the same key can share every UNet call: they walk the same timesteps
        from latents of one shape, through networks with the same style at the same weight."""
        has_image = self.image is not None
        return (
            self.scheduler,
            self.steps,
            self.height,
            self.width,
            has_image,
            self.strength,
            self.style,
            self.style_weight,
        )

    @property
    def unet_pixels(self) -> int:
        """What this row costs a UNet call, against the model's max_batch_pixels: width x
        height, twice when guided (the UNet sees the row with and without the prompt)."""
        return (2 if self.guided else 1) * self.width * self.height

    def describe_group(self) -> str:
        """The group in words, for messages: `euler, 25 steps, 512x512`, with `, image to
        image at strength 0.75` for rows with an input image and `, style ember at 0.8` for
        rows with a style."""
        words = f"{self.scheduler}, {self.steps} steps, {self.width}x{self.height}"
        if self.image is not None:
            words += f", image to image at strength {self.strength}"
        if self.style is not None:
            words += f", style {self.style} at {self.style_weight}"
        return words


@dataclass
class Row:
    """A resolved request with its own scheduler and random generator, asked before every
    step whether it was cancelled, and told of each step done where it has an observer.
    `first_step` is where its denoising starts in the scheduler's timesteps: 0, or later for
    an input image (`sd_img2img.first_timestep`). Once its image is decoded, `flagged` says
    whether the safety checker flagged it (never, for weights without one). `style` is the
    published style its request's style name found, None without one (or at weight 0)."""

    request: ResolvedRequest
    scheduler: Scheduler
    generator: torch.Generator
    is_cancelled: Callable[[], bool] = field(default=lambda: False)
    on_step: StepObserver | None = None
    flagged: bool = False
    first_step: int = 0
    style: Any = None  # the sd_styles.Style its networks run with, None without one

    @property
    def timesteps(self) -> torch.Tensor:
        """The timesteps this row is denoised at, one UNet call each."""
        return self.scheduler.timesteps[self.first_step :]

    def step_kwargs(self) -> dict[str, Any]:
        """The scheduler.step keyword arguments for this row: its generator, where taken."""
        accepts = inspect.signature(self.scheduler.step).parameters
        return {"generator": self.generator} if "generator" in accepts else {}


def make_row(
    request: ResolvedRequest,
    scheduler_config: dict[str, Any],
    is_cancelled: Callable[[], bool] | None = None,
    on_step: StepObserver | None = None,
) -> Row:
    """Give `request` a scheduler set to its step count (starting where its strength says,
    for an input image) and a generator seeded with its seed."""
    scheduler = SCHEDULERS[request.scheduler](scheduler_config)
    try:
        scheduler.set_timesteps(request.steps)
    except ValueError as exc:  # e.g. LCM allows at most its original_inference_steps
        raise InvalidRequest(
            f"scheduler {request.scheduler!r} with steps {request.steps}: {exc}"
        ) from exc
    generator = torch.Generator("cpu").manual_seed(request.seed)
    row = Row(request, scheduler, generator, is_cancelled or (lambda: False), on_step)
    if request.strength is not None:
        row.first_step = first_timestep(scheduler, request.steps, request.strength)
    return row
