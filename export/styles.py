"""Studio styles: LoRAs checked against the exported base model and published beside it.

`stable_diffusion/styles/<name>` (a symlink, swapped in one rename) points at
`styles/.versions/<name>-<version>-<random>/`, which holds `lora.safetensors` (the LoRA in
`lora_files`' one form: PEFT keys named as the base model's modules, scale folded into
lora_B) and `style.json` (`$defs/style` of the model's weights schema, checked before it is
published; the schema names both files): the name, the content version (a hash of the
converted tensors), rank, alphas, source format, module count and the base model's name
and version. A LoRA is refused unless every module it adapts exists in the published base
model with a weight its matrices fit (a LoRA trained for another architecture fails here,
naming a module).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from export.errors import ExportError
from export.lora_files import LORA_A, LORA_B, LoraWeights, read_lora
from export.onnx_export import point_link
from export.weights_schema import STYLE, WeightsSchema

MODEL_NAME = "stable_diffusion"
STYLES_DIR = "styles"
VERSIONS_DIR = ".versions"
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def base_parameter_shapes(weights: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """component -> parameter name -> shape of the published base model's UNet and text
    encoder, built on the meta device from their configs (no weights read)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    source = weights / json.loads((weights / "manifest.json").read_text())["diffusers"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(source / "unet"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(source / "text_encoder"))
    return {
        component: {name: tuple(p.shape) for name, p in module.named_parameters()}
        for component, module in (("unet", unet), ("text_encoder", text))
    }


def module_in_base(module: str, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The base model's name for `module`: itself, or without the `text_model.` prefix that
    kohya files keep and newer transformers' CLIP text model lacks (as diffusers strips it)."""
    for name in (module, module.removeprefix("text_model.")):
        if f"{name}.weight" in shapes:
            return name
    return None


def fits(weight: tuple[int, ...], a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether lora_B @ lora_A has `weight`'s shape: A rank x in (x kernel), B out x rank
    (x 1 x 1)."""
    if len(a) != len(weight) or len(b) != len(weight) or a[0] != b[1]:
        return False
    return a[1:] == weight[1:] and b[0] == weight[0] and all(d == 1 for d in b[2:])


def match_base(lora: LoraWeights, weights: Path, origin: Path) -> dict[str, torch.Tensor]:
    """The LoRA's tensors keyed by the base model's module names; ExportError naming the
    first module the base model lacks or whose weight the matrices do not fit."""
    shapes = base_parameter_shapes(weights)
    matched: dict[str, torch.Tensor] = {}
    for component, module in lora.modules():
        a = lora.tensors[f"{component}.{module}{LORA_A}"]
        b = lora.tensors[f"{component}.{module}{LORA_B}"]
        name = module_in_base(module, shapes[component])
        if name is None:
            raise ExportError(
                f"{origin} was not trained for this base model: its {component} module "
                f"{module} does not exist here"
            )
        weight = shapes[component][f"{name}.weight"]
        if not fits(weight, tuple(a.shape), tuple(b.shape)):
            raise ExportError(
                f"{origin} was not trained for this base model: {component} {name} has a "
                f"weight of shape {list(weight)}, the LoRA's matrices are A {list(a.shape)} "
                f"and B {list(b.shape)}"
            )
        matched[f"{component}.{name}{LORA_A}"] = a
        matched[f"{component}.{name}{LORA_B}"] = b
    return matched


def tensors_version(tensors: dict[str, torch.Tensor]) -> str:
    """The first 12 hex digits of a SHA-256 over every tensor's name, shape and bytes."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        digest.update(f"{key}:{list(t.shape)}:{t.dtype}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:12]


def check_name(name: str) -> str:
    """`name` if it can name a style (in prompts and folders); ExportError otherwise."""
    if not NAME.match(name):
        raise ExportError(
            f"style name {name!r}: use 1 to 64 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name


def published_weights(repository: Path) -> Path:
    """The published base weights folder; ExportError when nothing was exported yet."""
    weights = repository / MODEL_NAME / "1" / "weights"
    if not (weights / "manifest.json").is_file():
        raise ExportError(
            f"{weights} holds no exported model: run `python -m export onnx` before adding styles"
        )
    return weights


def style_manifest(
    schema: WeightsSchema, name: str, lora: LoraWeights, version: str, base: dict[str, Any]
) -> dict:
    """style.json's content (`$defs/style` of the model's weights schema)."""
    return {
        "format": schema.format_of(STYLE),
        "name": name,
        "version": version,
        "file": schema.style_weights_file,
        "rank": lora.rank,
        "alphas": list(lora.alphas),
        "source_format": lora.source_format,
        "modules": len(lora.modules()),
        "scale_folded": True,
        "base_model": {"name": base["name"], "version": base["version"]},
    }


def publish_style(styles: Path, name: str, staging: Path, version: str) -> Path:
    """Move `staging` under `.versions/` and point `styles/<name>` at it in one rename; the
    folder it pointed at before is removed."""
    versions = styles / VERSIONS_DIR
    final = versions / f"{name}-{version}-{uuid.uuid4().hex[:8]}"
    staging.rename(final)
    link = styles / name
    previous = link.resolve() if link.is_symlink() else None
    point_link(link, final)
    if previous is not None and previous != final.resolve():
        shutil.rmtree(previous, ignore_errors=True)
    return final


def add_style(repository: Path, name: str, lora_file: Path) -> dict[str, Any]:
    """Check `lora_file` against the published base model and publish it as style `name`
    (replacing a style of that name); the style's manifest."""
    from safetensors.torch import save_file

    check_name(name)
    weights = published_weights(repository)
    base = json.loads((weights / "manifest.json").read_text())["model"]
    lora = read_lora(lora_file)
    tensors = match_base(lora, weights, lora_file)
    version = tensors_version(tensors)
    schema = WeightsSchema.of_model(repository / MODEL_NAME)
    manifest = style_manifest(schema, name, lora, version, base)
    styles = repository / MODEL_NAME / STYLES_DIR
    (styles / VERSIONS_DIR).mkdir(parents=True, exist_ok=True)
    staging = styles / VERSIONS_DIR / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        save_file(tensors, str(staging / schema.style_weights_file), metadata={"style": name})
        manifest_file = staging / schema.style_manifest_file
        schema.check(STYLE, manifest, manifest_file)
        manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")
        publish_style(styles, name, staging, version)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)
        raise
    return manifest


def list_styles(repository: Path) -> list[dict[str, Any]]:
    """Every published style's manifest, by name."""
    styles = repository / MODEL_NAME / STYLES_DIR
    if not styles.is_dir():
        return []
    manifest_file = WeightsSchema.of_model(repository / MODEL_NAME).style_manifest_file
    return [
        json.loads((link / manifest_file).read_text())
        for link in sorted(styles.iterdir())
        if link.is_symlink() and (link / manifest_file).is_file()
    ]


def remove_style(repository: Path, name: str) -> None:
    """Unpublish style `name` (the link goes in one step, then its folder)."""
    link = repository / MODEL_NAME / STYLES_DIR / check_name(name)
    if not link.is_symlink():
        raise ExportError(f"no style named {name!r} in {link.parent}")
    target = link.resolve()
    link.unlink()
    shutil.rmtree(target, ignore_errors=True)
