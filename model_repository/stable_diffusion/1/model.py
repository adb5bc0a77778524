"""Triton Python-backend adapter: Triton requests in, pipeline rows, Triton responses out.

All the work is in `sd_pipeline` (which never imports Triton). Here: read the config once,
turn each request's rows into `GenerationRequest`s, map errors to typed `TritonError`s, and
answer every request exactly once.
"""

from __future__ import annotations

import contextlib
import json
import locale
import secrets
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from sd_pipeline import StableDiffusionCore
from sd_requests import SEED_LIMIT, GenerationRequest, InvalidRequest, Limits, Row

OPTIONAL_INPUTS = (
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "width",
    "height",
    "scheduler",
)


def _limits(parameters: dict[str, str]) -> dict[str, Any]:
    """Limits fields set in the config's parameters, converted to the field's type."""
    cast = {"int": int, "float": float, "str": str}
    settable = {
        f.name: cast[str(f.type)]
        for f in fields(Limits)
        if f.name not in ("size_multiple", "default_size")
    }
    return {k: settable[k](v) for k, v in parameters.items() if k in settable}


def _text(value: Any, name: str) -> str:
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{name} is not valid UTF-8") from exc


def _column(tensor: Any) -> np.ndarray:
    array = tensor.as_numpy()
    return array.reshape(array.shape[0], -1)[:, 0]


def _utf8_text_files() -> None:
    """The backend stub embeds an isolated Python that never sets its locale, so open()
    reads text as ASCII; torch.compile's kernel templates are UTF-8."""
    with contextlib.suppress(locale.Error):  # no such locale here: keep the default
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        _utf8_text_files()
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        weights = Path(args["model_repository"]) / args["model_version"] / "weights"
        self.core = StableDiffusionCore(
            weights,
            runtime=params.get("runtime", "onnxruntime"),
            threads=int(params.get("intra_op_threads", "1")),
            limits=_limits(params),
            # TensorRT engines must hold the batches the dynamic batcher forms.
            max_batch_size=max(1, int(config.get("max_batch_size", 1))),
            compile_mode=params.get("torch_compile", ""),
        )
        advertised = (params.get("model_name"), params.get("model_version"))
        if advertised != (self.core.model_name, self.core.model_version):
            raise RuntimeError(
                f"the config advertises model {advertised} but {weights} holds "
                f"{(self.core.model_name, self.core.model_version)}: re-run `python -m export onnx`"
            )
        self.core.warm_up()
        pb_utils.Logger.log_info(
            f"stable_diffusion: {self.core.model_name} version {self.core.model_version}, "
            f"{self.core.limits}"
        )

    def _rows(self, triton_request: Any) -> list[Row]:
        """The request's rows (a static batch), validated, in order."""
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
        limits = self.core.limits
        rows = []
        for i, prompt in enumerate(prompts):
            given = {name: column[i] for name, column in columns.items()}
            request = GenerationRequest(
                prompt=_text(prompt, "prompt"),
                negative_prompt=_text(given.get("negative_prompt", b""), "negative_prompt"),
                scheduler=_text(given.get("scheduler", limits.default_scheduler), "scheduler"),
                seed=int(given["seed"]) if "seed" in given else secrets.randbelow(SEED_LIMIT),
                steps=int(given.get("steps", limits.default_steps)),
                guidance_scale=float(given.get("guidance_scale", limits.default_guidance)),
                width=int(given.get("width", limits.default_size)),
                height=int(given.get("height", limits.default_size)),
            )
            rows.append(self.core.row(request, triton_request.is_cancelled))
        return rows

    def execute(self, requests: list[Any]) -> list[Any]:
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
            images = self.core.generate(all_rows)
        except Exception as exc:  # a failed execution fails its requests, not the server
            pb_utils.Logger.log_error(f"stable_diffusion: generation failed: {exc!r}")
            error = pb_utils.TritonError(f"generation failed: {exc}", pb_utils.TritonError.INTERNAL)
            for n, _ in accepted:
                responses[n] = pb_utils.InferenceResponse(error=error)
            return responses
        offset = 0
        for n, rows in accepted:
            mine = images[offset : offset + len(rows)]
            offset += len(rows)
            images_of_request = [image for image in mine if image is not None]
            if len(images_of_request) < len(mine):
                responses[n] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("request cancelled", pb_utils.TritonError.CANCELLED)
                )
                continue
            responses[n] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("generated_image", np.stack(images_of_request)),
                    pb_utils.Tensor(
                        "seed", np.array([[r.request.seed] for r in rows], dtype=np.int64)
                    ),
                ]
            )
        return responses
