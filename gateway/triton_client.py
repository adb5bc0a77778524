"""The one module that talks to Triton: the `stable_diffusion` tensor contract, over HTTP or gRPC.

Names and types follow config.pbtxt in the model repository (and NVIDIA's Triton Stable
Diffusion tutorial: `prompt` in, `generated_image` out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MODEL_NAME = "stable_diffusion"
IMAGE_OUTPUT = "generated_image"
SEED_OUTPUT = "seed"

# input name -> (Triton datatype, numpy dtype)
INPUT_TYPES: dict[str, tuple[str, Any]] = {
    "prompt": ("BYTES", np.object_),
    "negative_prompt": ("BYTES", np.object_),
    "seed": ("INT64", np.int64),
    "steps": ("INT32", np.int32),
    "guidance_scale": ("FP32", np.float32),
    "width": ("INT32", np.int32),
    "height": ("INT32", np.int32),
    "scheduler": ("BYTES", np.object_),
}


@dataclass(frozen=True)
class ImageParams:
    """One image; None leaves the choice to the model (a random seed, its defaults)."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None


def input_arrays(rows: list[ImageParams]) -> dict[str, np.ndarray]:
    """[rows, 1] arrays for every input the rows set (all rows must set the same ones)."""
    arrays: dict[str, np.ndarray] = {}
    for name, (_, dtype) in INPUT_TYPES.items():
        values = [getattr(r, name) for r in rows]
        if all(v is None for v in values):
            continue
        if any(v is None for v in values):
            raise ValueError(f"{name} is set for some rows and not others")
        if dtype is np.object_:
            values = [v.encode("utf-8") for v in values]
        arrays[name] = np.array(values, dtype=dtype).reshape(len(rows), 1)
    return arrays


def make_inputs(module: Any, rows: list[ImageParams]) -> list[Any]:
    """InferInput objects for `tritonclient.http` or `tritonclient.grpc` (same API)."""
    inputs = []
    for name, array in input_arrays(rows).items():
        tensor = module.InferInput(name, list(array.shape), INPUT_TYPES[name][0])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def make_outputs(module: Any) -> list[Any]:
    return [module.InferRequestedOutput(IMAGE_OUTPUT), module.InferRequestedOutput(SEED_OUTPUT)]


@dataclass(frozen=True)
class GeneratedImage:
    pixels: np.ndarray  # height x width x 3, uint8
    seed: int


def read_result(result: Any) -> list[GeneratedImage]:
    images = result.as_numpy(IMAGE_OUTPUT)
    seeds = result.as_numpy(SEED_OUTPUT).reshape(-1)
    return [GeneratedImage(img, int(s)) for img, s in zip(images, seeds, strict=True)]


def generate(
    url: str, rows: list[ImageParams], *, protocol: str = "grpc", timeout_s: float = 600.0
) -> list[GeneratedImage]:
    """Blocking call for command-line tools and tests; the gateway uses the async client."""
    if protocol == "grpc":
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(url) as client:
            result = client.infer(
                MODEL_NAME,
                make_inputs(grpcclient, rows),
                outputs=make_outputs(grpcclient),
                client_timeout=timeout_s,
            )
    elif protocol == "http":
        import tritonclient.http as httpclient

        with httpclient.InferenceServerClient(url, network_timeout=timeout_s) as client:
            result = client.infer(
                MODEL_NAME, make_inputs(httpclient, rows), outputs=make_outputs(httpclient)
            )
    else:
        raise ValueError(f"protocol must be grpc or http, not {protocol!r}")
    return read_result(result)


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: str


class AsyncTriton:
    """The gateway's and workers' client: async gRPC, a deadline per call, cancellable.

    Cancelling the awaiting task cancels the gRPC call, and Triton then stops the request
    between denoising steps.
    """

    def __init__(self, url: str, timeout_s: float, identity_ttl_s: float = 10.0) -> None:
        import tritonclient.grpc.aio as grpc_aio

        self.client = grpc_aio.InferenceServerClient(url)
        self.timeout_s = timeout_s
        self.identity_ttl_s = identity_ttl_s
        self._identity: tuple[float, ModelIdentity] | None = None

    async def generate(self, rows: list[ImageParams]) -> list[GeneratedImage]:
        import tritonclient.grpc as grpcclient

        result = await self.client.infer(
            MODEL_NAME,
            make_inputs(grpcclient, rows),
            outputs=make_outputs(grpcclient),
            client_timeout=self.timeout_s,
        )
        return read_result(result)

    async def identity(self) -> ModelIdentity:
        """Name and version of the exported model, from the parameters of its Triton config."""
        import time

        now = time.monotonic()
        if self._identity is None or now - self._identity[0] > self.identity_ttl_s:
            reply = await self.client.get_model_config(MODEL_NAME, as_json=True, client_timeout=5.0)
            parameters = reply["config"].get("parameters", {})
            identity = ModelIdentity(
                parameters.get("model_name", {}).get("string_value", "unknown"),
                parameters.get("model_version", {}).get("string_value", "unknown"),
            )
            self._identity = (now, identity)
        return self._identity[1]

    async def ready(self) -> bool:
        return bool(await self.client.is_model_ready(MODEL_NAME, client_timeout=2.0))

    async def close(self) -> None:
        await self.client.close()
