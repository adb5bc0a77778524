"""Stable Diffusion to ONNX: export each component, check it, prove parity, publish atomically.

The repository gets `stable_diffusion/1/weights`, a symlink to `weights-<version>/`, which
holds the ONNX files (weights as external data, so a 3 GB UNet exports like a tiny one), the
tokenizer, the scheduler config, `diffusers/` (the pipeline itself as safetensors, for the
`torch` runtime) and `manifest.json`, the contract with the serving side. `torch_only` skips
the ONNX files (for a GPU that serves with torch and has no time to trace a 3 GB UNet).
Everything is written into a staging folder first; the symlink is swapped with one rename, so
an interrupted export leaves the previous weights in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from export.components import (
    BATCH,
    COMPONENTS,
    HIDDEN,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    LATENT_CHANNELS,
    LATENT_HEIGHT,
    LATENT_WIDTH,
    SEQUENCE,
    UNET_BATCH,
    ComponentSpec,
    torch_modules,
)
from export.errors import ExportError
from export.source import load_pipeline, resolve_model
from export.triton_config import write_exported_config

log = logging.getLogger(__name__)

MODEL_NAME = "stable_diffusion"
MODEL_VERSION_DIR = "1"
WEIGHTS_LINK = "weights"
MANIFEST = "manifest.json"
DIFFUSERS_DIR = "diffusers"
MANIFEST_FORMAT = 1
DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-3


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
            size_multiple=vae_scale * 2 ** (len(unet.down_block_types) - 1),
            default_size=unet.sample_size * vae_scale,
            scaling_factor=float(vae.scaling_factor),
        )

    def dims(self, batch: int, height: int, width: int, *, guided: bool = True) -> dict[str, int]:
        """Concrete sizes for every symbolic dimension, for images of height x width."""
        return {
            BATCH: batch,
            UNET_BATCH: 2 * batch if guided else batch,
            SEQUENCE: self.sequence,
            HIDDEN: self.hidden,
            LATENT_CHANNELS: self.latent_channels,
            LATENT_HEIGHT: height // self.vae_scale_factor,
            LATENT_WIDTH: width // self.vae_scale_factor,
            IMAGE_HEIGHT: height,
            IMAGE_WIDTH: width,
            "vocab": self.vocab,
        }

    def parity_cases(self) -> list[dict[str, int]]:
        """Two shapes: the default square size at batch 2, a taller non-square one at batch 1."""
        size = self.default_size
        return [self.dims(2, size, size), self.dims(1, size + self.size_multiple, size)]


def export_component(
    spec: ComponentSpec, module: torch.nn.Module, dims: dict[str, int], out_dir: Path, opset: int
) -> Path:
    """Trace one component to `out_dir/<name>.onnx`, its weights in `<name>.onnx.data`."""
    scratch = out_dir / f".{spec.name}-trace"
    scratch.mkdir()
    traced = scratch / spec.filename
    inputs = spec.sample_inputs(dims)
    args = tuple(torch.from_numpy(inputs[t.name]) for t in spec.inputs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings on shape asserts; parity checks below
        torch.onnx.export(
            module,
            args,
            str(traced),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=spec.dynamic_axes(),
            opset_version=opset,
            dynamo=False,
        )
    model = onnx.load(str(traced))  # pulls in external data a >2 GB export had to write
    target = out_dir / spec.filename
    onnx.save_model(
        model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{spec.filename}.data",
        size_threshold=1024,
    )
    shutil.rmtree(scratch)
    onnx.checker.check_model(str(target), full_check=True)
    return target


def max_abs_difference(
    spec: ComponentSpec, module: torch.nn.Module, onnx_file: Path, cases: list[dict[str, int]]
) -> float:
    """Largest |ONNX Runtime - torch| over every output of every case."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    for i, dims in enumerate(cases):
        inputs = spec.sample_inputs(dims, seed=100 + i)
        with torch.no_grad():
            expected = module(*(torch.from_numpy(inputs[t.name]) for t in spec.inputs))
        (got,) = session.run([t.name for t in spec.outputs], inputs)
        if got.shape != tuple(expected.shape):
            raise ExportError(
                f"{spec.name}: ONNX output {got.shape} != torch {tuple(expected.shape)}"
            )
        worst = max(worst, float(np.max(np.abs(got - expected.numpy()))))
    return worst


