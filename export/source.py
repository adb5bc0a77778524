"""Load a Stable Diffusion pipeline from a diffusers folder or a hub id, with clear errors.

The safety checker is optional: a folder whose model_index.json names one (with its
`safety_checker/` and `feature_extractor/` folders) loads with it, any other without it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from export.errors import ExportError

SUPPORTED_PIPELINES = frozenset({"StableDiffusionPipeline"})
REQUIRED_PARTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
SAFETY_PARTS = ("safety_checker", "feature_extractor")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def check_pipeline_folder(folder: Path) -> dict[str, Any]:
    """The folder's model_index.json, once it is known to describe a supported pipeline."""
    if not folder.is_dir():
        raise ExportError(f"model folder {folder} does not exist")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ExportError(
            f"{folder} is not a diffusers pipeline folder: it has no model_index.json"
        )
    index = json.loads(index_file.read_text())
    kind = index.get("_class_name")
    if kind not in SUPPORTED_PIPELINES:
        raise ExportError(
            f"{folder} holds a {kind!r}; supported: {', '.join(sorted(SUPPORTED_PIPELINES))}"
        )
    missing = [p for p in REQUIRED_PARTS if p not in index or not (folder / p).is_dir()]
    if missing:
        raise ExportError(f"{folder} lacks the pipeline parts {', '.join(missing)}")
    if has_safety_checker(index):
        absent = [p for p in SAFETY_PARTS if not (folder / p).is_dir()]
        if absent:
            raise ExportError(
                f"{folder}'s model_index.json names a safety checker but the folder lacks "
                f"{', '.join(absent)}"
            )
    return index


def has_safety_checker(index: dict[str, Any]) -> bool:
    """Whether a model_index.json names a safety checker and its feature extractor."""
    return all((index.get(part) or [None])[0] is not None for part in SAFETY_PARTS)


def resolve_model(model: str) -> tuple[Path, str]:
    """A local pipeline folder for `model` (a path or a hub id) and the model's name."""
    path = Path(model)
    if path.exists() or not HUB_ID.match(model):
        check_pipeline_folder(path)
        return path.resolve(), path.resolve().name
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(model, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
    except Exception as exc:  # network, auth, or unknown repo: all mean "cannot fetch it"
        raise ExportError(f"cannot download {model!r} from the model hub: {exc}") from exc
    check_pipeline_folder(local)
    return local, model.replace("/", "--")


def load_pipeline(folder: Path) -> Any:
    """The diffusers pipeline in float32 on the CPU, with eager attention for tracing; with
    its safety checker where the folder has one."""
    from diffusers import StableDiffusionPipeline

    index = check_pipeline_folder(folder)
    without = (
        {}
        if has_safety_checker(index)
        else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    )
    try:
        pipe = StableDiffusionPipeline.from_pretrained(folder, **without)
    except Exception as exc:  # corrupt weights or configs that diffusers rejects
        raise ExportError(f"diffusers cannot load {folder}: {exc}") from exc
    pipe.text_encoder.config._attn_implementation = "eager"
    if pipe.safety_checker is not None:
        pipe.safety_checker.vision_model.config._attn_implementation = "eager"
    return pipe
