"""The generation contract: what a request may ask for and what it gets when it asks for
nothing, read from the model config's parameters.

The model config Triton serves is the one source of these values: the committed
config.pbtxt sets the hand-written ones, `python -m export config` copies the ones the
weights fix (size multiple, default size, token window) from the weights' manifest, and the
gateway reads them all from Triton. Nothing here has a default: a missing, malformed or
inconsistent parameter stops the model from loading, with a message naming it.
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sd_img2img import denoising_steps
from sd_requests import SCHEDULERS, GenerationRequest, InvalidRequest, ResolvedRequest

CONTRACT_VERSION = "1"  # the format of the parameters below that this code implements
INT64_MAX = 2**63 - 1  # seeds travel as INT64
PROMPT_OVERFLOW = ("reject", "truncate")


class ConfigError(ValueError):
    """The model config cannot be served: the message names the parameter and its value."""


class _Parameters:
    """Typed reads of the config's string parameters; every error names the parameter."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = values

    def text(self, name: str) -> str:
        if name not in self.values:
            raise ConfigError(f"model config parameter {name} is missing")
        return self.values[name]

    def integer(self, name: str) -> int:
        value = self.text(name)
        try:
            return int(value)
        except ValueError:
            message = f"model config parameter {name} {value!r} is not an integer"
            raise ConfigError(message) from None

    def number(self, name: str) -> float:
        value = self.text(name)
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise ConfigError(f"model config parameter {name} {value!r} is not a finite number")
        return number


def check_copies(parameters: Mapping[str, str], manifest: Mapping[str, Any]) -> None:
    """Refuse a config whose values copied from the weights' manifest (model identity and
    the weights' contract values) differ from the manifest of the weights being loaded."""
    copies = {
        "model_name": manifest["model"]["name"],
        "model_version": manifest["model"]["version"],
        **manifest["contract"],
    }
    for name, value in copies.items():
        given = parameters.get(name)
        if given != str(value):
            found = "is missing" if given is None else f"is {given!r}"
            raise ConfigError(
                f"model config parameter {name} {found} but the weights' manifest says "
                f"{str(value)!r}: re-run `python -m export config`"
            )


def _at_least(name: str, value: float, least: float) -> None:
    if value < least:
        raise ConfigError(f"model config {name} is {value}; it must be at least {least}")


def _within(name: str, value: float, low: float, high: float) -> None:
    """InvalidRequest unless `value` is finite and within [low, high], naming it."""
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidRequest(f"{name} {value} is outside [{low}, {high}]")


def _ordered(*named: tuple[str, float]) -> None:
    if any(a[1] > b[1] for a, b in itertools.pairwise(named)):
        rule = " <= ".join(name for name, _ in named)
        values = ", ".join(f"{name} {value}" for name, value in named)
        raise ConfigError(f"model config values must satisfy {rule}; they are {values}")


