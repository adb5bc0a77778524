"""A LoRA file as studios have it, read safely and brought to one form.

Two layouts arrive: diffusers/PEFT safetensors (what `save_lora_weights` writes:
`unet.<module>.lora_A.weight`, or the older `lora.down`/`lora.up` and `lora_linear_layer`
spellings) and kohya safetensors (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`,
`.alpha`, `lora_te_...`). diffusers' own converters do the renaming
(`StableDiffusionPipeline.lora_state_dict`, which applies
`_convert_non_diffusers_lora_to_diffusers` to kohya keys, then
`convert_all_state_dict_to_peft`). Only safetensors are read: a pickle (`.ckpt`, `.pt`,
`.bin`, ...) is refused by its name and by its first bytes, never unpickled.

The one form (`LoraWeights.tensors`): PEFT keys `<component>.<module>.lora_A.weight` and
`.lora_B.weight`, component `unet` or `text_encoder`, float32, with each module's scale
alpha/rank folded into `lora_B`, so a module's weight delta is `lora_B @ lora_A` times the
style weight.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from export.errors import ExportError

COMPONENTS = ("unet", "text_encoder")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
# kohya names its modules lora_unet_* and lora_te_* (lora_te1_/lora_te2_ for SDXL).
KOHYA_PREFIXES = ("lora_unet_", "lora_te_")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
LORA_KEY = re.compile(r"lora[._](A|B|up|down)\b|lora_linear_layer|\.alpha$")


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA in the one form (module docstring), with what its source said: `source_format`
    (`peft` or `kohya`), `rank` (the largest module rank) and `alphas` (the distinct alpha
    values applied; a module the file gives no alpha for has alpha = its rank)."""

    tensors: dict[str, torch.Tensor]
    source_format: str
    rank: int
    alphas: tuple[float, ...]

    def modules(self) -> list[tuple[str, str]]:
        """(component, module name) of every adapted module, sorted."""
        found = []
        for key in self.tensors:
            if key.endswith(LORA_A):
                component, _, module = key[: -len(LORA_A)].partition(".")
                found.append((component, module))
        return sorted(found)


def refuse_pickle(path: Path) -> None:
    """ExportError for a pickle file, by its suffix or its first bytes (pickle's protocol
    byte 0x80, or the zip container torch.save writes)."""
    with path.open("rb") as f:
        head = f.read(4)
    if path.suffix.lower() in PICKLE_SUFFIXES or head[:1] == b"\x80" or head == b"PK\x03\x04":
        raise ExportError(
            f"{path} is a pickle file (.ckpt/.pt/.bin): pickles can run code when loaded, so "
            "styles are taken as safetensors only; convert it where it was trained "
            "(safetensors.torch.save_file) and add the .safetensors file"
        )


def check_safetensors_layout(path: Path) -> None:
    """ExportError unless `path` is a whole safetensors file: an 8-byte header length, a
    JSON header, and as many bytes of tensors as the header's offsets say."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ExportError(f"{path} is not a safetensors file: {size} bytes, no header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise ExportError(
                f"{path} is truncated or not a safetensors file: its header claims "
                f"{header_len} bytes, the file has {size}"
            )
        try:
            header = json.loads(f.read(header_len))
            ends = [int(e["data_offsets"][1]) for k, e in header.items() if k != "__metadata__"]
        except (UnicodeDecodeError, ValueError, AttributeError, LookupError, TypeError) as exc:
            raise ExportError(f"{path} is not a safetensors file: {exc!r}") from exc
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise ExportError(
            f"{path} is truncated: its header describes {expected} bytes, the file has {size}"
        )


def adapter_metadata(path: Path) -> dict[str, Any]:
    """The LoraConfig values diffusers' save_lora_weights stores in the safetensors header
    (`lora_adapter_metadata`: `unet.lora_alpha`, `unet.alpha_pattern`, ...); empty when
    the file has none."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: its {ADAPTER_METADATA_KEY} is not JSON: {exc}") from exc
    return metadata if isinstance(metadata, dict) else {}


def metadata_alpha(metadata: dict[str, Any], module_key: str) -> float | None:
    """A module's alpha from adapter metadata, as PEFT reads a LoraConfig: the
    `alpha_pattern` entry whose pattern ends the module's name, else `lora_alpha`."""
    component, _, module = module_key.partition(".")
    patterns = metadata.get(f"{component}.alpha_pattern") or {}
    for pattern, alpha in patterns.items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return float(alpha)
    alpha = metadata.get(f"{component}.lora_alpha")
    return None if alpha is None else float(alpha)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after the pickle and layout checks."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ExportError(f"{path} does not exist")
    refuse_pickle(path)
    check_safetensors_layout(path)
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise ExportError(f"{path} is not a readable safetensors file: {exc}") from exc


