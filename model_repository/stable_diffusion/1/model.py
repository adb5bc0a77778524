"""Triton Python-backend adapter: Triton requests in, pipeline rows, Triton responses out.

All the work is in `sd_pipeline` (which never imports Triton). Here: hand the model config to
the core, turn each request's rows into `GenerationRequest`s holding only the inputs that
arrived (the core fills in the rest from the generation contract), map errors to typed
`TritonError`s, and answer every request exactly once. A request whose rows span batches (a
static batch of mixed sizes) fails if any of its rows failed; the other requests of the
execution get their images.

The same code serves the streaming model (`stable_diffusion_stream`: this folder under a
config with a decoupled transaction policy). There a request holds one image; it is sent a
response after every denoising step (`step`, `total_steps`, `elapsed_s`; at most every
`progress_interval_s` where the client asks for less), with a `preview` every
`preview_every` steps, then its final response: the image and seed `stable_diffusion` gives
for the same inputs.

Every image response carries `flagged` beside the image and the seed: whether the safety
checker flagged the row's image (always false for weights without a checker).

A request with the optional `image` input ([rows, height, width, 3] uint8) is image to image:
each row starts from its own image, with its `strength` or the contract's default.
"""

from __future__ import annotations

import contextlib
import json
import locale
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from sd_pipeline import Outcome, RowFailure, StableDiffusionCore
from sd_preview import preview_pixels
from sd_requests import GenerationRequest, InvalidRequest, Row, StepObserver


def _text(value: Any, name: str) -> str:
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{name} is not valid UTF-8") from exc


def _decimal(value: Any) -> float:
    """An FP32 value as the shortest decimal that is nearest to it in float32: the number the
    client wrote. 0.7 arrives as 0.699999988; read as such, int(10 x strength) would denoise
    6 steps where diffusers, given 0.7, denoises 7."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


# Optional input -> its GenerationRequest field's value from one row of the tensor.
OPTIONAL_INPUTS: dict[str, Callable[[Any], Any]] = {
    "negative_prompt": lambda v: _text(v, "negative_prompt"),
    "seed": int,
    "steps": int,
    "guidance_scale": float,
    "width": int,
    "height": int,
    "scheduler": lambda v: _text(v, "scheduler"),
    "strength": _decimal,
    "style": lambda v: _text(v, "style"),
    "style_weight": _decimal,
}


def _column(tensor: Any) -> np.ndarray:
    array = tensor.as_numpy()
    return array.reshape(array.shape[0], -1)[:, 0]


def _images(triton_request: Any, rows: int) -> list[np.ndarray | None]:
    """Each row's input image (image to image) from the optional `image` input, [rows,
    height, width, 3] uint8; None for every row without it."""
    tensor = pb_utils.get_input_tensor_by_name(triton_request, "image")
    if tensor is None:
        return [None] * rows
    images = tensor.as_numpy()
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise InvalidRequest(
            f"image is {images.dtype} of shape {list(images.shape)}; send uint8 "
            "[rows, height, width, 3] (RGB)"
        )
    if images.shape[0] != rows:
        raise InvalidRequest(f"image has {images.shape[0]} rows; prompt has {rows}")
    return list(images)


def _utf8_text_files() -> None:
    """The backend stub embeds an isolated Python that never sets its locale, so open()
    reads text as ASCII; torch.compile's kernel templates are UTF-8."""
    with contextlib.suppress(locale.Error):  # no such locale here: keep the default
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")


class Background:
    """Runs calls on a thread of its own, in the order given, so that `execute` never waits
    on a round trip to the server process (a streamed response, a metric update): the
    networks release the GIL, so these overlap the work. A call that fails (a stream whose
    client left, and whose request stops before its next step) is logged."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple, dict] | None] = (
            queue.SimpleQueue()
        )
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue `fn(*args, **kwargs)`."""
        self.queue.put((fn, args, kwargs))

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            fn, args, kwargs = item
            try:
                fn(*args, **kwargs)
            except Exception as exc:  # one failed send or update; the others go on
                pb_utils.Logger.log_warn(f"{self.name}: {exc}")

    def close(self) -> None:
        """Run what is queued, then stop."""
        self.queue.put(None)
        self.thread.join()


