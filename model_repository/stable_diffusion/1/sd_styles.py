"""Studio styles the model serves: the LoRAs `python -m export style add` publishes in the
model folder's `styles/`, found by name at request time and kept loaded within a budget.

`styles/<name>` is a link to a folder holding `style.json` (name, content version, base
model; `$defs/style` of `weights.schema.json`, validated at every lookup) and
`lora.safetensors` (PEFT keys `<component>.<module>.lora_A.weight` and
`.lora_B.weight`, the scale folded into lora_B). The folder is read at every lookup (a
directory listing and a link), so a style published or removed while the model runs is seen
by the next request, without a reload; a style republished under its name resolves to its
new folder, and so to new weights.

A runtime that applies styles (`StyleRuntime`) loads a style's tensors into its networks;
the library tracks what is loaded and, past `budget_bytes` of style tensors, unloads the
style used least recently.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from sd_requests import InvalidRequest
from sd_weights import WeightsError, load_style_manifest, weights_file

STYLES_DIR = "styles"


def style_folder(weights: Path) -> Path:
    """The `styles/` of the model folder whose version folder holds `weights` (links
    resolved: the streaming and listing models share `stable_diffusion`'s)."""
    return weights.resolve().parent.parent / STYLES_DIR


def published(folder: Path) -> list[str]:
    """The names of the styles published in `folder` now (links to a style folder)."""
    if not folder.is_dir():
        return []
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.is_symlink()
        and not p.name.startswith(".")
        and (p / weights_file("style_manifest")).is_file()
    )


def catalog(folder: Path) -> list[dict[str, Any]]:
    """The manifests of the styles published in `folder` now, by name (a style whose
    manifest does not validate is left out: a request naming it is refused, saying why)."""
    manifests = []
    for name in published(folder):
        try:
            manifests.append(dict(load_style_manifest((folder / name).resolve(strict=True))))
        except (OSError, WeightsError):  # removed meanwhile, or not a style this code reads
            continue
    return manifests


@dataclass(frozen=True)
class Style:
    """A published style: its name, content version and folder (the link resolved)."""

    name: str
    version: str
    folder: Path
    manifest: Mapping[str, Any]

    @property
    def key(self) -> str:
        """A name for the loaded style, unique per content version (an adapter name)."""
        return f"{self.name}-{self.version}"

    def tensors(self) -> dict[str, torch.Tensor]:
        """The style's LoRA matrices, float32 on the CPU."""
        from safetensors.torch import load_file

        return load_file(str(self.folder / self.manifest["file"]))


class StyleRuntime(Protocol):
    """What applies styles to the networks of one runtime."""

    def check(self, style: Style) -> None:
        """InvalidRequest when this runtime cannot apply `style`, saying why."""
        ...

    def load(self, style: Style, tensors: dict[str, torch.Tensor]) -> None:
        """Make `style` available to `activate`."""
        ...

    def unload(self, style: Style) -> None:
        """Free what `load` took."""
        ...

    def activate(self, style: Style | None, weight: float) -> None:
        """The networks run with `style` at `weight` from now on; with none at None."""
        ...


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors' elements."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


class StyleLibrary:
    """The published styles of one model folder, and those a runtime holds loaded."""

    def __init__(
        self,
        folder: Path,
        model: Mapping[str, Any],
        budget_bytes: int,
        runtime: StyleRuntime | None,
        *,
        unavailable: str = "",
    ) -> None:
        """`unavailable` says why, where `runtime` is None: a request with a style is
        refused with it."""
        self.folder = folder
        self.model = model
        self.budget_bytes = budget_bytes
        self.runtime = runtime
        self.unavailable = unavailable
        self.resident: OrderedDict[str, tuple[Style, int]] = OrderedDict()  # least recent first

    def find(self, name: str) -> Style:
        """The style published as `name` now; InvalidRequest naming it and the styles
        available when there is none, when it was made for other weights, or when this
        runtime applies no styles."""
        link = self.folder / name
        try:
            if "/" in name or name.startswith(".") or not link.is_symlink():
                raise FileNotFoundError(link)
            folder = link.resolve(strict=True)
        except OSError:  # never published, or removed
            available = ", ".join(published(self.folder)) or "none"
            raise InvalidRequest(f"unknown style {name!r}; styles available: {available}") from None
        try:
            manifest = load_style_manifest(folder)
        except WeightsError as exc:
            raise InvalidRequest(f"style {name!r} cannot be served: {exc}") from None
        if self.runtime is None:
            raise InvalidRequest(f"style {name!r}: {self.unavailable}")
        base = manifest["base_model"]
        if base["version"] != self.model["version"]:
            raise InvalidRequest(
                f"style {name!r} was imported for {base['name']} version "
                f"{base['version']}; this model serves {self.model['name']} version "
                f"{self.model['version']}: import it again (python -m export style add)"
            )
        style = Style(name, str(manifest["version"]), folder, manifest)
        self.runtime.check(style)
        return style

    def activate(self, style: Style | None, weight: float) -> None:
        """Run the networks with `style` at `weight` (None: no style), loading it first
        when it is not loaded and unloading the least recently used past the budget."""
        if self.runtime is None:
            if style is not None:
                raise RuntimeError(f"style {style.name!r}: {self.unavailable}")
            return
        if style is not None:
            if style.key in self.resident:
                self.resident.move_to_end(style.key)
            else:
                tensors = style.tensors()
                self.runtime.load(style, tensors)
                self.resident[style.key] = (style, tensor_bytes(tensors))
                self._evict(keep=style.key)
        self.runtime.activate(style, weight)

    def resident_bytes(self) -> int:
        """Bytes of the style tensors loaded now."""
        return sum(size for _, size in self.resident.values())

    def _evict(self, keep: str) -> None:
        """Unload the least recently used styles until the budget holds (`keep` stays)."""
        assert self.runtime is not None
        while self.resident_bytes() > self.budget_bytes and len(self.resident) > 1:
            key = next(k for k in self.resident if k != keep)
            style, _ = self.resident.pop(key)
            self.runtime.unload(style)
