"""Triton Python-backend adapter: Triton requests in, pipeline rows, Triton responses out.

All the work is in `sd_pipeline` (which never imports Triton). Here: hand the model config to
the core, turn each request's rows into `GenerationRequest`s holding only the inputs that
arrived (the core fills in the rest from the generation contract), map errors to typed
`TritonError`s, and answer every request exactly once. A request whose rows span batches (a
static batch of mixed sizes) fails if any of its rows failed; the other requests of the
execution get their images.
"""

from __future__ import annotations

import contextlib
import json
import locale
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from sd_pipeline import Outcome, RowFailure, StableDiffusionCore
from sd_requests import GenerationRequest, InvalidRequest, Row


def _text(value: Any, name: str) -> str:
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{name} is not valid UTF-8") from exc


# Optional input -> its GenerationRequest field's value from one row of the tensor.
OPTIONAL_INPUTS: dict[str, Callable[[Any], Any]] = {
    "negative_prompt": lambda v: _text(v, "negative_prompt"),
    "seed": int,
    "steps": int,
    "guidance_scale": float,
    "width": int,
    "height": int,
    "scheduler": lambda v: _text(v, "scheduler"),
}


def _column(tensor: Any) -> np.ndarray:
    array = tensor.as_numpy()
    return array.reshape(array.shape[0], -1)[:, 0]


def _utf8_text_files() -> None:
    """The backend stub embeds an isolated Python that never sets its locale, so open()
    reads text as ASCII; torch.compile's kernel templates are UTF-8."""
    with contextlib.suppress(locale.Error):  # no such locale here: keep the default
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")


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
        self.core.warm_up()
        pb_utils.Logger.log_info(
            f"stable_diffusion: {self.core.model_name} version {self.core.model_version}, "
            f"{self.core.contract}"
        )

    def _rows(self, triton_request: Any) -> list[Row]:
        """The request's rows (a static batch), resolved and validated, in order."""
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
        rows = []
        for i, text in enumerate(prompts):
            given = {name: OPTIONAL_INPUTS[name](column[i]) for name, column in columns.items()}
            request = GenerationRequest(prompt=_text(text, "prompt"), **given)
            rows.append(self.core.row(request, triton_request.is_cancelled))
        return rows

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request: images and the seeds used, or a typed error."""
        responses: list[Any] = [None] * len(requests)
        accepted: list[tuple[int, list[Row]]] = []
        for n, triton_request in enumerate(requests):
            try:
                accepted.append((n, self._rows(triton_request)))
            except InvalidRequest as exc:
                responses[n] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                )
        all_rows = [row for _, rows in accepted for row in rows]
        try:
            outcomes = self.core.generate_outcomes(all_rows)
        except Exception as exc:  # outside any one batch: fails every request, not the server
            outcomes = [RowFailure("the execution", exc)] * len(all_rows)
        for failure in {id(o): o for o in outcomes if isinstance(o, RowFailure)}.values():
            pb_utils.Logger.log_error(f"stable_diffusion: generation failed: {failure}")
        offset = 0
        for n, rows in accepted:
            responses[n] = _response(rows, outcomes[offset : offset + len(rows)])
            offset += len(rows)
        return responses


def _response(rows: list[Row], outcomes: list[Outcome]) -> Any:
    """One request's response: INTERNAL naming each failure of its rows, else CANCELLED
    where a row was cancelled, else its images and seeds."""
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
        ]
    )