@dataclass(frozen=True)
class StreamOptions:
    """How a streamed request wants its progress: a preview every `preview_every` steps (0:
    none), progress at most every `interval_s` seconds (0: every step)."""

    preview_every: int = 0
    interval_s: float = 0.0

    @classmethod
    def of(cls, triton_request: Any) -> StreamOptions:
        """The request's options; InvalidRequest names a negative one."""
        return cls(
            int(_option(triton_request, "preview_every")),
            float(_option(triton_request, "progress_interval_s")),
        )


def _option(triton_request: Any, name: str) -> float:
    """A streaming option's value (0 when absent); InvalidRequest when negative."""
    tensor = pb_utils.get_input_tensor_by_name(triton_request, name)
    value = 0 if tensor is None else _column(tensor)[0].item()
    if not value >= 0:
        raise InvalidRequest(f"{name} is {value}; use 0 or more")
    return value


class Progress:
    """The progress responses of one streamed request: after the first and last steps,
    after a step with a preview (every `preview_every` steps, never the last, which the
    image follows), and after any other step `interval_s` or more after the last sent."""

    def __init__(
        self, sender: Any, background: Background, options: StreamOptions, count_step: StepObserver
    ) -> None:
        self.sender, self.background, self.options = sender, background, options
        self.count_step = count_step
        self.start = self.sent_at = time.perf_counter()

    def tensors(self, done: int, total: int) -> list[Any]:
        """The step, the steps in all and the seconds since the request began."""
        return [
            pb_utils.Tensor("step", np.array([[done]], dtype=np.int32)),
            pb_utils.Tensor("total_steps", np.array([[total]], dtype=np.int32)),
            pb_utils.Tensor(
                "elapsed_s", np.array([[time.perf_counter() - self.start]], dtype=np.float32)
            ),
        ]

    def on_step(self, done: int, total: int, latents: torch.Tensor) -> None:
        """Queue this step's progress (and preview) when one is due."""
        self.count_step(done, total, latents)
        every = self.options.preview_every
        preview = bool(every) and done % every == 0 and done < total
        now = time.perf_counter()
        if not (preview or done in (1, total) or now - self.sent_at >= self.options.interval_s):
            return
        self.sent_at = now
        tensors = self.tensors(done, total)
        if preview:
            tensors.append(pb_utils.Tensor("preview", preview_pixels(latents)[np.newaxis]))
        self.background.call(self.sender.send, pb_utils.InferenceResponse(output_tensors=tensors))


