"""The one module that talks to Triton: the `stable_diffusion` tensors, its config, its errors.

Tensor names and types are the model's (and NVIDIA's Triton Stable Diffusion tutorial's:
`prompt` in, `generated_image` out). A generation asks for no output by name, so Triton sends
every output the model has: `flagged` (the safety checker's verdict) where the model has it,
and a model without it still answers. tritonclient is imported here and nowhere else in the
gateway: its exceptions leave this module as the gateway's own `ModelError`s, so callers
never depend on Triton's status strings.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpc_aio
from tritonclient.utils import InferenceServerException

MODEL_NAME = "stable_diffusion"
# The same model under a decoupled policy: a response per denoising step, then the image.
STREAM_MODEL_NAME = "stable_diffusion_stream"
# The studio styles MODEL_NAME serves now: one JSON output, read at every request.
STYLES_MODEL_NAME = "stable_diffusion_styles"
STYLES_OUTPUT = "styles"
IMAGE_OUTPUT = "generated_image"
SEED_OUTPUT = "seed"
FLAGGED_OUTPUT = "flagged"
PREVIEW_OUTPUT = "preview"
# A streamed error carries no gRPC status: the model starts its message with the status name.
STREAM_STATUS = re.compile(r"^([A-Z_]+): ")

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
    "strength": ("FP32", np.float32),
    "style": ("BYTES", np.object_),
    "style_weight": ("FP32", np.float32),
    "image": ("UINT8", np.uint8),  # image-to-image: a row's input image, height x width x 3
}
T = TypeVar("T")


class ModelError(Exception):
    """A Triton call that did not give images; the subclass says whose fault it was."""

    outcome = "error"  # the forge_generation_seconds outcome label

    def __init__(self, message: str, status: str = "") -> None:
        super().__init__(message)
        self.message, self.status = message, status


class ModelRejected(ModelError):
    """The model refused the request's values (INVALID_ARG): the client must change them."""

    outcome = "invalid"


class ModelUnavailable(ModelError):
    """Triton or the model is absent, overloaded or past the deadline: try again later."""

    outcome = "unavailable"


class ModelFailed(ModelError):
    """The model failed while generating (INTERNAL or an unexpected status)."""


class ModelCancelled(ModelError):
    """The request was cancelled before it finished."""

    outcome = "cancelled"


def translate(exc: InferenceServerException) -> ModelError:
    """tritonclient's exception as the gateway's own error, by Triton's status code (for a
    streamed response's error, by the status name its message starts with)."""
    status = str(exc.status() or "")
    message = exc.message() or str(exc)
    if not status and (named := STREAM_STATUS.match(message)):
        status, message = named.group(1), message[named.end() :]
    if "INVALID_ARG" in status or status == "400":
        return ModelRejected(message, status)
    if "CANCELLED" in status:
        return ModelCancelled(message, status)
    unavailable = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "NOT_FOUND")
    if not status or any(code in status for code in unavailable):
        return ModelUnavailable(message, status)
    return ModelFailed(message, status)


@contextmanager
def translated() -> Iterator[None]:
    """Re-raise tritonclient's exceptions as ModelErrors."""
    try:
        yield
    except InferenceServerException as exc:
        raise translate(exc) from exc


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
    strength: float | None = None
    style: str | None = None
    style_weight: float | None = None
    image: np.ndarray | None = field(default=None, compare=False)


def input_arrays(rows: list[ImageParams]) -> dict[str, np.ndarray]:
    """[rows, 1] arrays for every input the rows set, [rows, height, width, 3] for their
    input images (all rows must set the same inputs, and images of one size)."""
    arrays: dict[str, np.ndarray] = {}
    for name, (_, dtype) in INPUT_TYPES.items():
        values = [getattr(r, name) for r in rows]
        if all(v is None for v in values):
            continue
        if any(v is None for v in values):
            raise ValueError(f"{name} is set for some rows and not others")
        if name == "image":
            arrays[name] = np.stack(values).astype(dtype, copy=False)
            continue
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


@dataclass(frozen=True)
class GeneratedImage:
    """One image of a result: height x width x 3 uint8 pixels, the seed that drew it, and
    whether the model's safety checker flagged it (false from a model without the output)."""

    pixels: np.ndarray
    seed: int
    flagged: bool = False


def read_result(result: Any) -> list[GeneratedImage]:
    """The images of an InferResult, one per row, in row order."""
    images = result.as_numpy(IMAGE_OUTPUT)
    seeds = result.as_numpy(SEED_OUTPUT).reshape(-1)
    flags = result.as_numpy(FLAGGED_OUTPUT)
    flagged = [False] * len(seeds) if flags is None else [bool(f) for f in flags.reshape(-1)]
    return [
        GeneratedImage(img, int(s), f) for img, s, f in zip(images, seeds, flagged, strict=True)
    ]


def generate(
    url: str, rows: list[ImageParams], *, protocol: str = "grpc", timeout_s: float = 600.0
) -> list[GeneratedImage]:
    """Blocking call for command-line tools and tests; the gateway uses `AsyncTriton`."""
    with translated():
        if protocol == "grpc":
            with grpcclient.InferenceServerClient(url) as client:
                result = client.infer(
                    MODEL_NAME, make_inputs(grpcclient, rows), client_timeout=timeout_s
                )
        elif protocol == "http":
            import tritonclient.http as httpclient  # imported here: it needs gevent

            with httpclient.InferenceServerClient(url, network_timeout=timeout_s) as client:
                result = client.infer(MODEL_NAME, make_inputs(httpclient, rows))
        else:
            raise ValueError(f"protocol must be grpc or http, not {protocol!r}")
    return read_result(result)


