"""Stable Diffusion to ONNX: export each component, check it, prove parity, publish atomically.

The repository gets `stable_diffusion/1/weights`, a symlink to `weights-<version>/`, which
holds the ONNX files (weights as external data, so a 3 GB UNet exports like a tiny one), the
tokenizer, the scheduler config, `diffusers/` (the pipeline itself as safetensors, for the
`torch` runtime) and the manifest: what the model needs to run them, checked against the
model's `weights.schema.json` before anything is published. A pipeline with a safety
checker exports it too, with what the model needs to decide as diffusers does (`safety`);
one without exports as before, and the model then checks nothing. `torch_only` skips the ONNX
files (for a GPU that serves with torch and has no time to trace a 3 GB UNet). Everything is
written into a staging folder first; the symlink is swapped with one rename, so an
interrupted export leaves the previous weights in place.
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
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from export.components import COMPONENTS, ComponentSpec, components_of, torch_modules
from export.errors import ExportError
from export.geometry import ModelGeometry
from export.safety import safety_checker_entry
from export.source import load_pipeline, resolve_model
from export.triton_config import write_exported_config
from export.weights_schema import MANIFEST, WeightsSchema

log = logging.getLogger(__name__)

MODEL_NAME = "stable_diffusion"
MODEL_VERSION_DIR = "1"
WEIGHTS_LINK = "weights"
DIFFUSERS_DIR = "diffusers"
DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-3


def export_component(
    spec: ComponentSpec,
    module: torch.nn.Module,
    dims: dict[str, int],
    out_dir: Path,
    *,
    opset: int,
    vocab: int,
) -> Path:
    """Trace one component to `out_dir/<name>.onnx`, its weights in `<name>.onnx.data`."""
    scratch = out_dir / f".{spec.name}-trace"
    scratch.mkdir()
    traced = scratch / spec.filename
    inputs = spec.sample_inputs(dims, vocab=vocab)
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
    spec: ComponentSpec,
    module: torch.nn.Module,
    onnx_file: Path,
    cases: list[dict[str, int]],
    *,
    vocab: int,
) -> float:
    """Largest |ONNX Runtime - torch| over every output of every case."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    for i, dims in enumerate(cases):
        inputs = spec.sample_inputs(dims, vocab=vocab, seed=100 + i)
        with torch.no_grad():
            expected = module(*(torch.from_numpy(inputs[t.name]) for t in spec.inputs))
        if isinstance(expected, torch.Tensor):
            expected = (expected,)
        outputs = session.run([t.name for t in spec.outputs], inputs)
        for t, got, want in zip(spec.outputs, outputs, expected, strict=True):
            if got.shape != tuple(want.shape):
                raise ExportError(
                    f"{spec.name}: ONNX output {t.name} {got.shape} != torch {tuple(want.shape)}"
                )
            worst = max(worst, float(np.max(np.abs(got - want.numpy()))))
    return worst


def export_with_parity(
    pipe: Any, geometry: ModelGeometry, staging: Path, *, tolerance: float, opset: int
) -> dict[str, dict[str, float]]:
    """Every component as checked ONNX in `staging`; per component, the largest difference
    from torch on the parity cases. Raises ExportError above `tolerance`."""
    modules = torch_modules(pipe)
    cases = geometry.parity_cases()
    parity: dict[str, dict[str, float]] = {}
    for spec in components_of(pipe):
        log.info("exporting %s", spec.name)
        module = modules[spec.name]
        onnx_file = export_component(
            spec, module, cases[0], staging, opset=opset, vocab=geometry.vocab
        )
        diff = max_abs_difference(spec, module, onnx_file, cases, vocab=geometry.vocab)
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
    return parity


def content_version(folder: Path) -> str:
    """The first 12 hex digits of a SHA-256 over every file's path and bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def point_link(link: Path, target: Path) -> None:
    """Point the symlink `link` at `target` (relatively) in one rename: a reader sees the
    old target or the new one, never neither."""
    link_tmp = link.parent / f".{link.name}-{uuid.uuid4().hex}"
    link_tmp.symlink_to(os.path.relpath(target, link.parent))
    os.replace(link_tmp, link)


def publish(staging: Path, version_dir: Path, version: str) -> Path:
    """Move the staged export to its own folder and point `weights` at it in one rename."""
    final = version_dir / f"{WEIGHTS_LINK}-{version}-{uuid.uuid4().hex[:8]}"
    staging.rename(final)
    point_link(version_dir / WEIGHTS_LINK, final)
    for old in version_dir.glob(f"{WEIGHTS_LINK}-*"):
        if old != final:
            shutil.rmtree(old)
    return final


def build_manifest(
    schema: WeightsSchema,
    geometry: ModelGeometry,
    model: dict[str, str],
    *,
    torch_only: bool,
    parity: dict[str, dict[str, float]],
    opset: int,
    safety_checker: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The weights manifest: identity, files, and what the model needs to run them; with
    `safety_checker`, the safety checker's entry (`safety.safety_checker_entry`)."""
    manifest = {
        "format": schema.format_of(MANIFEST),
        "model": model,
        "runtime": "torch" if torch_only else "onnx",
        "contract": geometry.contract(),
        "vae": {"scaling_factor": geometry.scaling_factor},
        "dimensions": geometry.dimensions(),
        "tokenizer": "tokenizer",
        "scheduler_config": "scheduler/scheduler_config.json",
        "diffusers": DIFFUSERS_DIR,
        "components": {spec.name: spec.as_manifest() for spec in COMPONENTS},
        "parity": parity,
        "exported_with": {"torch": torch.__version__, "onnx": onnx.__version__, "opset": opset},
    }
    if safety_checker is not None:
        manifest["safety_checker"] = safety_checker
    return manifest


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
    model_dir = repository / MODEL_NAME
    version_dir = model_dir / MODEL_VERSION_DIR
    if not version_dir.is_dir():
        raise ExportError(f"{version_dir} does not exist: is {repository} the model repository?")
    schema = WeightsSchema.of_model(model_dir)
    pipe = load_pipeline(folder)
    geometry = ModelGeometry.of(pipe)
    staging = version_dir / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        parity = (
            {}
            if torch_only
            else export_with_parity(pipe, geometry, staging, tolerance=tolerance, opset=opset)
        )
        pipe.tokenizer.save_pretrained(staging / "tokenizer")
        pipe.scheduler.save_config(staging / "scheduler")
        # The pipeline itself, for the torch runtime (fp32 safetensors; it casts on load).
        pipe.save_pretrained(staging / DIFFUSERS_DIR, safe_serialization=True)
        version = content_version(staging)
        identity = {"name": name, "version": version, "source": model}
        manifest = build_manifest(
            schema,
            geometry,
            identity,
            torch_only=torch_only,
            parity=parity,
            opset=opset,
            safety_checker=None if pipe.safety_checker is None else safety_checker_entry(pipe),
        )
        manifest_file = staging / schema.manifest_file
        schema.check(MANIFEST, manifest, manifest_file)
        manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")
        final = publish(staging, version_dir, version)
        write_exported_config(model_dir)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)
        raise
    log.info("published %s (version %s)", final, version)
    return manifest
