"""Seeded random LoRAs for a pipeline's UNet and text encoder, in the two layouts studios have.

The modules are those kohya's trainer adapts in Stable Diffusion 1.x: the UNet's attention
projections, its transformers' `proj_in`/`proj_out` (1x1 convolutions in SD 1.x) and
feed-forward layers, and the text encoder's attention and MLP layers. The same random matrices
can be written as diffusers/PEFT (`unet.<module>.lora_A.weight`, no alpha: scale 1) or as
kohya (`lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`);
the kohya file stores `lora_up` times rank/alpha, so both files describe the same style.
"""

from __future__ import annotations

from pathlib import Path

import torch

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def lora_modules(
    module: torch.nn.Module, targets: tuple[str, ...]
) -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) of every Linear or Conv2d whose name ends with one of `targets`."""
    return [
        (name, layer)
        for name, layer in module.named_modules()
        if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d)
        and any(name == t or name.endswith("." + t) for t in targets)
    ]


def random_lora(
    pipe: object, *, rank: int = 4, seed: int = 0, scale: float = 0.05
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`<component>.<module>` -> (A, B), seeded; A is rank x in (x kh x kw for a conv),
    B out x rank (x 1 x 1), both times `scale` so the style shifts the image, not breaks it."""
    generator = torch.Generator().manual_seed(seed)
    matrices = {}
    for component, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS)):
        for name, layer in lora_modules(getattr(pipe, component), targets):
            weight: torch.Tensor = layer.weight  # type: ignore[assignment]
            a_shape = (rank, weight.shape[1], *weight.shape[2:])
            b_shape = (weight.shape[0], rank, *((1,) * (weight.dim() - 2)))
            a = torch.randn(a_shape, generator=generator) * scale
            b = torch.randn(b_shape, generator=generator) * scale
            matrices[f"{component}.{name}"] = (a, b)
    return matrices


def peft_tensors(
    matrices: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """The matrices keyed as diffusers' save_lora_weights writes them (scale 1)."""
    out = {}
    for key, (a, b) in matrices.items():
        out[f"{key}.lora_A.weight"] = a.contiguous()
        out[f"{key}.lora_B.weight"] = b.contiguous()
    return out


def kohya_tensors(
    matrices: dict[str, tuple[torch.Tensor, torch.Tensor]], *, alpha_ratio: float = 0.5
) -> dict[str, torch.Tensor]:
    """The matrices keyed as kohya's trainer writes them, with alpha = rank x `alpha_ratio`
    and lora_up divided by that ratio, so the style equals `peft_tensors`'s."""
    out = {}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    for key, (a, b) in matrices.items():
        component, _, module = key.partition(".")
        if component == "text_encoder":
            module = "text_model." + module  # kohya names CLIP's modules from text_model
        name = prefixes[component] + module.replace(".", "_")
        rank = a.shape[0]
        out[f"{name}.lora_down.weight"] = a.contiguous()
        out[f"{name}.lora_up.weight"] = (b / alpha_ratio).contiguous()
        out[f"{name}.alpha"] = torch.tensor(rank * alpha_ratio)
    return out


def write_test_loras(pipe: object, out: Path, *, rank: int = 4, seed: int = 0) -> dict[str, Path]:
    """`peft.safetensors` and `kohya.safetensors` in `out`: one seeded style, both layouts."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    matrices = random_lora(pipe, rank=rank, seed=seed)
    files = {"peft": out / "peft.safetensors", "kohya": out / "kohya.safetensors"}
    save_file(peft_tensors(matrices), str(files["peft"]))
    save_file(kohya_tensors(matrices), str(files["kohya"]))
    return files
