"""Styles on the tensorrt runtime: the UNet and text encoder engines refitted in place with
the merged weights the onnxruntime runtime feeds (`sd_style_onnx`).

An engine built from the ONNX files names its weights by the ONNX initializers, in their
layout, so the same matched initializers (`sd_style_onnx.style_targets`) and the same merged
values `W + weight x (B @ A)` refit it (`trt.Refitter.set_named_weights`, then
`refit_cuda_engine`). Switching style writes the new style's weights and restores the
exported weights of the modules only the previous style adapted; rows without a style run
on the exported weights. The engines must be built refittable (`python -m export tensorrt
--refittable`); the model refuses a style otherwise, saying so.

Written against TensorRT 10's Python refit API. Verified only where TensorRT and a CUDA GPU
exist; this repository's CI has neither, and tests/test_style_serving.py skips its check
there, saying so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sd_requests import InvalidRequest
from sd_style_onnx import MergedStyles, Target
from sd_styles import Style


class TensorRTStyles(MergedStyles):
    """The UNet's and text encoder's engines, refitted per style and weight."""

    holder = "the engines' weights"

    def __init__(self, components: dict[str, Any], targets: dict[str, dict[str, Target]]) -> None:
        import tensorrt as trt

        super().__init__(components, targets)
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.changed: dict[str, set[str]] = {n: set() for n in self.components}

    def check(self, style: Style) -> None:
        """InvalidRequest when an engine is not refittable or lacks a module of `style`."""
        for network, component in self.components.items():
            if not component.engine.refittable:
                raise InvalidRequest(
                    f"style {style.name!r}: the {network} engine was not built refittable; "
                    "rebuild the engines with `python -m export tensorrt --refittable`"
                )
        super().check(style)

    def activate(self, style: Style | None, weight: float) -> None:
        """Refit the engines for `style` at `weight`; the exported weights for None."""
        wanted = None if style is None else (style.key, weight)
        if wanted == self.active:
            return
        for network, styled in self.merged_weights(style, weight).items():
            exported = {t.initializer: t.array for t in self.targets[network].values()}
            values = dict(styled)
            for name in self.changed[network] - set(styled):  # back to the exported weights
                values[name] = np.ascontiguousarray(exported[name], dtype=np.float32)
            if values:
                self._refit(network, values)
            self.changed[network] = set(styled)
        self.active = wanted

    def _refit(self, network: str, values: dict[str, np.ndarray]) -> None:
        """Write `values` (initializer name -> fp32 array) into `network`'s engine."""
        engine = self.components[network].engine
        refitter = self.trt.Refitter(engine, self.logger)
        kept = []  # the arrays must outlive the refit
        for name, value in values.items():
            array = np.ascontiguousarray(value, dtype=np.float32)
            kept.append(array)
            if not refitter.set_named_weights(name, self.trt.Weights(array)):
                raise RuntimeError(f"TensorRT refused new weights for {network} {name}")
        stream = torch.cuda.current_stream(self.components[network].device)
        stream.synchronize()  # no call of the engine is in flight
        if not refitter.refit_cuda_engine():
            missing = refitter.get_missing_weights()
            raise RuntimeError(f"TensorRT could not refit {network}; weights missing: {missing}")
