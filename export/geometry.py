"""The sizes of an exported model, read from its diffusers configs, and what they imply:
the dimension table and the generation-contract values the manifest carries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from export.components import (
    BATCH,
    HEIGHT,
    HIDDEN,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    LATENT_CHANNELS,
    LATENT_HEIGHT,
    LATENT_WIDTH,
    ROWS,
    SEQUENCE,
    WIDTH,
    Dimension,
    derived,
    dimension_sizes,
)
from export.errors import ExportError


@dataclass(frozen=True)
class ModelGeometry:
    """Sizes read from the pipeline's configs; nothing here assumes a particular model."""

    vocab: int
    sequence: int
    hidden: int
    latent_channels: int
    vae_scale_factor: int
    size_multiple: int
    default_size: int
    scaling_factor: float

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
        )

    def dimensions(self) -> dict[str, Dimension]:
        """What each symbolic dimension of the components' shapes is (the manifest's table)."""
        return {
            BATCH: derived(ROWS),
            SEQUENCE: self.sequence,
            HIDDEN: self.hidden,
            LATENT_CHANNELS: self.latent_channels,
            LATENT_HEIGHT: derived(HEIGHT, self.vae_scale_factor),
            LATENT_WIDTH: derived(WIDTH, self.vae_scale_factor),
            IMAGE_HEIGHT: derived(HEIGHT),
            IMAGE_WIDTH: derived(WIDTH),
        }

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
