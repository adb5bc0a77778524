"""Load a Stable Diffusion pipeline from a diffusers folder or a hub id, with clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from export.errors import ExportError

SUPPORTED_PIPELINES = frozenset({"StableDiffusionPipeline"})
REQUIRED_PARTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
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
    return index


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
    """The diffusers pipeline in float32 on the CPU, with eager attention for tracing."""
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            folder, safety_checker=None, requires_safety_checker=False
        )
    except Exception as exc:  # corrupt weights or configs that diffusers rejects
        raise ExportError(f"diffusers cannot load {folder}: {exc}") from exc
    pipe.text_encoder.config._attn_implementation = "eager"
    return pipe
