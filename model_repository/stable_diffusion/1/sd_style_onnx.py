"""Styles on the onnxruntime runtime: merged weights fed as ONNX Runtime initializer overrides.

The export traces the UNet and the text encoder with torch's exporter, which keeps a
convolution's or biased linear layer's weight under its torch name but turns an unbiased
linear layer into a MatMul on `onnx::MatMul_<n>`, its weight transposed. So initializers are
matched to the diffusers modules by value, not by name (`style_targets`): each weight in the
`diffusers/` copy of the weights is found among the ONNX initializers as itself or, for a
linear layer, transposed. The matched initializers are declared graph inputs when the
session is made (`overridable_model`), which makes them initializers a run may override:
a run without overrides uses the exported weights, exactly as before.

A batch with a style runs with `W + weight x (B @ A)` for every module the style adapts
(B holds the style's alpha/rank scale), computed once per style and weight from the
exported weights (read through a memory map of the ONNX external data file: nothing of the
base weights is copied to keep) and fed with every call until the next change.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sd_requests import InvalidRequest
from sd_styles import Style

NETWORKS = {"unet": "unet", "text_encoder": "text_encoder"}  # style component -> network
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
HEAD = 64  # elements compared first when matching weights by value


@dataclass(frozen=True)
class Target:
    """Where a module's weight is in an ONNX file: its initializer, and whether it is held
    transposed (a MatMul's weight, in x out, for a torch linear layer's out x in)."""

    initializer: str
    transposed: bool
    array: np.ndarray  # the exported weight, memory-mapped or inline (never written)


def initializer_arrays(folder: Path, onnx_file: Path) -> dict[str, np.ndarray]:
    """Every float32 2-D or 4-D initializer of `onnx_file` by name, as arrays that read the
    external data file through a memory map (inline ones decoded)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_file), load_external_data=False)
    arrays: dict[str, np.ndarray] = {}
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) not in (2, 4):
            continue
        shape = tuple(init.dims)
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            arrays[init.name] = np.memmap(
                folder / info["location"],
                dtype=np.float32,
                mode="r",
                offset=int(info.get("offset", 0)),
                shape=shape,
            )
        else:
            arrays[init.name] = numpy_helper.to_array(init)
    return arrays


def _head(array: np.ndarray) -> bytes:
    return np.fromiter(itertools.islice(array.flat, HEAD), dtype=np.float32).tobytes()


def match_weights(
    arrays: dict[str, np.ndarray], weights: Iterable[tuple[str, torch.Tensor]]
) -> dict[str, Target]:
    """module name -> Target for every (module name, torch weight) whose value is an
    initializer in `arrays`, as it is or transposed (2-D only)."""
    index: dict[tuple[tuple[int, ...], bytes], list[str]] = {}
    for name, array in arrays.items():
        index.setdefault((array.shape, _head(array)), []).append(name)
    targets: dict[str, Target] = {}
    for module, weight in weights:
        w = weight.float().numpy()
        layouts = [(w, False)] + ([(w.T, True)] if w.ndim == 2 else [])
        for layout, transposed in layouts:
            found = [
                name
                for name in index.get((layout.shape, _head(layout)), [])
                if np.array_equal(arrays[name], layout)
            ]
            if found:
                targets[module] = Target(found[0], transposed, arrays[found[0]])
                break
    return targets


def style_targets(folder: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Target]]:
    """network -> module name -> Target, for every linear and convolution weight of the
    UNet and the text encoder that the ONNX files hold."""
    from safetensors import safe_open

    source = folder / manifest["diffusers"]
    files = {
        "unet": source / "unet" / "diffusion_pytorch_model.safetensors",
        "text_encoder": source / "text_encoder" / "model.safetensors",
    }
    targets = {}
    for network, weights_file in files.items():
        arrays = initializer_arrays(folder, folder / manifest["components"][network]["file"])
        with safe_open(str(weights_file), "pt") as f:
            weights = (
                (key.removesuffix(".weight"), f.get_tensor(key))
                for key in f.keys()  # noqa: SIM118 (safe_open is not a mapping)
                if key.endswith(".weight") and len(f.get_slice(key).get_shape()) in (2, 4)
            )
            targets[network] = match_weights(arrays, weights)
    return targets


