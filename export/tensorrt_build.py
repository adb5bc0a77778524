"""`python -m export tensorrt`: fp16 TensorRT engines from the published ONNX files.

For each component (text encoder, UNet, VAE decoder and encoder) this builds a plan from
`weights/<component>.onnx` into the weights' engines folder and records it in the engine
manifest; the file names and the manifest's shape come from the model's
`weights.schema.json`, which the manifest is validated against before it is written (the
model reads that file, never this package). Each entry names the GPU it was built on, as
data: compute capability and TensorRT version. A plan runs only there, so engines for
several GPUs may sit side by side (a plan's file name carries a key such as
`sm75-trt10.5.0.18`) and the model picks its own or refuses, naming both.

Optimisation profiles: see `export.tensorrt_profiles`.

What is verified where: everything but `build_engine` (profiles, names, the engine manifest
and its validation, the argument checks, the clear failure without TensorRT or a GPU) is
tested on the CPU (tests/test_tensorrt_plan.py). `build_engine` is written against TensorRT
10's documented Python API; it runs only where TensorRT and a CUDA GPU exist, and this
repository's CI has neither.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from export.components import COMPONENTS, ComponentSpec
from export.errors import ExportError
from export.tensorrt_profiles import Profile, ProfilePlan, Size, profiles, profiles_as_manifest
from export.triton_config import EXPORTED_CONFIG, config_parameters, read_config
from export.weights_schema import ENGINES, MANIFEST, WeightsSchema

log = logging.getLogger(__name__)

PRECISION = "fp16"
DEFAULT_TIMING_CACHE_DIR = Path("var/tensorrt")


@dataclass(frozen=True)
class GpuIdentity:
    """The GPU a plan is built on: the plan runs only on this compute capability with this
    TensorRT version."""

    compute_capability: tuple[int, int]
    tensorrt: str  # tensorrt.__version__, e.g. 10.5.0.18
    name: str  # e.g. Tesla T4, for the record

    @property
    def key(self) -> str:
        """`sm75-trt10.5.0.18`: this export's naming of plans and timing caches."""
        major, minor = self.compute_capability
        return f"sm{major}{minor}-trt{self.tensorrt}"

    def as_manifest(self) -> dict[str, Any]:
        """The identity as engine entries record it (and the model compares)."""
        return {"compute_capability": list(self.compute_capability), "tensorrt": self.tensorrt}


@dataclass(frozen=True)
class EnginePlan:
    """Everything a build needs but TensorRT: where, what from, and the profiles."""

    schema: WeightsSchema
    weights: Path
    manifest: dict[str, Any]
    plan: ProfilePlan

    def profiles(self) -> dict[str, list[Profile]]:
        """Each component's optimisation profiles."""
        dimensions = self.manifest["dimensions"]
        return {spec.name: profiles(spec, dimensions, self.plan) for spec in COMPONENTS}


def engine_entry(
    spec: ComponentSpec, gpu: GpuIdentity, file: str, built: list[Profile], info: dict[str, Any]
) -> dict[str, Any]:
    """One plan as the engine manifest records it."""
    return {
        "component": spec.name,
        "gpu": gpu.as_manifest(),
        "file": file,
        "precision": PRECISION,
        "profiles": profiles_as_manifest(built),
        "built": info,
    }


def _slot(entry: dict[str, Any]) -> tuple[tuple[int, ...], str, str]:
    gpu = entry["gpu"]
    return (tuple(gpu["compute_capability"]), gpu["tensorrt"], entry["component"])