def content_version(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def publish(staging: Path, version_dir: Path, version: str) -> Path:
    """Move the staged export to its own folder and point `weights` at it in one rename."""
    final = version_dir / f"{WEIGHTS_LINK}-{version}-{uuid.uuid4().hex[:8]}"
    staging.rename(final)
    link_tmp = version_dir / f".{WEIGHTS_LINK}-{uuid.uuid4().hex}"
    link_tmp.symlink_to(final.name)
    os.replace(link_tmp, version_dir / WEIGHTS_LINK)
    for old in version_dir.glob(f"{WEIGHTS_LINK}-*"):
        if old != final:
            shutil.rmtree(old)
    return final


def export_onnx(
    model: str,
    repository: Path,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int = DEFAULT_OPSET,
    torch_only: bool = False,
) -> dict[str, Any]:
    """Export `model` into `repository` and return the manifest written beside the files."""
    folder, name = resolve_model(model)
    version_dir = repository / MODEL_NAME / MODEL_VERSION_DIR
    if not version_dir.is_dir():
        raise ExportError(f"{version_dir} does not exist: is {repository} the model repository?")
    pipe = load_pipeline(folder)
    geometry = ModelGeometry.of(pipe)
    modules = torch_modules(pipe)
    staging = version_dir / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        parity: dict[str, dict[str, float]] = {}
        cases = geometry.parity_cases()
        for spec in () if torch_only else COMPONENTS:
            log.info("exporting %s", spec.name)
            onnx_file = export_component(spec, modules[spec.name], cases[0], staging, opset)
            diff = max_abs_difference(spec, modules[spec.name], onnx_file, cases)
            parity[spec.name] = {"max_abs_diff": diff, "tolerance": tolerance}
            log.info(
                "parity %s: max |onnxruntime - torch| = %.3g (tolerance %.3g)",
                spec.name,
                diff,
                tolerance,
            )
            if not diff <= tolerance:
                raise ExportError(
                    f"{spec.name}: ONNX Runtime differs from torch by {diff:.3g}, "
                    f"above the tolerance {tolerance:.3g}"
                )
        pipe.tokenizer.save_pretrained(staging / "tokenizer")
        pipe.scheduler.save_config(staging / "scheduler")
        # The pipeline itself, for the torch runtime (fp32 safetensors; it casts on load).
        pipe.save_pretrained(staging / DIFFUSERS_DIR, safe_serialization=True)
        version = content_version(staging)
        manifest = {
            "format": MANIFEST_FORMAT,
            "model": {"name": name, "version": version, "source": model},
            "runtime": "torch" if torch_only else "onnx",
            "geometry": {
                "sequence": geometry.sequence,
                "hidden": geometry.hidden,
                "latent_channels": geometry.latent_channels,
                "vae_scale_factor": geometry.vae_scale_factor,
                "vae_scaling_factor": geometry.scaling_factor,
                "size_multiple": geometry.size_multiple,
                "default_size": geometry.default_size,
            },
            "tokenizer": "tokenizer",
            "scheduler_config": "scheduler/scheduler_config.json",
            "diffusers": DIFFUSERS_DIR,
            "components": {spec.name: spec.as_manifest() for spec in COMPONENTS},
            "parity": parity,
            "exported_with": {"torch": torch.__version__, "onnx": onnx.__version__, "opset": opset},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        final = publish(staging, version_dir, version)
        write_exported_config(version_dir.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)
        raise
    log.info("published %s (version %s)", final, version)
    return manifest