@dataclass(frozen=True)
class Progress:
    """A streamed generation after one denoising step: the step, the steps in all, the
    seconds since the model took the request, and a preview (HxWx3 uint8 at an eighth of the
    image's size) where one was due."""

    step: int
    total_steps: int
    elapsed_s: float
    preview: np.ndarray | None = None


def read_progress(result: Any) -> Progress | GeneratedImage:
    """One streamed response: progress, or the final image."""
    if result.as_numpy(IMAGE_OUTPUT) is not None:
        (image,) = read_result(result)
        return image
    preview = result.as_numpy(PREVIEW_OUTPUT)
    return Progress(
        step=int(result.as_numpy("step").reshape(-1)[0]),
        total_steps=int(result.as_numpy("total_steps").reshape(-1)[0]),
        elapsed_s=float(result.as_numpy("elapsed_s").reshape(-1)[0]),
        preview=None if preview is None else preview[0],
    )


def stream_inputs(preview_every: int, progress_interval_s: float) -> list[Any]:
    """The streaming model's own inputs: `preview_every` and `progress_interval_s`."""
    every = grpcclient.InferInput("preview_every", [1, 1], "INT32")
    every.set_data_from_numpy(np.array([[preview_every]], dtype=np.int32))
    interval = grpcclient.InferInput("progress_interval_s", [1, 1], "FP32")
    interval.set_data_from_numpy(np.array([[progress_interval_s]], dtype=np.float32))
    return [every, interval]


@dataclass(frozen=True)
class ModelConfig:
    """What the gateway reads from the model config Triton serves."""

    parameters: dict[str, str]
    max_batch_size: int


class AsyncTriton:
    """The gateway's and workers' client: async gRPC, a deadline per call, cancellable.

    Cancelling the awaiting task cancels the gRPC call, and Triton then stops the request
    between denoising steps. A stream asks for progress at most every `progress_interval_s`
    (0: every step).
    """

    def __init__(self, url: str, timeout_s: float, progress_interval_s: float = 0.0) -> None:
        self.client = grpc_aio.InferenceServerClient(url)
        self.timeout_s = timeout_s
        self.progress_interval_s = progress_interval_s

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except InferenceServerException as exc:
            raise translate(exc) from exc

    async def generate(self, rows: list[ImageParams]) -> list[GeneratedImage]:
        """The rows' images, or a ModelError."""
        result = await self._call(
            lambda: self.client.infer(
                MODEL_NAME, make_inputs(grpcclient, rows), client_timeout=self.timeout_s
            )
        )
        return read_result(result)

    async def stream(
        self, row: ImageParams, preview_every: int
    ) -> AsyncGenerator[Progress | GeneratedImage, None]:
        """One image from the streaming model: its progress (a preview every
        `preview_every` steps; 0 for none), then the image; or a ModelError. Leaving the
        iteration early (a cancelled task) cancels the request: the model stops before its
        next step."""
        inputs = stream_inputs(preview_every, self.progress_interval_s)
        request = {
            "model_name": STREAM_MODEL_NAME,
            "inputs": [*make_inputs(grpcclient, [row]), *inputs],
        }

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield request

        with translated():
            responses = self.client.stream_infer(requests(), stream_timeout=self.timeout_s)
        try:
            async for result, error in responses:
                if error is not None:
                    raise translate(error)
                event = read_progress(result)
                yield event
                if isinstance(event, GeneratedImage):
                    return
            raise ModelUnavailable("the stream ended before the image")
        except grpc.RpcError as exc:  # the stream itself failed: no InferenceServerException
            status = str(exc.code()) if isinstance(exc, grpc.Call) else ""
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            raise translate(InferenceServerException(details, status=status)) from exc
        finally:
            responses.cancel()

    async def model_config(self) -> ModelConfig:
        """The parameters and batch size of the model config Triton serves."""
        reply: dict[str, Any] = await self._call(
            lambda: self.client.get_model_config(MODEL_NAME, as_json=True, client_timeout=5.0)
        )
        config = reply["config"]
        return ModelConfig(
            parameters={
                name: value.get("string_value", "")
                for name, value in config.get("parameters", {}).items()
            },
            max_batch_size=int(config.get("max_batch_size", 0)),
        )

    async def styles(self) -> list[dict[str, Any]]:
        """The manifests of the studio styles the model serves now (`STYLES_MODEL_NAME`)."""
        result = await self._call(
            lambda: self.client.infer(
                STYLES_MODEL_NAME,
                [],
                outputs=[grpcclient.InferRequestedOutput(STYLES_OUTPUT)],
                client_timeout=5.0,
            )
        )
        listing: list[dict[str, Any]] = json.loads(result.as_numpy(STYLES_OUTPUT)[0])
        return listing

    async def ready(self, model: str = MODEL_NAME) -> bool:
        """Whether `model` is loaded and ready for requests."""
        return bool(await self._call(lambda: self.client.is_model_ready(model, client_timeout=2.0)))

    async def close(self) -> None:
        """Close the gRPC channel."""
        await self.client.close()
