"""`python -m export tensorrt`: fp16 TensorRT engines from the published ONNX files.

For each component (text encoder, UNet, VAE decoder) this builds
`weights/engines/<component>.<gpu-key>.plan` from `weights/<component>.onnx` and records it
in `weights/engines/engines.json` (the engine manifest the model reads; it never imports
this package). `gpu-key` is `sm<major><minor>-trt<major.minor.patch>`: a plan runs only on
the GPU architecture and TensorRT version that built it, so engines for several GPUs may
sit side by side and the model picks its own or refuses with both keys in the message.

Optimisation profiles come from `ComponentSpec.profile(low, opt, high)`: batch 1 to the
model config's max_batch_size (the text encoder and the UNet see twice the rows of a guided
batch: prompts and negative prompts, unconditional and conditional latents), and either one
dynamic profile over min_size..max_size or one profile per `--sizes` entry.

What is verified where: everything but `build_engine` (profiles, names, the engine manifest,
the argument checks, the clear failure without TensorRT or a GPU) is tested on the CPU
(tests/test_tensorrt_plan.py). `build_engine` is written against TensorRT 10's documented
Python API and runs only where TensorRT and a CUDA GPU are installed; no machine this
project has used so far has TensorRT, so it has not been run yet.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
)
from export.errors import ExportError

log = logging.getLogger(__name__)

ENGINES_DIR = "engines"
ENGINE_MANIFEST = "engines.json"
ENGINE_MANIFEST_FORMAT = 1
PRECISION = "fp16"
DEFAULT_TIMING_CACHE_DIR = Path("var/tensorrt")

Size = tuple[int, int]  # (width, height) in pixels


def gpu_key(major: int, minor: int, tensorrt_version: str) -> str:
    """`sm75-trt10.5.0`. The model side has its own copy (sd_engines.gpu_key); a test
    checks that the two agree."""
    parts = tensorrt_version.split(".")
    if len(parts) < 3 or not all(p.isdigit() for p in parts[:3]):
        raise ExportError(f"TensorRT version {tensorrt_version!r} is not major.minor.patch")
    return f"sm{major}{minor}-trt{'.'.join(parts[:3])}"


def engine_filename(component: str, key: str) -> str:
    return f"{component}.{key}.plan"


def parse_sizes(text: str) -> list[Size]:
    """'512x512,768x512' -> [(512, 512), (768, 512)] as (width, height)."""
    sizes = []
    for item in text.split(","):
        try:
            width, height = (int(v) for v in item.strip().lower().split("x"))
        except ValueError as exc:
            raise ExportError(f"size {item!r} is not WIDTHxHEIGHT, e.g. 512x512") from exc
        sizes.append((width, height))
    return sizes


@dataclass(frozen=True)
class ProfilePlan:
    """What to build for: batches, and either a size range or a list of fixed sizes."""

    max_batch_size: int
    opt_batch: int
    size_multiple: int
    min_size: int
    max_size: int
    opt_size: Size
    sizes: tuple[Size, ...] = ()  # empty: one dynamic profile over min_size..max_size

    @classmethod
    def make(
        cls,
        *,
        max_batch_size: int,
        size_multiple: int,
        min_size: int,
        max_size: int,
        default_size: int,
        sizes: list[Size] | None = None,
        opt_batch: int | None = None,
    ) -> ProfilePlan:
        """Checked against the config's limits; sizes rounded inwards to the multiple."""
        if max_batch_size < 1:
            raise ExportError(f"max batch size {max_batch_size} must be at least 1")
        low = -(-min_size // size_multiple) * size_multiple
        high = max_size // size_multiple * size_multiple
        if low > high:
            raise ExportError(
                f"no size between min_size {min_size} and max_size {max_size} is a multiple "
                f"of the model's size multiple {size_multiple}"
            )
        for width, height in sizes or []:
            for name, value in (("width", width), ("height", height)):
                if value % size_multiple or not low <= value <= high:
                    raise ExportError(
                        f"{name} {value} of size {width}x{height}: sizes must be multiples of "
                        f"{size_multiple} within {low}..{high} (the model config's min_size "
                        "and max_size)"
                    )
        opt_b = min(max_batch_size, opt_batch or min(4, max_batch_size))
        if opt_b < 1:
            raise ExportError(f"opt batch {opt_batch} must be at least 1")
        opt = min(max(default_size, low), high) // size_multiple * size_multiple
        return cls(
            max_batch_size=max_batch_size,
            opt_batch=opt_b,
            size_multiple=size_multiple,
            min_size=low,
            max_size=high,
            opt_size=sizes[0] if sizes else (opt, opt),
            sizes=tuple(sizes or ()),
        )


def _batch_dims(spec: ComponentSpec, images: int, *, guided: bool) -> dict[str, int]:
    """The text encoder reads prompts and negative prompts; the UNet sees unconditional
    and conditional rows: both see 2x the images of a guided batch."""
    rows = 2 * images if guided else images
    if spec.name == "text_encoder":
        return {BATCH: rows, UNET_BATCH: rows}
    return {BATCH: images, UNET_BATCH: rows}


def profile_dims(
    spec: ComponentSpec, geometry: dict[str, Any], plan: ProfilePlan
) -> list[tuple[dict[str, int], dict[str, int], dict[str, int]]]:
    """(low, opt, high) symbolic dims for each profile of `spec`."""
    scale = geometry["vae_scale_factor"]

    def dims(batch: dict[str, int], width: int, height: int) -> dict[str, int]:
        return {
            **batch,
            SEQUENCE: geometry["sequence"],
            HIDDEN: geometry["hidden"],
            LATENT_CHANNELS: geometry["latent_channels"],
            LATENT_HEIGHT: height // scale,
            LATENT_WIDTH: width // scale,
            IMAGE_HEIGHT: height,
            IMAGE_WIDTH: width,
        }

    low_b = _batch_dims(spec, 1, guided=False)
    opt_b = _batch_dims(spec, plan.opt_batch, guided=True)
    high_b = _batch_dims(spec, plan.max_batch_size, guided=True)
    if not plan.sizes:
        lo, hi, (ow, oh) = plan.min_size, plan.max_size, plan.opt_size
        return [(dims(low_b, lo, lo), dims(opt_b, ow, oh), dims(high_b, hi, hi))]
    return [(dims(low_b, w, h), dims(opt_b, w, h), dims(high_b, w, h)) for w, h in plan.sizes]


def profiles(
    spec: ComponentSpec, geometry: dict[str, Any], plan: ProfilePlan
) -> list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
    """TensorRT profiles for `spec`: per input, (min, opt, max) shapes."""
    return [spec.profile(low, opt, high) for low, opt, high in profile_dims(spec, geometry, plan)]


def profiles_as_manifest(
    built: list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]],
) -> list[dict[str, dict[str, list[int]]]]:
    return [
        {
            name: {"min": list(lo), "opt": list(op), "max": list(hi)}
            for name, (lo, op, hi) in p.items()
        }
        for p in built
    ]


