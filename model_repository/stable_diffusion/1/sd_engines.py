"""Which TensorRT engine may serve here: GPU identity, profile coverage, and a refusal that
says why.

`python -m export tensorrt` records each plan in the engine manifest (see `sd_weights`) with
the GPU it was built on: compute capability and TensorRT version. A plan runs only on that
GPU architecture with that TensorRT version, and only for the input shapes its optimisation
profiles cover. The functions here are pure and tested on the CPU with synthetic manifests;
only `current_gpu` needs torch with CUDA and TensorRT.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sd_weights import Shape, input_shapes

Shapes = Mapping[str, Shape]


class EngineMismatch(RuntimeError):
    """No engine in the manifest may serve on this GPU, or for these shapes."""


def current_gpu() -> dict[str, Any]:
    """This machine's GPU identity as engine entries record it; needs CUDA and TensorRT."""
    import torch

    if not torch.cuda.is_available():
        raise EngineMismatch("runtime tensorrt needs a CUDA GPU; torch sees none")
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineMismatch("runtime tensorrt needs TensorRT; it is not installed") from exc
    major, minor = torch.cuda.get_device_capability()
    return {"compute_capability": [major, minor], "tensorrt": str(trt.__version__)}


def describe_gpu(gpu: Mapping[str, Any]) -> str:
    """`compute capability 7.5, TensorRT 10.5.0.18`."""
    major, minor = gpu["compute_capability"]
    return f"compute capability {major}.{minor}, TensorRT {gpu['tensorrt']}"


def _identity(gpu: Mapping[str, Any]) -> tuple[tuple[int, ...], str]:
    return (tuple(gpu["compute_capability"]), str(gpu["tensorrt"]))


def profile_covers(profile: Mapping[str, Any], shapes: Shapes) -> bool:
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


def describe_profiles(entry: Mapping[str, Any]) -> str:
    """An engine's profiles, one `input min..max` list per profile."""
    return "; ".join(
        ", ".join(f"{name} {p['min']}..{p['max']}" for name, p in profile.items())
        for profile in entry["profiles"]
    )


def uncovered(
    entry: Mapping[str, Any],
    weights_manifest: Mapping[str, Any],
    max_batch_size: int,
    sizes: Iterable[tuple[int, int]],
) -> str | None:
    """Why `entry` cannot serve every batch of 1..max_batch_size images at `sizes`
    (height, width), or None.

    A profile is a box of shapes: one that holds both one unguided image and a full guided
    batch at a size holds every batch in between at that size.
    """
    component = entry["component"]
    for height, width in sizes:
        size = {"height": height, "width": width}
        low = input_shapes(weights_manifest, component, images=1, guided=False, **size)
        high = input_shapes(weights_manifest, component, images=max_batch_size, guided=True, **size)
        if not any(profile_covers(p, low) and profile_covers(p, high) for p in entry["profiles"]):
            return (
                f"{entry['file']} has no optimisation profile for 1..{max_batch_size} images "
                f"of {width}x{height} (inputs {low} to {high}); its profiles: "
                f"{describe_profiles(entry)}"
            )
    return None


def select_engines(
    engine_manifest: Mapping[str, Any],
    weights_manifest: Mapping[str, Any],
    gpu: Mapping[str, Any],
    *,
    max_batch_size: int,
    sizes: Iterable[tuple[int, int]],
) -> dict[str, dict[str, Any]]:
    """The engine entry for every component, built on `gpu`, covering the batches and sizes.

    Raises EngineMismatch naming this machine's GPU and those the engines were built on, or
    the component and shapes no profile covers.
    """
    sizes = list(sizes)
    built_for = engine_manifest["model"]["version"]
    weights_version = weights_manifest["model"]["version"]
    if built_for != weights_version:
        raise EngineMismatch(
            f"the engines were built from weights version {built_for!r}, these weights are "
            f"{weights_version!r}; rebuild with `python -m export tensorrt`"
        )
    here = describe_gpu(gpu)
    chosen: dict[str, dict[str, Any]] = {}
    for component in weights_manifest["components"]:
        entries = [e for e in engine_manifest["engines"] if e["component"] == component]
        mine = [e for e in entries if _identity(e["gpu"]) == _identity(gpu)]
        if not mine:
            available = sorted({describe_gpu(e["gpu"]) for e in entries}) or ["no GPU"]
            raise EngineMismatch(
                f"no TensorRT engine for {component} was built for this machine ({here}); "
                f"engines were built for {'; '.join(available)}. A plan runs only on the GPU "
                "architecture and TensorRT version it was built with: run "
                "`python -m export tensorrt` on this machine"
            )
        problem = uncovered(mine[0], weights_manifest, max_batch_size, sizes)
        if problem is not None:
            raise EngineMismatch(
                f"the {here} engine for {component} cannot serve batch 1..{max_batch_size}: "
                f"{problem}. Rebuild with a matching --max-batch-size and --sizes"
            )
        chosen[component] = mine[0]
    return chosen
