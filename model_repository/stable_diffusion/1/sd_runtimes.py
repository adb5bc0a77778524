"""Runners for the exported networks. Each takes its inputs in the manifest's order."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np


class Component(Protocol):
    def __call__(self, *inputs: np.ndarray) -> np.ndarray: ...


class OnnxRuntimeComponent:
    """One ONNX file in an ONNX Runtime session."""

    def __init__(
        self, folder: Path, spec: dict[str, Any], *, threads: int, providers: list[str]
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # per model instance, or instances fight
        options.inter_op_num_threads = 1
        # Spinning workers starve the server's and other instances' threads between calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(folder / spec["file"]), options, providers=providers
        )
        self.input_names = [t["name"] for t in spec["inputs"]]
        self.input_dtypes = [np.dtype(t["dtype"]) for t in spec["inputs"]]
        self.output_name = spec["outputs"][0]["name"]

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        feed = {
            name: np.ascontiguousarray(x, dtype=dtype)
            for name, dtype, x in zip(self.input_names, self.input_dtypes, inputs, strict=True)
        }
        return self.session.run([self.output_name], feed)[0]


RUNTIMES = {
    "onnxruntime": ["CPUExecutionProvider"],
    "onnxruntime_cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def load_components(
    folder: Path, manifest: dict[str, Any], runtime: str, threads: int
) -> dict[str, Component]:
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    return {
        name: OnnxRuntimeComponent(folder, spec, threads=threads, providers=RUNTIMES[runtime])
        for name, spec in manifest["components"].items()
    }
