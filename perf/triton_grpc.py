"""The served model's public gRPC interface, as any client sees it: tensors in, images out.

The names, types and shapes are the model's public contract, those of NVIDIA's Triton
Stable Diffusion tutorial: every input is [rows, 1]; `generated_image` is the image output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

MODEL = "stable_diffusion"
IMAGE_OUTPUT = "generated_image"
INPUT_TYPES = {
    "prompt": "BYTES",
    "negative_prompt": "BYTES",
    "seed": "INT64",
    "steps": "INT32",
    "guidance_scale": "FP32",
    "width": "INT32",
    "height": "INT32",
    "scheduler": "BYTES",
}
NUMPY_TYPES = {"BYTES": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32}

Row = Mapping[str, Any]  # input name -> value, e.g. {"prompt": "an axe", "seed": 7}


def make_inputs(rows: Sequence[Row]) -> list[grpcclient.InferInput]:
    """One InferInput per input the rows name (every row names the same ones)."""
    names = list(rows[0])
    if any(list(row) != names for row in rows):
        raise ValueError("every row must name the same inputs, in the same order")
    inputs = []
    for name in names:
        triton_type = INPUT_TYPES[name]
        if triton_type == "BYTES":
            column = [[str(row[name]).encode()] for row in rows]
        else:
            column = [[row[name]] for row in rows]
        array = np.array(column, dtype=NUMPY_TYPES[triton_type])
        tensor = grpcclient.InferInput(name, list(array.shape), triton_type)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def make_outputs() -> list[grpcclient.InferRequestedOutput]:
    """The image output."""
    return [grpcclient.InferRequestedOutput(IMAGE_OUTPUT)]


def infer(client: grpcclient.InferenceServerClient, rows: Sequence[Row]) -> np.ndarray:
    """One request on an open client; the images, [rows, height, width, 3] uint8."""
    result = client.infer(MODEL, make_inputs(rows), outputs=make_outputs())
    images: np.ndarray = result.as_numpy(IMAGE_OUTPUT)
    return images


def generate(url: str, rows: Sequence[Row]) -> np.ndarray:
    """One request on a channel of its own (host:port), as a separate client would make it."""
    with grpcclient.InferenceServerClient(url) as client:
        return infer(client, rows)


def load_model(url: str, timeout_s: float = 900.0) -> None:
    """Load the model (Triton in explicit model control) and wait until it is ready; the
    load includes the model's warm-up."""
    with grpcclient.InferenceServerClient(url) as client:
        client.load_model(MODEL, client_timeout=timeout_s)
        if not client.is_model_ready(MODEL):
            raise RuntimeError(f"{MODEL} loaded but is not ready")


def served_config(url: str) -> tuple[dict[str, str], int]:
    """The model config Triton serves: its parameters (strings) and max_batch_size."""
    with grpcclient.InferenceServerClient(url) as client:
        config = client.get_model_config(MODEL, as_json=True)["config"]
    parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    return parameters, int(config.get("max_batch_size", 0))


def batch_stats(url: str) -> dict[int, tuple[int, int]]:
    """Triton's executions per batch size: {batch size: (count, compute nanoseconds)}."""
    with grpcclient.InferenceServerClient(url) as client:
        (stats,) = client.get_inference_statistics(MODEL, as_json=True)["model_stats"]
    return {
        int(b["batch_size"]): (
            int(b["compute_infer"].get("count", 0)),
            int(b["compute_infer"].get("ns", 0)),
        )
        for b in stats.get("batch_stats", [])
    }