def engine_entry(
    spec: ComponentSpec,
    key: str,
    built: list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]],
    build_info: dict[str, Any],
) -> dict[str, Any]:
    return {
        "component": spec.name,
        "gpu_key": key,
        "file": engine_filename(spec.name, key),
        "precision": PRECISION,
        "profiles": profiles_as_manifest(built),
        "built": build_info,
    }


def merge_engine_manifest(
    existing: dict[str, Any] | None, model: dict[str, Any], entries: list[dict[str, Any]]
) -> dict[str, Any]:
    """The engine manifest with `entries` replacing those of the same component and GPU key.

    Engines for other GPU keys stay (a T4 and an A10G may share a weights folder); engines
    built from other weights (another model version) are dropped.
    """
    old = []
    if existing and existing.get("model", {}).get("version") == model["version"]:
        new_keys = {(e["component"], e["gpu_key"]) for e in entries}
        old = [e for e in existing["engines"] if (e["component"], e["gpu_key"]) not in new_keys]
    return {
        "format": ENGINE_MANIFEST_FORMAT,
        "model": {"name": model["name"], "version": model["version"]},
        "engines": sorted([*old, *entries], key=lambda e: (e["gpu_key"], e["component"])),
    }


def write_atomic(path: Path, data: bytes) -> None:
    scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    scratch.write_bytes(data)
    os.replace(scratch, path)


def model_limits(model_dir: Path) -> dict[str, int]:
    """max_batch_size, min_size and max_size from the config Triton loads."""
    from export.triton_config import EXPORTED_CONFIG, read_config

    exported = model_dir / "configs" / f"{EXPORTED_CONFIG}.pbtxt"
    config = read_config(exported if exported.is_file() else model_dir / "config.pbtxt")
    params = {k: v.string_value for k, v in config.parameters.items()}
    return {
        "max_batch_size": max(1, config.max_batch_size),
        "min_size": int(params.get("min_size", "64")),
        "max_size": int(params.get("max_size", "1024")),
    }


