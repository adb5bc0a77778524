"""A deterministic tiny Stable Diffusion for CPUs and CI.

Seeded random weights in the standard diffusers `save_pretrained` layout, with the real CLIP
BPE vocabulary (taken from the `open-clip-torch` package data, installed without its
dependencies), so prompts tokenize to the real token ids. The weights are random: the images
are structured noise, not weapons.

The tiny architecture has a safety checker too (diffusers' `StableDiffusionSafetyChecker` on
a tiny CLIP vision model, seeded random concept embeddings, and CLIP's image processor
settings), so that the export and the model's check run everywhere. Its thresholds are at
least 1, which no cosine similarity exceeds: at the model's default `safety_adjustment` (0)
it flags nothing, and the images are those of the pipeline without it; a test flags images by
raising the adjustment.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from export.errors import ExportError

CLIP_VOCAB_SIZE = 49408
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def clip_bpe_path() -> Path:
    """CLIP's BPE merges file, as the open-clip-torch package ships it."""
    spec = importlib.util.find_spec("open_clip")  # located, never imported: its deps are absent
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(
            "the CLIP vocabulary needs open-clip-torch: pip install --no-deps open-clip-torch"
        )
    return Path(next(iter(spec.submodule_search_locations))) / BPE_FILE


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte to printable-character table."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_clip_tokenizer_files(bpe_gz: Path, out: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt for CLIPTokenizer, built as CLIP's SimpleTokenizer builds them."""
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = out / "vocab.json", out / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_file, merges_file


@dataclass(frozen=True)
class Architecture:
    """Constructor arguments of the three networks, and of the safety checker's CLIP vision
    model where the architecture has one; the rest is shared by every size."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    safety_checker: dict[str, Any] | None = None


ARCHITECTURES = {
    # A few MB: CPUs and CI. Images are multiples of 16 (2 UNet blocks, VAE factor 8).
    "tiny": Architecture(
        unet=dict(
            sample_size=16,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=dict(
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=128,
        ),
        text_encoder=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=5,
            projection_dim=32,
        ),
        # CLIP reads 224x224: 7x7 patches of 32 pixels.
        safety_checker=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=224,
            patch_size=32,
        ),
    ),
    # Stable Diffusion 1.5's shapes (UNet 3.4 GB in fp32): exports and GPU benchmarks. No safety
    # checker: the benchmarks measure the networks.
    "sd15": Architecture(
        unet=dict(
            sample_size=64,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),
        text_encoder=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            projection_dim=768,
        ),
    ),
}


def build_safety_checker(vision: dict[str, Any], text: dict[str, Any], seed: int) -> Any:
    """diffusers' safety checker on a CLIP vision model of `vision`'s shape, seeded: random
    concept embeddings, thresholds in [1, 1.1), which no cosine similarity exceeds."""
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig

    torch.manual_seed(seed)
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(
            text_config={**text, "vocab_size": CLIP_VOCAB_SIZE},
            vision_config=vision,
            projection_dim=text["projection_dim"],
        )
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for embeds in (checker.concept_embeds, checker.special_care_embeds):
            embeds.copy_(torch.randn(embeds.shape, generator=generator))
        for weights in (checker.concept_embeds_weights, checker.special_care_embeds_weights):
            weights.copy_(1 + 0.1 * torch.rand(weights.shape, generator=generator))
    return checker.eval()


def build_pipeline(architecture: str = "tiny", seed: int = 0) -> Any:
    """A Stable Diffusion pipeline of the named architecture with seeded random weights."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    arch = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **arch.unet)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        **arch.vae,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            **arch.text_encoder,
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_clip_tokenizer_files(clip_bpe_path(), Path(tmp))
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)
    scheduler = PNDMScheduler(  # Stable Diffusion 1.x's scheduler config
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    checker = (
        None
        if arch.safety_checker is None
        else build_safety_checker(arch.safety_checker, arch.text_encoder, seed + 3)
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=checker,
        # CLIP's settings (224 shortest edge, bicubic, center crop, OpenAI's mean and std).
        feature_extractor=None if checker is None else CLIPImageProcessor(),
        requires_safety_checker=checker is not None,
    )


def write_tiny(out: Path, seed: int = 0, architecture: str = "tiny") -> Path:
    """Build the pipeline and save it to `out` (the diffusers folder layout)."""
    build_pipeline(architecture, seed).save_pretrained(out, safe_serialization=True)
    return out
