"""Styles on the torch runtime: diffusers/PEFT adapters in the UNet and the text encoder.

Each loaded style is one PEFT adapter per network it adapts (diffusers' `load_lora_adapter`
for the UNet, `load_lora_into_text_encoder` for the text encoder, as `load_lora_weights`
does), named by the style's name and content version. A batch runs with one style at one
weight (rows group by style and weight): `activate` makes it the only active adapter at
that weight (`set_adapters`), or disables the adapters for rows without a style.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from sd_styles import Style


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Without each load's progress, transformers' report of the new adapter's weights, and
    PEFT's warning that a second adapter joins the first (which is what styles do)."""
    logs = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


class TorchStyles:
    """The adapters of the styles loaded into one torch UNet and text encoder."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
        self.unet = unet
        self.text_encoder = text_encoder
        self.adapted: dict[str, set[str]] = {}  # style key -> the networks it adapts
        self.active: tuple[str, float] | None = None

    def check(self, style: Style) -> None:
        """Nothing to refuse: the export checked the style against these networks."""

    def load(self, style: Style, tensors: dict[str, torch.Tensor]) -> None:
        """Add the style's adapters, on the networks' device and in their dtype."""
        from diffusers import StableDiffusionPipeline

        unet_part = {k: v for k, v in tensors.items() if k.startswith("unet.")}
        text_part = {k: v for k, v in tensors.items() if k.startswith("text_encoder.")}
        with quiet_loading():
            if unet_part:
                load_adapter: Any = self.unet.load_lora_adapter  # diffusers' PeftAdapterMixin
                load_adapter(unet_part, prefix="unet", adapter_name=style.key)
            if text_part:
                StableDiffusionPipeline.load_lora_into_text_encoder(
                    text_part,
                    network_alphas=None,
                    text_encoder=self.text_encoder,
                    prefix="text_encoder",
                    adapter_name=style.key,
                )
        self.adapted[style.key] = {
            name for name, part in (("unet", unet_part), ("text_encoder", text_part)) if part
        }
        self.active = None  # loading activates the new adapter: set it again before use

    def unload(self, style: Style) -> None:
        """Remove the style's adapters and free their weights."""
        from diffusers.utils.peft_utils import delete_adapter_layers

        networks = self.adapted.pop(style.key)
        if "unet" in networks:
            self.unet.delete_adapters(style.key)  # type: ignore[operator]
        if "text_encoder" in networks:
            delete_adapter_layers(self.text_encoder, style.key)
        self.active = None

    def activate(self, style: Style | None, weight: float) -> None:
        """Only `style`'s adapters active, at `weight`; none for None."""
        from diffusers.utils.peft_utils import set_adapter_layers, set_weights_and_activate_adapters

        wanted = None if style is None else (style.key, weight)
        if wanted == self.active:
            return
        for name, network in (("unet", self.unet), ("text_encoder", self.text_encoder)):
            if not any(hasattr(m, "lora_A") for m in network.modules()):
                continue  # no style has adapted this network yet
            if style is None or name not in self.adapted[style.key]:
                set_adapter_layers(network, enabled=False)
            else:
                set_adapter_layers(network, enabled=True)
                set_weights_and_activate_adapters(network, [style.key], [weight])
        self.active = wanted
