"""One `ComponentSpec` per exported network: its tensor names, symbolic shapes, rows per image.

This is the single source of what each ONNX file looks like and of what each symbolic
dimension means. The exporter uses it for names and dynamic axes, the parity check for
sample inputs, the TensorRT builder for its optimisation profiles; the manifest carries it
to the serving side as data (`components`, `dimensions`), which the model evaluates without
a table of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Symbolic dimension names. A shape entry is either an int or one of these; the manifest's
# `dimensions` table says what each is (see `geometry.ModelGeometry.dimensions`).
BATCH = "batch"  # the rows a component sees (see ComponentSpec.rows_per_image)
SEQUENCE = "sequence"
HIDDEN = "hidden"
LATENT_CHANNELS = "latent_channels"
LATENT_HEIGHT = "latent_height"
LATENT_WIDTH = "latent_width"
# The VAE posterior's parameters per latent pixel: mean and log-variance of each latent channel.
LATENT_MOMENTS = "latent_moments"
IMAGE_HEIGHT = "image_height"
IMAGE_WIDTH = "image_width"
# The safety checker's: its CLIP input's size, and how many concepts it compares with.
CHECKER_HEIGHT = "checker_height"
CHECKER_WIDTH = "checker_width"
SPECIAL_CONCEPTS = "special_concepts"
CONCEPTS = "concepts"

# What a derived dimension is computed from: a call's rows, or the image size in pixels.
ROWS, HEIGHT, WIDTH = "rows", "height", "width"

# A dimension: a constant, or {"from": ROWS | HEIGHT | WIDTH, "divisor": k} (integer division).
Dimension = int | dict[str, Any]


def derived(source: str, divisor: int = 1) -> dict[str, Any]:
    """A dimension computed as `source // divisor` (source: rows, height or width)."""
    if source not in (ROWS, HEIGHT, WIDTH):
        raise ValueError(f"dimension source {source!r}: use {ROWS}, {HEIGHT} or {WIDTH}")
    return {"from": source, "divisor": divisor}


def dimension_sizes(
    table: Mapping[str, Dimension], *, rows: int, height: int, width: int
) -> dict[str, int]:
    """Every dimension of `table` for a call on `rows` rows of height x width images."""
    values = {ROWS: rows, HEIGHT: height, WIDTH: width}
    return {
        name: d if isinstance(d, int) else values[d["from"]] // d["divisor"]
        for name, d in table.items()
    }


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, numpy dtype name, and shape (ints or dimension names).

    `values`, where set, is the range sample inputs are drawn from uniformly (a timestep, an
    image in [-1, 1]); otherwise they are standard normal (token ids: below the vocabulary).
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    values: tuple[float, float] | None = None

    def resolve(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """The concrete shape for these dimension sizes."""
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)

    def dynamic_axes(self) -> dict[int, str]:
        """Axis index -> dimension name, for the axes that are not fixed."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def as_manifest(self) -> dict[str, Any]:
        """The tensor as the manifest records it."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ComponentSpec:
    """An exported network: ONNX file name, inputs in call order, outputs, rows per image.

    `rows_per_image` is (guided, unguided): the rows the network sees for one image with
    and without classifier-free guidance. The text encoder reads the prompt and, when
    guided, the negative prompt; the UNet sees the conditional and, when guided, the
    unconditional latent; the VAE decoder and the safety checker see one image each.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    rows_per_image: tuple[int, int]

    @property
    def filename(self) -> str:
        """The ONNX file's name in the weights folder."""
        return f"{self.name}.onnx"

    def rows(self, images: int, *, guided: bool) -> int:
        """Rows this network sees for `images` images, all guided or all unguided."""
        guided_rows, unguided_rows = self.rows_per_image
        return images * (guided_rows if guided else unguided_rows)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes: every symbolic axis of every tensor."""
        return {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs) if t.dynamic_axes()}

    def sample_inputs(
        self, dims: Mapping[str, int], *, vocab: int, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """Random inputs of the shapes `dims` gives (token ids below `vocab`), for tracing
        and parity checks."""
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {}
        for t in self.inputs:
            shape = t.resolve(dims)
            if t.dtype == "int64":  # token ids
                out[t.name] = rng.integers(0, vocab, size=shape, dtype=np.int64)
            elif t.values is not None:
                out[t.name] = rng.uniform(*t.values, size=shape).astype(t.dtype)
            else:
                out[t.name] = rng.standard_normal(shape).astype(t.dtype)
        return out

    def profile(
        self, low: Mapping[str, int], opt: Mapping[str, int], high: Mapping[str, int]
    ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimisation profile: (min, opt, max) shape for every input."""
        return {t.name: (t.resolve(low), t.resolve(opt), t.resolve(high)) for t in self.inputs}

    def as_manifest(self) -> dict[str, Any]:
        """The component as the manifest records it."""
        guided, unguided = self.rows_per_image
        return {
            "file": self.filename,
            "rows_per_image": {"guided": guided, "unguided": unguided},
            "inputs": [t.as_manifest() for t in self.inputs],
            "outputs": [t.as_manifest() for t in self.outputs],
        }


TEXT_ENCODER = ComponentSpec(
    name="text_encoder",
    inputs=(TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)),),
    outputs=(TensorSpec("last_hidden_state", "float32", (BATCH, SEQUENCE, HIDDEN)),),
    rows_per_image=(2, 1),
)

