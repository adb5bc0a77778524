"""The sizes of an exported model, read from its diffusers configs, and what they imply:
the dimension table and the generation-contract values the manifest carries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from export.components import (
    BATCH,
    CHECKER_HEIGHT,
    CHECKER_WIDTH,
    CONCEPTS,
    HEIGHT,
    HIDDEN,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    LATENT_CHANNELS,
    LATENT_HEIGHT,
    LATENT_MOMENTS,
    LATENT_WIDTH,
    ROWS,
    SEQUENCE,
    SPECIAL_CONCEPTS,
    WIDTH,
    Dimension,
    derived,
    dimension_sizes,
)
from export.errors import ExportError


@dataclass(frozen=True)
class CheckerGeometry:
    """The safety checker's sizes: the CLIP input (height x width, its vision model's image
    size) and the number of special-care and other concepts it compares an image with."""

    height: int
    width: int
    special_concepts: int
    concepts: int

    @classmethod
    def of(cls, checker: Any, feature_extractor: Any) -> CheckerGeometry:
        """The sizes of a diffusers StableDiffusionSafetyChecker and its CLIP image
        processor, or an ExportError where the two do not fit each other."""
        crop = feature_extractor.to_dict()["crop_size"]
        image_size = checker.config.vision_config.image_size
        if (crop["height"], crop["width"]) != (image_size, image_size):
            raise ExportError(
                f"the safety checker's feature extractor crops {crop['width']}x{crop['height']}"
                f" but its vision model reads {image_size}x{image_size}"
            )
        return cls(
            height=crop["height"],
            width=crop["width"],
            special_concepts=checker.special_care_embeds.shape[0],
            concepts=checker.concept_embeds.shape[0],
        )


@dataclass(frozen=True)
class ModelGeometry:
    """Sizes read from the pipeline's configs; nothing here assumes a particular model.
    `checker` is None for a pipeline without a safety checker."""

    vocab: int
    sequence: int
    hidden: int
    latent_channels: int
    vae_scale_factor: int
    size_multiple: int
    default_size: int
    scaling_factor: float
    checker: CheckerGeometry | None = None

    @classmethod
    def of(cls, pipe: Any) -> ModelGeometry:
        """The geometry of a diffusers StableDiffusionPipeline, or an ExportError naming
        what this project cannot serve."""
        unet, vae, text = pipe.unet.config, pipe.vae.config, pipe.text_encoder.config
        if unet.in_channels != vae.latent_channels:
            raise ExportError(
                f"unsupported UNet: {unet.in_channels} input channels for a VAE with "
                f"{vae.latent_channels} latent channels (inpainting or depth models are not "
                "supported)"
            )
        if unet.cross_attention_dim != text.hidden_size:
            raise ExportError(
                f"unsupported model: UNet cross_attention_dim {unet.cross_attention_dim} != "
                f"text encoder hidden size {text.hidden_size}"
            )
        vae_scale = 2 ** (len(vae.block_out_channels) - 1)
        return cls(
            vocab=text.vocab_size,
            sequence=pipe.tokenizer.model_max_length,
            hidden=text.hidden_size,
            latent_channels=unet.in_channels,
            vae_scale_factor=vae_scale,
            # The UNet halves the latent per down block after the first.
            size_multiple=vae_scale * 2 ** (len(unet.down_block_types) - 1),
            default_size=unet.sample_size * vae_scale,
            scaling_factor=float(vae.scaling_factor),
            checker=(
                None
                if pipe.safety_checker is None
                else CheckerGeometry.of(pipe.safety_checker, pipe.feature_extractor)
            ),
        )

    def dimensions(self) -> dict[str, Dimension]:
        """What each symbolic dimension of the components' shapes is (the manifest's table)."""
        table: dict[str, Dimension] = {
            BATCH: derived(ROWS),
            SEQUENCE: self.sequence,
            HIDDEN: self.hidden,
            LATENT_CHANNELS: self.latent_channels,
            LATENT_HEIGHT: derived(HEIGHT, self.vae_scale_factor),
            LATENT_WIDTH: derived(WIDTH, self.vae_scale_factor),
            LATENT_MOMENTS: 2 * self.latent_channels,  # a mean and a log-variance per channel
            IMAGE_HEIGHT: derived(HEIGHT),
            IMAGE_WIDTH: derived(WIDTH),
        }
        if self.checker is not None:
            table |= {
                CHECKER_HEIGHT: self.checker.height,
                CHECKER_WIDTH: self.checker.width,
                SPECIAL_CONCEPTS: self.checker.special_concepts,
                CONCEPTS: self.checker.concepts,
            }
        return table

    def contract(self) -> dict[str, int]:
        """The generation-contract values these weights fix (copied into the model config)."""
        return {
            "size_multiple": self.size_multiple,
            "default_size": self.default_size,
            "max_prompt_tokens": self.sequence,
        }

    def parity_cases(self) -> list[dict[str, int]]:
        """Dimension sizes of two calls: two rows at the default square size, one row of a
        taller, non-square size."""
        size, table = self.default_size, self.dimensions()
        return [
            dimension_sizes(table, rows=2, height=size, width=size),
            dimension_sizes(table, rows=1, height=size + self.size_multiple, width=size),
        ]
