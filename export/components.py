"""One class per exported component: its tensor names, symbolic shapes and torch wrapper.

This is the single source of truth for what each ONNX file looks like. The exporter uses it
for names and dynamic axes, the parity check for sample inputs, the TensorRT builder for its
optimisation profiles, and the manifest carries it to the serving side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Symbolic dimension names. A shape entry is either an int or one of these.
BATCH = "batch"
UNET_BATCH = "unet_batch"  # the UNet sees unconditional + conditional rows
SEQUENCE = "sequence"
HIDDEN = "hidden"
LATENT_CHANNELS = "latent_channels"
LATENT_HEIGHT = "latent_height"
LATENT_WIDTH = "latent_width"
IMAGE_HEIGHT = "image_height"
IMAGE_WIDTH = "image_width"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]

    def resolve(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def as_manifest(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ComponentSpec:
    """An exported network: ONNX file name, inputs in call order, outputs."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs) if t.dynamic_axes()}

    def sample_inputs(self, dims: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs of the shapes `dims` gives, for tracing and parity checks."""
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {}
        for t in self.inputs:
            shape = t.resolve(dims)
            if t.dtype == "int64":  # token ids
                out[t.name] = rng.integers(0, dims["vocab"], size=shape, dtype=np.int64)
            elif t.name == "timestep":
                out[t.name] = rng.uniform(0, 999, size=shape).astype(t.dtype)
            else:
                out[t.name] = rng.standard_normal(shape).astype(t.dtype)
        return out

    def profile(
        self, low: dict[str, int], opt: dict[str, int], high: dict[str, int]
    ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimisation profile: (min, opt, max) shape for every input."""
        return {t.name: (t.resolve(low), t.resolve(opt), t.resolve(high)) for t in self.inputs}

    def as_manifest(self) -> dict[str, Any]:
        return {
            "file": self.filename,
            "inputs": [t.as_manifest() for t in self.inputs],
            "outputs": [t.as_manifest() for t in self.outputs],
        }


TEXT_ENCODER = ComponentSpec(
    name="text_encoder",
    inputs=(TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)),),
    outputs=(TensorSpec("last_hidden_state", "float32", (BATCH, SEQUENCE, HIDDEN)),),
)

UNET = ComponentSpec(
    name="unet",
    inputs=(
        TensorSpec("sample", "float32", (UNET_BATCH, LATENT_CHANNELS, LATENT_HEIGHT, LATENT_WIDTH)),
        TensorSpec("timestep", "float32", (UNET_BATCH,)),
        TensorSpec("encoder_hidden_states", "float32", (UNET_BATCH, SEQUENCE, HIDDEN)),
    ),
    outputs=(
        TensorSpec(
            "noise_pred", "float32", (UNET_BATCH, LATENT_CHANNELS, LATENT_HEIGHT, LATENT_WIDTH)
        ),
    ),
)

VAE_DECODER = ComponentSpec(
    name="vae_decoder",
    inputs=(
        TensorSpec(
            "latent_sample", "float32", (BATCH, LATENT_CHANNELS, LATENT_HEIGHT, LATENT_WIDTH)
        ),
    ),
    outputs=(TensorSpec("sample", "float32", (BATCH, 3, IMAGE_HEIGHT, IMAGE_WIDTH)),),
)

COMPONENTS: tuple[ComponentSpec, ...] = (TEXT_ENCODER, UNET, VAE_DECODER)


class TextEncoderModule(torch.nn.Module):
    def __init__(self, text_encoder: Any) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


class UNetModule(torch.nn.Module):
    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoderModule(torch.nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


def torch_modules(pipe: Any) -> dict[str, torch.nn.Module]:
    """The torch module behind each component of a diffusers Stable Diffusion pipeline."""
    return {
        TEXT_ENCODER.name: TextEncoderModule(pipe.text_encoder).eval(),
        UNET.name: UNetModule(pipe.unet).eval(),
        VAE_DECODER.name: VaeDecoderModule(pipe.vae).eval(),
    }