class TritonPythonModel:
    """The stable_diffusion model as Triton's Python backend calls it."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load the weights under the model config; a config or weights problem fails the
        load with a message naming it."""
        _utf8_text_files()
        config = json.loads(args["model_config"])
        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        weights = Path(args["model_repository"]) / args["model_version"] / "weights"
        self.core = StableDiffusionCore(
            weights, parameters, max_batch_size=int(config.get("max_batch_size", 0))
        )
        # This process is the model's own, so its torch pool is sized for the model.
        torch.set_num_threads(self.core.settings.torch_threads)
        self.streaming = pb_utils.using_decoupled_model_transaction_policy(config)
        self.background = Background(f"{config['name']} sends")
        # On Triton's /metrics: the UNet work done, row by row, so a cancellation shows
        # as the steps it saved. Counted here and added once per execution, in the
        # background: each increment is a round trip to the server process.
        self.steps_family = pb_utils.MetricFamily(
            name="forge_denoising_steps_total",
            description="Denoising steps done, counted once per image (row) per step",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.steps = self.steps_family.Metric(labels={"model": config["name"]})
        self.steps_done = 0
        self.core.warm_up()
        pb_utils.Logger.log_info(
            f"{config['name']}: {self.core.model_name} version {self.core.model_version}, "
            f"{self.core.contract}"
        )

    def finalize(self) -> None:
        """Send what is queued; let go of the step counter (its metric before its family, as
        Triton requires)."""
        self.background.close()
        del self.steps
        del self.steps_family

    def _count_step(self, done: int, total: int, latents: torch.Tensor) -> None:
        self.steps_done += 1

    def _rows(self, triton_request: Any, sender: Any) -> list[Row]:
        """The request's rows (a static batch), resolved and validated, in order; streamed,
        one row, told of its steps."""
        prompt = pb_utils.get_input_tensor_by_name(triton_request, "prompt")
        if prompt is None:
            raise InvalidRequest("the input prompt is required")
        prompts = _column(prompt)
        columns: dict[str, np.ndarray] = {}
        for name in OPTIONAL_INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(triton_request, name)
            if tensor is not None:
                columns[name] = _column(tensor)
                if len(columns[name]) != len(prompts):
                    raise InvalidRequest(
                        f"{name} has {len(columns[name])} rows; prompt has {len(prompts)}"
                    )
        on_step: StepObserver = self._count_step
        if sender is not None:
            if len(prompts) != 1:
                raise InvalidRequest(
                    f"a streamed request makes one image, not {len(prompts)}: "
                    "send one request per image"
                )
            on_step = Progress(
                sender, self.background, StreamOptions.of(triton_request), self._count_step
            ).on_step
        images = _images(triton_request, len(prompts))
        rows = []
        for i, text in enumerate(prompts):
            given = {name: OPTIONAL_INPUTS[name](column[i]) for name, column in columns.items()}
            request = GenerationRequest(prompt=_text(text, "prompt"), image=images[i], **given)
            rows.append(self.core.row(request, triton_request.is_cancelled, on_step))
        return rows

    def execute(self, requests: list[Any]) -> list[Any] | None:
        """One response per request: images, the seeds used and the safety flags, or a
        typed error; streamed, sent as each request's final response after its progress."""
        responses: list[Any] = [None] * len(requests)
        senders: list[Any] = [r.get_response_sender() if self.streaming else None for r in requests]
        accepted: list[tuple[int, list[Row]]] = []
        for n, triton_request in enumerate(requests):
            try:
                accepted.append((n, self._rows(triton_request, senders[n])))
            except InvalidRequest as exc:
                responses[n] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                )
        all_rows = [row for _, rows in accepted for row in rows]
        try:
            outcomes = self.core.generate_outcomes(all_rows)
        except Exception as exc:  # outside any one batch: fails every request, not the server
            outcomes = [RowFailure("the execution", exc)] * len(all_rows)
        if self.steps_done:  # queued before a streamed request's final response
            self.background.call(self.steps.increment, self.steps_done)
            self.steps_done = 0
        for failure in {id(o): o for o in outcomes if isinstance(o, RowFailure)}.values():
            pb_utils.Logger.log_error(f"stable_diffusion: generation failed: {failure}")
        offset = 0
        for n, rows in accepted:
            responses[n] = _response(rows, outcomes[offset : offset + len(rows)])
            offset += len(rows)
        if not self.streaming:
            return responses
        for sender, response in zip(senders, responses, strict=True):
            final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            self.background.call(sender.send, _with_status_name(response), flags=final)
        return None


def _with_status_name(response: Any) -> Any:
    """A streamed error reaches the client as its message alone (no status): the message
    starts with the status name, `INVALID_ARG: ...`, so the client still knows whose fault
    it was."""
    if not response.has_error():
        return response
    error = response.error()
    names = {
        pb_utils.TritonError.INVALID_ARG: "INVALID_ARG",
        pb_utils.TritonError.CANCELLED: "CANCELLED",
    }
    name = names.get(error.code(), "INTERNAL")
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(f"{name}: {error.message()}", error.code())
    )


def _response(rows: list[Row], outcomes: list[Outcome]) -> Any:
    """One request's response: INTERNAL naming each failure of its rows, else CANCELLED
    where a row was cancelled, else its images, seeds and safety flags."""
    failures = list(dict.fromkeys(str(o) for o in outcomes if isinstance(o, RowFailure)))
    if failures:
        message = f"generation failed: {'; '.join(failures)}"
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL)
        )
    images = [o for o in outcomes if isinstance(o, np.ndarray)]
    if len(images) < len(outcomes):
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError("request cancelled", pb_utils.TritonError.CANCELLED)
        )
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("generated_image", np.stack(images)),
            pb_utils.Tensor("seed", np.array([[r.request.seed] for r in rows], dtype=np.int64)),
            pb_utils.Tensor("flagged", np.array([[r.flagged] for r in rows], dtype=np.bool_)),
        ]
    )