def require_tensorrt() -> tuple[Any, str, str]:
    """(tensorrt module, GPU key, GPU name), or an ExportError that says what is missing."""
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
    major, minor = torch.cuda.get_device_capability()
    return trt, gpu_key(major, minor, trt.__version__), torch.cuda.get_device_name()


def build_engine(
    trt: Any,
    onnx_file: Path,
    built_profiles: list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]],
    timing_cache: Path,
    workspace_bytes: int,
) -> bytes:
    """Serialized fp16 engine for `onnx_file` (TensorRT 10 Python API). NOT RUN YET: needs
    TensorRT and a CUDA GPU, which no machine of this project has had.

    The network is weakly typed with the FP16 builder flag: the ONNX files are fp32 (they
    match torch to 1e-6), and STRONGLY_TYPED would keep them fp32. TensorRT 10 networks are
    always explicit-batch (the EXPLICIT_BATCH flag is deprecated and ignored), so the
    creation flags are 0. The timing cache is read before and written after each build, so
    later builds (other components, other sizes, a rebuild) reuse the measured tactics.
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
) -> tuple[Path, dict[str, Any], ProfilePlan]:
    """(weights folder, weights manifest, profile plan): everything but TensorRT itself."""
    model_dir = repository / model_name
    weights = model_dir / "1" / "weights"
    manifest_file = weights / "manifest.json"
    if not manifest_file.is_file():
        raise ExportError(f"{manifest_file} does not exist: run `python -m export onnx` first")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("runtime", "onnx") != "onnx":
        raise ExportError(f"{weights} holds no ONNX files (exported with --torch-only)")
    limits = model_limits(model_dir)
    geo = manifest["geometry"]
    plan = ProfilePlan.make(
        max_batch_size=max_batch_size or limits["max_batch_size"],
        size_multiple=geo["size_multiple"],
        min_size=min_size if min_size is not None else limits["min_size"],
        max_size=max_size if max_size is not None else limits["max_size"],
        default_size=geo["default_size"],
        sizes=sizes,
        opt_batch=opt_batch,
    )
    return weights, manifest, plan


def build_engines(
    repository: Path,
    *,
    model_name: str = "stable_diffusion",
    max_batch_size: int | None = None,
    sizes: list[Size] | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    opt_batch: int | None = None,
    timing_cache: Path | None = None,
    workspace_gib: float = 4.0,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Build every component's engine and return the engine manifest (written unless dry)."""
    weights, manifest, plan = plan_engines(
        repository,
        model_name=model_name,
        max_batch_size=max_batch_size,
        sizes=sizes,
        min_size=min_size,
        max_size=max_size,
        opt_batch=opt_batch,
    )
    geo = manifest["geometry"]
    all_profiles = {spec.name: profiles(spec, geo, plan) for spec in COMPONENTS}
    trt: Any = None
    info: dict[str, Any] = {"dry_run": True}
    if dry_run:
        key = "dry-run"
    else:
        trt, key, gpu_name = require_tensorrt()
        info = {"gpu": gpu_name, "tensorrt": trt.__version__}
    engines_dir = weights / ENGINES_DIR
    cache = timing_cache or DEFAULT_TIMING_CACHE_DIR / f"timing.{key}.cache"
    entries = []
    for spec in COMPONENTS:
        if trt is not None:
            log.info(
                "building %s for %s (%d profiles)", spec.name, key, len(all_profiles[spec.name])
            )
            engines_dir.mkdir(exist_ok=True)
            plan_bytes = build_engine(
                trt,
                weights / spec.filename,
                all_profiles[spec.name],
                cache,
                int(workspace_gib * (1 << 30)),
            )
            write_atomic(engines_dir / engine_filename(spec.name, key), plan_bytes)
        built_at = datetime.now(UTC).isoformat(timespec="seconds")
        entries.append(engine_entry(spec, key, all_profiles[spec.name], {**info, "at": built_at}))
    manifest_file = engines_dir / ENGINE_MANIFEST
    existing = json.loads(manifest_file.read_text()) if manifest_file.is_file() else None
    engine_manifest = merge_engine_manifest(existing, manifest["model"], entries)
    if not dry_run:
        write_atomic(manifest_file, (json.dumps(engine_manifest, indent=2) + "\n").encode())
    return engine_manifest