def merge_engine_manifest(
    existing: dict[str, Any] | None,
    model: dict[str, Any],
    entries: list[dict[str, Any]],
    *,
    format_version: int,
) -> dict[str, Any]:
    """The engine manifest with `entries` replacing those of the same component and GPU.

    Engines for other GPUs stay (a T4 and an A10G may share a weights folder); engines built
    from other weights (another model version) or recorded in another format are dropped.
    """
    old = []
    if (
        existing
        and existing.get("format") == format_version
        and existing.get("model", {}).get("version") == model["version"]
    ):
        replaced = {_slot(e) for e in entries}
        old = [e for e in existing["engines"] if _slot(e) not in replaced]
    return {
        "format": format_version,
        "model": {"name": model["name"], "version": model["version"]},
        "engines": sorted([*old, *entries], key=_slot),
    }


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` through a scratch file and one rename: readers see old or new."""
    scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    scratch.write_bytes(data)
    os.replace(scratch, path)


def model_limits(model_dir: Path) -> dict[str, int]:
    """max_batch_size, min_size and max_size from the config Triton loads."""
    exported = model_dir / "configs" / f"{EXPORTED_CONFIG}.pbtxt"
    path = exported if exported.is_file() else model_dir / "config.pbtxt"
    config = read_config(path)
    params = config_parameters(config)
    limits = {"max_batch_size": config.max_batch_size}
    for name in ("min_size", "max_size"):
        if name not in params:
            raise ExportError(f"{path} lacks the parameter {name}")
        try:
            limits[name] = int(params[name])
        except ValueError as exc:
            raise ExportError(
                f"{path}: parameter {name} {params[name]!r} is not an integer"
            ) from exc
    return limits


def require_tensorrt() -> tuple[Any, GpuIdentity]:
    """(tensorrt module, this GPU), or an ExportError that says what is missing."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ExportError(
            "TensorRT is not installed: `pip install tensorrt` (10.x) on the machine with the "
            "target GPU; engines must be built on the GPU they will serve on"
        ) from exc
    import torch

    if not torch.cuda.is_available():
        raise ExportError(
            "no CUDA GPU: TensorRT builds engines for the GPU it runs on; run "
            "`python -m export tensorrt` on the serving GPU (torch sees none here)"
        )
    capability = torch.cuda.get_device_capability()
    gpu = GpuIdentity(capability, str(trt.__version__), torch.cuda.get_device_name())
    return trt, gpu


def build_engine(
    trt: Any,
    onnx_file: Path,
    built_profiles: list[Profile],
    timing_cache: Path,
    workspace_bytes: int,
    *,
    refittable: bool = False,
) -> bytes:
    """Serialized fp16 engine for `onnx_file` (TensorRT 10 Python API). Runs only where
    TensorRT and a CUDA GPU exist; this repository's CI has neither.

    The network is weakly typed with the FP16 builder flag: the ONNX files are fp32 (they
    match torch to 1e-6), and STRONGLY_TYPED would keep them fp32. TensorRT 10 networks are
    always explicit-batch (the EXPLICIT_BATCH flag is deprecated and ignored), so the
    creation flags are 0. The timing cache is read before and written after each build, so
    later builds (other components, other sizes, a rebuild) reuse the measured tactics.
    `refittable` sets the REFIT flag: the model can then refit the engine's weights in place
    (`trt.Refitter`), which is how it applies studio styles on runtime tensorrt.
    """
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so the parser finds `<name>.onnx.data` beside it.
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_file}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for built in built_profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in built.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_file} (see its log)")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def plan_engines(
    repository: Path,
    *,
    model_name: str = "stable_diffusion",
    max_batch_size: int | None = None,
    sizes: list[Size] | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    opt_batch: int | None = None,
) -> EnginePlan:
    """Everything a build needs but TensorRT, from the published weights and the config."""
    model_dir = repository / model_name
    schema = WeightsSchema.of_model(model_dir)
    weights = model_dir / "1" / "weights"
    manifest_file = weights / schema.manifest_file
    if not manifest_file.is_file():
        raise ExportError(f"{manifest_file} does not exist: run `python -m export onnx` first")
    manifest = json.loads(manifest_file.read_text())
    schema.check(MANIFEST, manifest, manifest_file)
    if manifest["runtime"] != "onnx":
        raise ExportError(f"{weights} holds no ONNX files (exported with --torch-only)")
    limits = model_limits(model_dir)
    contract = manifest["contract"]
    plan = ProfilePlan.make(
        max_batch_size=max_batch_size or limits["max_batch_size"],
        size_multiple=contract["size_multiple"],
        min_size=min_size if min_size is not None else limits["min_size"],
        max_size=max_size if max_size is not None else limits["max_size"],
        default_size=contract["default_size"],
        sizes=sizes,
        opt_batch=opt_batch,
    )
    return EnginePlan(schema, weights, manifest, plan)


def dry_run(planned: EnginePlan) -> dict[str, Any]:
    """What a build would make, without TensorRT: each component's profiles."""
    return {
        "model": planned.manifest["model"],
        "profiles": {
            name: profiles_as_manifest(built) for name, built in planned.profiles().items()
        },
    }


# The networks a studio style adapts: refittable engines for these with --refittable.
STYLED_COMPONENTS = ("unet", "text_encoder")


def build_engines(
    planned: EnginePlan,
    *,
    timing_cache: Path | None = None,
    workspace_gib: float = 4.0,
    refittable: bool = False,
) -> dict[str, Any]:
    """Build every component's engine for this GPU; write and return the engine manifest.
    With `refittable`, the UNet's and text encoder's engines can take a style's weights.

    The manifest is validated before the first (long) build, and written after the last.
    """
    trt, gpu = require_tensorrt()
    schema = planned.schema
    engines_dir = planned.weights / schema.engines_dir
    manifest_file = engines_dir / schema.engine_manifest_file
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")  # noqa: UP017 (3.10)
    info = {"gpu_name": gpu.name, "started_at": started}
    all_profiles = planned.profiles()
    files = {spec.name: schema.plan_file(spec.name, gpu.key) for spec in COMPONENTS}
    entries = [
        engine_entry(spec, gpu, files[spec.name], all_profiles[spec.name], info)
        for spec in COMPONENTS
    ]
    existing = json.loads(manifest_file.read_text()) if manifest_file.is_file() else None
    engine_manifest = merge_engine_manifest(
        existing, planned.manifest["model"], entries, format_version=schema.format_of(ENGINES)
    )
    schema.check(ENGINES, engine_manifest, manifest_file)
    engines_dir.mkdir(exist_ok=True)
    cache = timing_cache or DEFAULT_TIMING_CACHE_DIR / f"timing.{gpu.key}.cache"
    for spec in COMPONENTS:
        log.info(
            "building %s for %s (%d profiles)", spec.name, gpu.key, len(all_profiles[spec.name])
        )
        plan_bytes = build_engine(
            trt,
            planned.weights / spec.filename,
            all_profiles[spec.name],
            cache,
            int(workspace_gib * (1 << 30)),
            refittable=refittable and spec.name in STYLED_COMPONENTS,
        )
        write_atomic(engines_dir / files[spec.name], plan_bytes)
    write_atomic(manifest_file, (json.dumps(engine_manifest, indent=2) + "\n").encode())
    return engine_manifest