def source_format(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """`kohya` or `peft`; ExportError for a file with no LoRA tensors (a full checkpoint,
    an embedding, ...)."""
    lora_keys = [k for k in tensors if LORA_KEY.search(k)]
    if not lora_keys:
        shown = ", ".join(sorted(tensors)[:3]) or "no tensors"
        raise ExportError(
            f"{path} is not a LoRA: none of its {len(tensors)} tensors is a LoRA matrix "
            f"(lora_A/lora_B, lora_down/lora_up); first keys: {shown}"
        )
    if all(k.startswith(KOHYA_PREFIXES) for k in tensors):
        return "kohya"
    return "peft"


def to_peft(tensors: dict[str, torch.Tensor], path: Path) -> tuple[dict, dict[str, float]]:
    """PEFT-keyed tensors and the alphas by module key (`<component>.<module>`), by
    diffusers' converters, each component as diffusers' loaders convert it."""
    from diffusers import StableDiffusionPipeline

    diffusers_log = logging.getLogger("diffusers")
    level = diffusers_log.level
    diffusers_log.setLevel(logging.ERROR)
    try:
        state, alphas = StableDiffusionPipeline.lora_state_dict(dict(tensors))
        parts = {c: {k: v for k, v in state.items() if k.startswith(c + ".")} for c in COMPONENTS}
        other = sorted(set(state) - {k for part in parts.values() for k in part})
        if other:
            raise ExportError(
                f"{path}: tensors for neither the UNet nor the text encoder: {', '.join(other[:5])}"
            )
        peft = {}
        for component, part in parts.items():
            peft.update(convert_component(component, part))
        alpha_by_module = alpha_modules(dict(alphas or {}))
    except ValueError as exc:
        raise ExportError(f"{path}: diffusers cannot read it as a LoRA: {exc}") from exc
    finally:
        diffusers_log.setLevel(level)
    stray = [k for k in peft if not k.endswith((LORA_A, LORA_B))]
    if stray:
        raise ExportError(f"{path}: tensors that are not LoRA matrices: {', '.join(stray[:5])}")
    return peft, alpha_by_module


def convert_component(component: str, state: dict[str, torch.Tensor]) -> dict:
    """`state` (one component's diffusers-named tensors) in PEFT's naming, converted as
    diffusers' loaders convert that component."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if not state:
        return {}
    if component == "unet":
        return convert_unet_state_dict_to_peft(state)
    return convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))


def alpha_modules(alphas: dict[str, float]) -> dict[str, float]:
    """Alpha by `<component>.<module>` (PEFT's naming), from diffusers' alpha keys:
    `unet.<module>.alpha`, or the down matrix's key plus `.alpha`
    (`...self_attn.to_k_lora.down.weight.alpha`), renamed by the same converters the matrix
    went through (a component's keys together: the converters infer the naming from the set)."""
    by_module: dict[str, float] = {}
    for component in COMPONENTS:
        matrix_keys: dict[str, float] = {}
        for key, alpha in alphas.items():
            if not key.startswith(component + "."):
                continue
            base = key.removesuffix(".alpha")
            if base.endswith("down.weight"):
                matrix_keys[base] = float(alpha)
            else:
                by_module[base] = float(alpha)
        converted = convert_component(component, {k: torch.zeros(1) for k in matrix_keys})
        for new_key, alpha in zip(converted, matrix_keys.values(), strict=True):
            by_module[new_key.removesuffix(LORA_A)] = alpha
    return by_module


def fold_scales(
    peft: dict[str, torch.Tensor],
    alphas: dict[str, float],
    path: Path,
    metadata: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The one form: float32, every module's lora_B times alpha/rank (alpha from the file's
    alpha tensors, else its adapter metadata, else rank), keys checked to pair up and to name
    a known component."""
    unmatched = sorted(set(alphas) - {k[: -len(LORA_A)] for k in peft if k.endswith(LORA_A)})
    if unmatched:
        raise ExportError(f"{path}: alphas for modules without matrices: {unmatched[:3]}")
    folded: dict[str, torch.Tensor] = {}
    for key_a in sorted(k for k in peft if k.endswith(LORA_A)):
        module_key = key_a[: -len(LORA_A)]
        key_b = module_key + LORA_B
        if key_b not in peft:
            raise ExportError(f"{path}: {module_key} has lora_A but no lora_B")
        component = module_key.partition(".")[0]
        if component not in COMPONENTS:
            raise ExportError(
                f"{path}: {module_key} adapts {component!r}; a Stable Diffusion 1.x style "
                f"adapts {' and '.join(COMPONENTS)} only"
            )
        a, b = peft[key_a].float(), peft[key_b].float()
        rank = a.shape[0]
        alpha = alphas.get(module_key)
        if alpha is None and metadata:
            alpha = metadata_alpha(metadata, module_key)
        if alpha is None:
            alpha = float(rank)
        alphas[module_key] = alpha
        folded[key_a] = a.contiguous()
        folded[key_b] = (b * (alpha / rank)).contiguous()
    if sum(1 for k in peft if k.endswith(LORA_B)) != len(folded) // 2:
        raise ExportError(f"{path}: some lora_B has no lora_A")
    return folded


def read_lora(path: Path) -> LoraWeights:
    """The LoRA in `path`, read safely, converted by diffusers and scale-folded."""
    tensors = read_tensors(path)
    fmt = source_format(tensors, path)
    peft, alphas = to_peft(tensors, path)
    metadata = adapter_metadata(path)
    folded = fold_scales(peft, alphas, path, metadata)
    if not folded:
        raise ExportError(f"{path} is not a LoRA: no module has both lora_A and lora_B")
    rank = max(t.shape[0] for k, t in folded.items() if k.endswith(LORA_A))
    return LoraWeights(folded, fmt, rank, tuple(sorted(set(alphas.values()))))