def overridable_model(onnx_file: Path, initializers: Iterable[str]) -> bytes:
    """`onnx_file` with `initializers` declared graph inputs too (which ONNX Runtime lets a
    run override), serialized; its external data stays where it is (the session is told the
    folder)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_file), load_external_data=False)
    wanted = set(initializers)
    for init in model.graph.initializer:
        if init.name in wanted:
            value = helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            model.graph.input.append(value)
    return model.SerializeToString()


def merged(target: Target, a: torch.Tensor, b: torch.Tensor, weight: float) -> np.ndarray:
    """The exported weight plus `weight` x (B @ A), in the initializer's layout."""
    delta = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(
        b.shape[0], *a.shape[1:]
    )
    if target.transposed:
        delta = delta.T
    return np.asarray(target.array, dtype=np.float32) + weight * delta.numpy()


def module_of(key: str) -> tuple[str, str]:
    """(component, module) of a style tensor's key."""
    component, _, rest = key.partition(".")
    return component, rest.removesuffix(LORA_A).removesuffix(LORA_B)


class MergedStyles(ABC):
    """Per style and weight, the merged weights of the UNet's and text encoder's adapted
    modules (`merged_weights`); a runtime subclass makes its networks run with them
    (`activate`). `targets`: network -> module name -> Target; `holder` names, for
    messages, what holds the weights."""

    holder = "the exported ONNX files"

    def __init__(self, components: dict[str, Any], targets: dict[str, dict[str, Target]]) -> None:
        self.components = {network: components[network] for network in NETWORKS.values()}
        self.targets = targets
        self.loaded: dict[str, dict[str, torch.Tensor]] = {}
        self.active: tuple[str, float] | None = None

    def target(self, component: str, module: str) -> Target | None:
        """Where `module` of `component` is among the network's weights (None: nowhere)."""
        targets = self.targets[NETWORKS[component]]
        for name in (module, module.removeprefix("text_model.")):
            if name in targets:
                return targets[name]
        return None

    def check(self, style: Style) -> None:
        """InvalidRequest naming a module of `style` that the networks' weights lack."""
        from safetensors import safe_open

        with safe_open(str(style.folder / style.manifest["file"]), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                component, module = module_of(key)
                if component not in NETWORKS or self.target(component, module) is None:
                    raise InvalidRequest(
                        f"style {style.name!r} adapts {component} {module}, which "
                        f"{self.holder} do not hold; serve it on runtime torch"
                    )

    def load(self, style: Style, tensors: dict[str, torch.Tensor]) -> None:
        """Keep the style's matrices (merged when the style is activated)."""
        self.loaded[style.key] = tensors

    def unload(self, style: Style) -> None:
        """Drop the style's matrices; networks running it return to the exported weights."""
        self.loaded.pop(style.key, None)
        if self.active is not None and self.active[0] == style.key:
            self.activate(None, 0.0)

    def merged_weights(
        self, style: Style | None, weight: float
    ) -> dict[str, dict[str, np.ndarray]]:
        """network -> initializer name -> the value it takes for `style` at `weight` (only
        the modules the style adapts; nothing for None)."""
        values: dict[str, dict[str, np.ndarray]] = {n: {} for n in self.components}
        if style is None:
            return values
        tensors = self.loaded[style.key]
        for key in tensors:
            if key.endswith(LORA_A):
                component, module = module_of(key)
                target = self.target(component, module)
                assert target is not None  # check() refused the style otherwise
                b = tensors[key.removesuffix(LORA_A) + LORA_B]
                values[NETWORKS[component]][target.initializer] = merged(
                    target, tensors[key], b, weight
                )
        return values

    @abstractmethod
    def activate(self, style: Style | None, weight: float) -> None:
        """Run the networks with `style` at `weight` from now on; the exported weights for
        None."""


class OnnxStyles(MergedStyles):
    """The merged weights fed to the UNet's and text encoder's sessions as overrides."""

    def __init__(self, components: dict[str, Any]) -> None:
        targets = {n: components[n].style_targets for n in NETWORKS.values()}
        super().__init__(components, targets)

    def activate(self, style: Style | None, weight: float) -> None:
        """Feed the merged weights of `style` at `weight` from now on; none for None."""
        wanted = None if style is None else (style.key, weight)
        if wanted == self.active:
            return
        for network, overrides in self.merged_weights(style, weight).items():
            self.components[network].overrides = overrides
        self.active = wanted