@dataclass(frozen=True)
class GenerationContract:
    """Bounds and defaults of a request, and the most rows a request or batch may carry.

    Always consistent: construction refuses a default outside its bounds, a default
    scheduler not offered, an offered scheduler the core does not support, a default size
    the size rules forbid, strengths outside 0..1, or a negative style weight.
    """

    schedulers: tuple[str, ...]
    default_scheduler: str
    min_size: int
    max_size: int
    size_multiple: int
    default_size: int
    min_steps: int
    max_steps: int
    default_steps: int
    min_guidance: float
    max_guidance: float
    default_guidance: float
    unguided_at_most: float
    min_strength: float
    max_strength: float
    default_strength: float
    min_style_weight: float
    max_style_weight: float
    default_style_weight: float
    max_prompt_chars: int
    max_prompt_tokens: int
    prompt_overflow: str
    max_seed: int
    max_batch_size: int

    @classmethod
    def from_config(
        cls, parameters: Mapping[str, str], manifest: Mapping[str, Any], max_batch_size: int
    ) -> GenerationContract:
        """The contract in the model config's `parameters` (strings, as Triton passes them)
        and its `max_batch_size`, for the weights described by `manifest`."""
        p = _Parameters(parameters)
        version = p.text("contract_version")
        if version != CONTRACT_VERSION:
            raise ConfigError(
                f"model config parameter contract_version is {version!r}; this model "
                f"implements {CONTRACT_VERSION!r}"
            )
        check_copies(parameters, manifest)
        return cls(
            schedulers=tuple(name.strip() for name in p.text("schedulers").split(",")),
            default_scheduler=p.text("default_scheduler"),
            min_size=p.integer("min_size"),
            max_size=p.integer("max_size"),
            size_multiple=p.integer("size_multiple"),
            default_size=p.integer("default_size"),
            min_steps=p.integer("min_steps"),
            max_steps=p.integer("max_steps"),
            default_steps=p.integer("default_steps"),
            min_guidance=p.number("min_guidance"),
            max_guidance=p.number("max_guidance"),
            default_guidance=p.number("default_guidance"),
            unguided_at_most=p.number("unguided_at_most"),
            min_strength=p.number("min_strength"),
            max_strength=p.number("max_strength"),
            default_strength=p.number("default_strength"),
            min_style_weight=p.number("min_style_weight"),
            max_style_weight=p.number("max_style_weight"),
            default_style_weight=p.number("default_style_weight"),
            max_prompt_chars=p.integer("max_prompt_chars"),
            max_prompt_tokens=p.integer("max_prompt_tokens"),
            prompt_overflow=p.text("prompt_overflow"),
            max_seed=p.integer("max_seed"),
            max_batch_size=max_batch_size,
        )

    def __post_init__(self) -> None:
        unsupported = [name for name in self.schedulers if name not in SCHEDULERS]
        if unsupported or len(set(self.schedulers)) != len(self.schedulers):
            raise ConfigError(
                f"model config parameter schedulers {','.join(self.schedulers)!r} must name "
                f"each of {', '.join(SCHEDULERS)} at most once (this core supports those)"
            )
        if self.default_scheduler not in self.schedulers:
            raise ConfigError(
                f"model config parameter default_scheduler {self.default_scheduler!r} is not "
                f"offered by schedulers ({', '.join(self.schedulers)})"
            )
        for name, least in [("min_size", 1), ("size_multiple", 1), ("min_steps", 1)]:
            _at_least(name, getattr(self, name), least)
        for name, least in [("max_prompt_chars", 1), ("max_prompt_tokens", 2), ("max_seed", 0)]:
            _at_least(name, getattr(self, name), least)
        _at_least("max_batch_size", self.max_batch_size, 1)
        _ordered(("min_size", self.min_size), ("default_size", self.default_size))
        _ordered(("default_size", self.default_size), ("max_size", self.max_size))
        if self.default_size % self.size_multiple:
            raise ConfigError(
                f"model config parameter default_size {self.default_size} is not a multiple "
                f"of size_multiple {self.size_multiple}"
            )
        _ordered(*self._named("min_steps", "default_steps", "max_steps"))
        _ordered(*self._named("min_guidance", "default_guidance", "max_guidance"))
        # A strength is a fraction of the steps: 0 keeps the image, 1 repaints it all.
        _at_least("min_strength", self.min_strength, 0)
        strengths = self._named("min_strength", "default_strength", "max_strength")
        _ordered(*strengths, ("full strength", 1.0))
        _at_least("min_style_weight", self.min_style_weight, 0)
        _ordered(*self._named("min_style_weight", "default_style_weight", "max_style_weight"))
        _ordered(*self._named("max_seed"), ("INT64 max", INT64_MAX))
        if self.prompt_overflow not in PROMPT_OVERFLOW:
            raise ConfigError(
                f"model config parameter prompt_overflow {self.prompt_overflow!r}: use "
                f"{' or '.join(PROMPT_OVERFLOW)}"
            )

    def _named(self, *names: str) -> list[tuple[str, float]]:
        return [(name, getattr(self, name)) for name in names]

    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        """`request` with every missing value filled from the contract (a missing seed drawn
        uniformly from [0, max_seed]), checked; InvalidRequest names the first bad value."""
        r = request
        negative = "" if r.negative_prompt is None else r.negative_prompt
        seed = secrets.randbelow(self.max_seed + 1) if r.seed is None else r.seed
        steps = self.default_steps if r.steps is None else r.steps
        guidance = self.default_guidance if r.guidance_scale is None else r.guidance_scale
        image_size = self._image_size(r)
        width, height = image_size or (
            self.default_size if r.width is None else r.width,
            self.default_size if r.height is None else r.height,
        )
        scheduler = self.default_scheduler if r.scheduler is None else r.scheduler
        self._check_text("prompt", r.prompt, required=True)
        self._check_text("negative_prompt", negative, required=False)
        if not 0 <= seed <= self.max_seed:
            raise InvalidRequest(f"seed {seed} is outside [0, {self.max_seed}]")
        if not self.min_steps <= steps <= self.max_steps:
            raise InvalidRequest(f"steps {steps} is outside [{self.min_steps}, {self.max_steps}]")
        _within("guidance_scale", guidance, self.min_guidance, self.max_guidance)
        whose = "image " if image_size else ""  # the client fixes the image, not width/height
        self._check_size(f"{whose}width", width)
        self._check_size(f"{whose}height", height)
        if scheduler not in self.schedulers:
            raise InvalidRequest(
                f"unknown scheduler {scheduler!r}; choose from {', '.join(self.schedulers)}"
            )
        strength = self._strength(r, steps)
        style, style_weight = self._style(r)
        return ResolvedRequest(
            prompt=r.prompt,
            negative_prompt=negative,
            seed=seed,
            steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            scheduler=scheduler,
            guided=guidance > self.unguided_at_most,
            image=r.image,
            strength=strength,
            style=style,
            style_weight=style_weight,
        )

    def _style(self, r: GenerationRequest) -> tuple[str | None, float]:
        """The style and its weight (the default when not given); (None, 0.0) without a
        style or at weight 0. InvalidRequest for a weight without a style, or out of bounds.
        Whether the style exists is the style library's to say."""
        if r.style is None or r.style == "":
            if r.style_weight is not None:
                raise InvalidRequest(
                    f"style_weight {r.style_weight} applies to a style; this request has none"
                )
            return None, 0.0
        weight = self.default_style_weight if r.style_weight is None else r.style_weight
        _within("style_weight", weight, self.min_style_weight, self.max_style_weight)
        if weight == 0:
            return None, 0.0
        return r.style, weight

    def _image_size(self, r: GenerationRequest) -> tuple[int, int] | None:
        """The input image's (width, height), or None without one; InvalidRequest for an
        image that is not HxWx3 uint8, or a width or height that differs from it."""
        image = r.image
        if image is None:
            return None
        wanted = "image must be height x width x 3 uint8 (RGB)"
        if not isinstance(image, np.ndarray):
            raise InvalidRequest(f"{wanted}; it is a {type(image).__name__}")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InvalidRequest(f"{wanted}; it is {image.dtype} of shape {image.shape}")
        height, width, _ = image.shape
        for name, given, actual in (("width", r.width, width), ("height", r.height, height)):
            if given is not None and given != actual:
                raise InvalidRequest(
                    f"{name} {given} differs from the image's {name} {actual}: an image's "
                    f"size is the output's (leave {name} out)"
                )
        return width, height

    def _strength(self, r: GenerationRequest, steps: int) -> float | None:
        """The strength of an image row (the default when not given), None for a text row;
        InvalidRequest for a strength without an image, out of bounds, or so small that the
        row would have no denoising step."""
        if r.image is None:
            if r.strength is not None:
                raise InvalidRequest(
                    f"strength {r.strength} applies to an input image; this request has none"
                )
            return None
        strength = self.default_strength if r.strength is None else r.strength
        _within("strength", strength, self.min_strength, self.max_strength)
        if denoising_steps(steps, strength) < 1:
            raise InvalidRequest(
                f"strength {strength} with steps {steps} leaves no denoising step: "
                "int(steps x strength) must be at least 1 (raise strength or steps)"
            )
        return strength

    def _check_text(self, name: str, value: str, *, required: bool) -> None:
        if required and not value.strip():
            raise InvalidRequest(f"{name} must not be empty")
        if len(value) > self.max_prompt_chars:
            raise InvalidRequest(
                f"{name} has {len(value)} characters; at most {self.max_prompt_chars} are allowed"
            )

    def _check_size(self, name: str, value: int) -> None:
        if not self.min_size <= value <= self.max_size:
            raise InvalidRequest(f"{name} {value} is outside [{self.min_size}, {self.max_size}]")
        if value % self.size_multiple:
            raise InvalidRequest(f"{name} {value} is not a multiple of {self.size_multiple}")