UNET = ComponentSpec(
    name="unet",
    inputs=(
        TensorSpec("sample", "float32", (BATCH, LATENT_CHANNELS, LATENT_HEIGHT, LATENT_WIDTH)),
        TensorSpec("timestep", "float32", (BATCH,), values=(0, 999)),
        TensorSpec("encoder_hidden_states", "float32", (BATCH, SEQUENCE, HIDDEN)),
    ),
    outputs=(
        TensorSpec("noise_pred", "float32", (BATCH, LATENT_CHANNELS, LATENT_HEIGHT, LATENT_WIDTH)),
    ),
    rows_per_image=(2, 1),
)

VAE_DECODER = ComponentSpec(
    name="vae_decoder",
    inputs=(
        TensorSpec(
            "latent_sample", "float32", (BATCH, LATENT_CHANNELS, LATENT_HEIGHT, LATENT_WIDTH)
        ),
    ),
    outputs=(TensorSpec("sample", "float32", (BATCH, 3, IMAGE_HEIGHT, IMAGE_WIDTH)),),
    rows_per_image=(1, 1),
)

# An input image (image to image) to the posterior's moments: diffusers' AutoencoderKL.encode
# up to its DiagonalGaussianDistribution, whose sampling needs the row's own generator and so
# happens on the model's side (mean + exp(logvar / 2) * noise, logvar clamped as diffusers does).
VAE_ENCODER = ComponentSpec(
    name="vae_encoder",
    inputs=(TensorSpec("sample", "float32", (BATCH, 3, IMAGE_HEIGHT, IMAGE_WIDTH), (-1, 1)),),
    outputs=(
        TensorSpec("moments", "float32", (BATCH, LATENT_MOMENTS, LATENT_HEIGHT, LATENT_WIDTH)),
    ),
    rows_per_image=(1, 1),
)

COMPONENTS: tuple[ComponentSpec, ...] = (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)

# Optional: exported where the model folder has one. Its input is the decoded image as CLIP
# sees it; its outputs, the cosine similarities of the image's CLIP embedding to each
# concept embedding. The thresholds and the decision rule are data and numpy on the model's
# side (see `export.safety`), so that a config parameter can shift them.
SAFETY_CHECKER = ComponentSpec(
    name="safety_checker",
    inputs=(TensorSpec("clip_input", "float32", (BATCH, 3, CHECKER_HEIGHT, CHECKER_WIDTH)),),
    outputs=(
        TensorSpec("special_cos_dist", "float32", (BATCH, SPECIAL_CONCEPTS)),
        TensorSpec("cos_dist", "float32", (BATCH, CONCEPTS)),
    ),
    rows_per_image=(1, 1),
)


class TextEncoderModule(torch.nn.Module):
    """The CLIP text encoder as a network of token ids to its last hidden state."""

    def __init__(self, text_encoder: Any) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The last hidden state for these token ids."""
        return self.text_encoder(input_ids, return_dict=False)[0]


class UNetModule(torch.nn.Module):
    """The UNet as a network of (latents, timesteps, text embeddings) to predicted noise."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """The predicted noise for these latents."""
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoderModule(torch.nn.Module):
    """The VAE decoder as a network of scaled latents to images in [-1, 1]."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        """The decoded images for these latents."""
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderModule(torch.nn.Module):
    """The VAE encoder as a network of images in [-1, 1] to the posterior's moments (mean and
    log-variance, stacked on the channel axis), as AutoencoderKL.encode computes them."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        """The moments for these images."""
        moments = self.vae.encoder(sample)
        quant_conv = self.vae.quant_conv  # None where the VAE has use_quant_conv=False
        return moments if quant_conv is None else quant_conv(moments)


class SafetyCheckerModule(torch.nn.Module):
    """diffusers' StableDiffusionSafetyChecker up to its cosine similarities: CLIP's vision
    model, the visual projection and `cosine_distance` to the special-care and the concept
    embeddings, as its `forward` computes them before deciding."""

    def __init__(self, checker: Any) -> None:
        super().__init__()
        self.checker = checker

    def forward(self, clip_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(special_cos_dist, cos_dist) for these CLIP-preprocessed images."""
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        pooled = self.checker.vision_model(clip_input)[1]
        embeds = self.checker.visual_projection(pooled)
        return (
            cosine_distance(embeds, self.checker.special_care_embeds),
            cosine_distance(embeds, self.checker.concept_embeds),
        )


def components_of(pipe: Any) -> tuple[ComponentSpec, ...]:
    """The components a diffusers Stable Diffusion pipeline exports: the text encoder, the
    UNet and the VAE's decoder and encoder, and the safety checker where it has one."""
    return COMPONENTS if pipe.safety_checker is None else (*COMPONENTS, SAFETY_CHECKER)


def torch_modules(pipe: Any) -> dict[str, torch.nn.Module]:
    """The torch module behind each component of a diffusers Stable Diffusion pipeline."""
    modules: dict[str, torch.nn.Module] = {
        TEXT_ENCODER.name: TextEncoderModule(pipe.text_encoder).eval(),
        UNET.name: UNetModule(pipe.unet).eval(),
        VAE_DECODER.name: VaeDecoderModule(pipe.vae).eval(),
        VAE_ENCODER.name: VaeEncoderModule(pipe.vae).eval(),
    }
    if pipe.safety_checker is not None:
        modules[SAFETY_CHECKER.name] = SafetyCheckerModule(pipe.safety_checker).eval()
    return modules
