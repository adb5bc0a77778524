"""What one image request asks for, its bounds, and the schedulers it may name.

No Triton import here: the Triton adapter (`model.py`) and the tests build these directly.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
)

# diffusers schedulers share no typed base with set_timesteps/step/scale_model_input.
Scheduler = Any

SEED_LIMIT = 2**63  # seeds are INT64 on the wire and non-negative

# name -> factory from the model's scheduler config. The diffusers schedulers are used as
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


class InvalidRequest(ValueError):
    """A request the client must change; the message names the bad value."""


@dataclass(frozen=True)
class Limits:
    """Bounds and defaults, from the model config's parameters and the manifest."""

    size_multiple: int
    default_size: int
    min_size: int = 64
    max_size: int = 1024
    max_steps: int = 150
    max_guidance: float = 30.0
    max_prompt_chars: int = 2000
    default_steps: int = 25
    default_guidance: float = 7.5
    default_scheduler: str = "dpmpp_2m"
    prompt_overflow: str = "reject"  # or "truncate": prompts over the text encoder's tokens

    def __post_init__(self) -> None:
        if self.prompt_overflow not in ("reject", "truncate"):
            raise ValueError(f"prompt_overflow {self.prompt_overflow!r}: reject or truncate")


@dataclass(frozen=True)
class GenerationRequest:
    """One image. Rows with the same `group_key` can share every UNet call."""

    prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    negative_prompt: str = ""

    @property
    def group_key(self) -> tuple[str, int, int, int]:
        return (self.scheduler, self.steps, self.height, self.width)

    @property
    def guided(self) -> bool:
        """Classifier-free guidance; at 1.0 or below the unconditional pass is skipped."""
        return self.guidance_scale > 1.0


@dataclass
class Row:
    """A validated request with its own scheduler and random generator."""

    request: GenerationRequest
    scheduler: Scheduler
    generator: torch.Generator
    is_cancelled: Callable[[], bool] = field(default=lambda: False)

    def step_kwargs(self) -> dict[str, Any]:
        accepts = inspect.signature(self.scheduler.step).parameters
        return {"generator": self.generator} if "generator" in accepts else {}


def _check_text(name: str, value: str, limits: Limits, *, required: bool) -> None:
    if required and not value.strip():
        raise InvalidRequest(f"{name} must not be empty")
    if len(value) > limits.max_prompt_chars:
        raise InvalidRequest(
            f"{name} has {len(value)} characters; at most {limits.max_prompt_chars} are allowed"
        )


def _check_size(name: str, value: int, limits: Limits) -> None:
    if not limits.min_size <= value <= limits.max_size:
        raise InvalidRequest(f"{name} {value} is outside [{limits.min_size}, {limits.max_size}]")
    if value % limits.size_multiple:
        raise InvalidRequest(f"{name} {value} is not a multiple of {limits.size_multiple}")


def validate(request: GenerationRequest, limits: Limits) -> None:
    _check_text("prompt", request.prompt, limits, required=True)
    _check_text("negative_prompt", request.negative_prompt, limits, required=False)
    if not 0 <= request.seed < SEED_LIMIT:
        raise InvalidRequest(f"seed {request.seed} is outside [0, 2**63)")
    if not 1 <= request.steps <= limits.max_steps:
        raise InvalidRequest(f"steps {request.steps} is outside [1, {limits.max_steps}]")
    g = request.guidance_scale
    if not (math.isfinite(g) and 0.0 <= g <= limits.max_guidance):
        raise InvalidRequest(f"guidance_scale {g} is outside [0, {limits.max_guidance}]")
    _check_size("width", request.width, limits)
    _check_size("height", request.height, limits)
    if request.scheduler not in SCHEDULERS:
        raise InvalidRequest(
            f"unknown scheduler {request.scheduler!r}; choose from {', '.join(SCHEDULERS)}"
        )


def make_row(
    request: GenerationRequest,
    limits: Limits,
    scheduler_config: dict[str, Any],
    is_cancelled: Callable[[], bool] | None = None,
) -> Row:
    """Validate `request` and give it a scheduler set to its step count and a seeded generator."""
    validate(request, limits)
    scheduler = SCHEDULERS[request.scheduler](scheduler_config)
    try:
        scheduler.set_timesteps(request.steps)
    except ValueError as exc:  # e.g. LCM allows at most its original_inference_steps
        raise InvalidRequest(
            f"scheduler {request.scheduler!r} with steps {request.steps}: {exc}"
        ) from exc
    generator = torch.Generator("cpu").manual_seed(request.seed)
    return Row(request, scheduler, generator, is_cancelled or (lambda: False))
