"""Which TensorRT engine may serve here: GPU keys, profiles, and a refusal that says why.

`python -m export tensorrt` writes `weights/engines/<component>.<gpu-key>.plan` and
`weights/engines/engines.json` (the engine manifest). This module reads only that manifest
and the weights manifest; it never imports `export/` (the two meet through these files).

A TensorRT plan runs only on the GPU architecture and the TensorRT version it was built with,
and only for the input shapes its optimisation profiles cover. The key is
`sm<major><minor>-trt<major.minor.patch>`, e.g. `sm75-trt10.5.0` for a T4 with TensorRT 10.5.
The functions here are pure and tested on the CPU with synthetic manifests; only
`current_gpu_key` needs torch with CUDA and TensorRT.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

ENGINES_DIR = "engines"
ENGINE_MANIFEST = "engines.json"
ENGINE_MANIFEST_FORMAT = 1

Shapes = dict[str, tuple[int, ...]]


class EngineMismatch(RuntimeError):
    """No engine in the manifest may serve on this GPU, or for these shapes."""


def gpu_key(major: int, minor: int, tensorrt_version: str) -> str:
    """`sm75-trt10.5.0`: compute capability and TensorRT major.minor.patch."""
    parts = tensorrt_version.split(".")
    if len(parts) < 3 or not all(p.isdigit() for p in parts[:3]):
        raise ValueError(f"TensorRT version {tensorrt_version!r} is not major.minor.patch")
    return f"sm{major}{minor}-trt{'.'.join(parts[:3])}"


def current_gpu_key() -> str:
    """This machine's key; needs a CUDA GPU (torch) and TensorRT."""
    import torch

    if not torch.cuda.is_available():
        raise EngineMismatch("runtime tensorrt needs a CUDA GPU; torch sees none")
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineMismatch("runtime tensorrt needs TensorRT; it is not installed") from exc
    major, minor = torch.cuda.get_device_capability()
    return gpu_key(major, minor, trt.__version__)


def batch_of(component: str, images: int, *, guided: bool) -> int:
    """Rows a component sees for `images` images: the text encoder reads the prompts and,
    for guided rows, the negative prompts; the UNet sees unconditional + conditional rows."""
    if component in ("text_encoder", "unet") and guided:
        return 2 * images
    return images


def required_shapes(
    weights_manifest: dict[str, Any], component: str, rows: int, height: int, width: int
) -> Shapes:
    """Input shapes of `component` for `rows` rows of height x width images."""
    geo = weights_manifest["geometry"]
    scale = geo["vae_scale_factor"]
    dims = {
        "batch": rows,
        "unet_batch": rows,
        "sequence": geo["sequence"],
        "hidden": geo["hidden"],
        "latent_channels": geo["latent_channels"],
        "latent_height": height // scale,
        "latent_width": width // scale,
        "image_height": height,
        "image_width": width,
    }
    spec = weights_manifest["components"][component]
    return {
        t["name"]: tuple(d if isinstance(d, int) else dims[d] for d in t["shape"])
        for t in spec["inputs"]
    }


def profile_covers(profile: dict[str, Any], shapes: Shapes) -> bool:
    """True when min <= shape <= max, axis by axis, for every input."""
    for name, shape in shapes.items():
        if name not in profile:
            return False
        low, high = profile[name]["min"], profile[name]["max"]
        if len(low) != len(shape) or not all(
            lo <= s <= hi for lo, s, hi in zip(low, shape, high, strict=True)
        ):
            return False
    return True


def uncovered(
    entry: dict[str, Any],
    weights_manifest: dict[str, Any],
    max_batch_size: int,
    sizes: Iterable[tuple[int, int]],
) -> str | None:
    """Why `entry` cannot serve every batch 1..max_batch_size at `sizes`, or None.

    A profile is a box of shapes: one that holds both one unguided image and a full guided
    batch at a size holds every batch in between at that size.
    """
    component = entry["component"]
    for height, width in sizes:
        low = required_shapes(
            weights_manifest, component, batch_of(component, 1, guided=False), height, width
        )
        high = required_shapes(
            weights_manifest,
            component,
            batch_of(component, max_batch_size, guided=True),
            height,
            width,
        )
        if not any(profile_covers(p, low) and profile_covers(p, high) for p in entry["profiles"]):
            return (
                f"{entry['file']} has no optimisation profile for 1..{max_batch_size} images "
                f"of {width}x{height} (inputs {low} to {high}); its profiles: "
                f"{describe_profiles(entry)}"
            )
    return None


def describe_profiles(entry: dict[str, Any]) -> str:
    return "; ".join(
        ", ".join(f"{name} {p['min']}..{p['max']}" for name, p in profile.items())
        for profile in entry["profiles"]
    )


def select_engines(
    engine_manifest: dict[str, Any],
    weights_manifest: dict[str, Any],
    key: str,
    *,
    max_batch_size: int,
    sizes: Iterable[tuple[int, int]],
) -> dict[str, dict[str, Any]]:
    """The engine entry for every component, built for `key`, covering the batches and sizes.

    Raises EngineMismatch naming this machine's key and the keys the engines were built for,
    or the component and shape no profile covers.
    """
    sizes = list(sizes)
    if engine_manifest.get("format") != ENGINE_MANIFEST_FORMAT:
        raise EngineMismatch(
            f"engine manifest format {engine_manifest.get('format')!r} is not "
            f"{ENGINE_MANIFEST_FORMAT}; rebuild with `python -m export tensorrt`"
        )
    built_for = engine_manifest.get("model", {}).get("version")
    weights_version = weights_manifest["model"]["version"]
    if built_for != weights_version:
        raise EngineMismatch(
            f"the engines were built from weights version {built_for!r}, these weights are "
            f"{weights_version!r}; rebuild with `python -m export tensorrt`"
        )
    chosen: dict[str, dict[str, Any]] = {}
    for component in weights_manifest["components"]:
        entries = [e for e in engine_manifest["engines"] if e["component"] == component]
        mine = [e for e in entries if e["gpu_key"] == key]
        if not mine:
            available = sorted({e["gpu_key"] for e in entries}) or ["none"]
            raise EngineMismatch(
                f"no TensorRT engine for {component} matches this machine ({key}); engines "
                f"were built for {', '.join(available)}. A plan runs only on the GPU "
                "architecture and TensorRT version it was built with: run "
                "`python -m export tensorrt` on this machine"
            )
        problem = uncovered(mine[0], weights_manifest, max_batch_size, sizes)
        if problem is not None:
            raise EngineMismatch(
                f"the {key} engine for {component} cannot serve batch 1..{max_batch_size}: "
                f"{problem}. Rebuild with a matching --max-batch-size and --sizes"
            )
        chosen[component] = mine[0]
    return chosen
