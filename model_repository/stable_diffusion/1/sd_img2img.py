"""Image to image as diffusers' StableDiffusionImg2ImgPipeline does it: where a row's denoising
starts for its strength, the input image as the VAE encoder reads it, and the row's starting
latents.

A row with an input image and strength s denoises the last int(steps x s) of its scheduler's
timesteps (diffusers' `get_timesteps`), starting from the image's latents noised to the first
of them: the VAE encoder's posterior sampled with the row's generator, times the VAE scaling
factor, then the scheduler's `add_noise` with noise from the same generator. Both draws are
made on the CPU, in that order, as diffusers makes them with a CPU generator, so a row's image
equals diffusers' for the same seed, whatever shares its batch and whatever the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# DiagonalGaussianDistribution's clamp of the log-variance before its exponential.
LOGVAR_RANGE = (-30.0, 20.0)


def denoising_steps(steps: int, strength: float) -> int:
    """The steps a row of `steps` steps at `strength` denoises: int(steps x strength), at
    most steps. Below 1, the row has nothing to do (the contract refuses it)."""
    return min(int(steps * strength), steps)


def first_timestep(scheduler: Any, steps: int, strength: float) -> int:
    """The index in `scheduler.timesteps` (set to `steps`) of the row's first timestep,
    made the scheduler's begin index where it keeps one, so that its steps and `add_noise`
    start there."""
    start = max(steps - denoising_steps(steps, strength), 0) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return start


def image_batch(images: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """HxWx3 uint8 images as the VAE encoder reads them: Nx3xHxW float32 in [-1, 1] on
    `device`, computed as VaeImageProcessor.preprocess does (x / 255, then 2x - 1). The
    bytes cross to the device, a quarter of the floats."""
    pixels = torch.from_numpy(np.stack(images)).to(device).to(torch.float32) / 255.0
    return (2.0 * pixels - 1.0).permute(0, 3, 1, 2)


def starting_latents(
    moments: torch.Tensor,
    *,
    scaling_factor: float,
    generator: torch.Generator,
    scheduler: Any,
    timestep: torch.Tensor,
) -> torch.Tensor:
    """One row's latents before its first step: its posterior `moments` (1 x 2C x h x w, mean
    and log-variance) sampled with `generator` (DiagonalGaussianDistribution.sample), scaled
    by `scaling_factor`, noised to `timestep` by `scheduler.add_noise` with noise from the
    same generator."""
    mean, logvar = torch.chunk(moments, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, *LOGVAR_RANGE))
    draw = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    latents = scaling_factor * (mean + std * draw)
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    return scheduler.add_noise(latents, noise.to(latents.device), timestep)
