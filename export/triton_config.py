"""The model config Triton loads: committed config.pbtxt + deployment overrides + the values
copied from the weights' manifest.

`python -m export config` writes `<model>/configs/exported.pbtxt`, which Triton loads with
`--model-config-name=exported`. It starts from the committed config.pbtxt (the source of
truth for tensor names and the generation contract), applies what a deployment tunes
(runtime, instance kind and count, batch size, queue delay, parameters) and adds, from the
published weights' manifest, the model's name and version and the contract values the
weights fix (`size_multiple`, `default_size`, `max_prompt_tokens`), so clients read them
from Triton's model config. The ONNX export writes it too; a Kubernetes init container
rewrites it with the node's settings. The model refuses a config whose copies differ from
its weights.

A model folder beside it whose config.pbtxt names it in `streams_model` (the streaming
model: the same code and weights under a decoupled policy) gets its exported config written
at the same time: this model's exported config with that folder's name, transaction policy,
extra inputs, outputs and parameters, so that both serve one generation contract.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.errors import ExportError
from export.weights_schema import WeightsSchema

EXPORTED_CONFIG = "exported"
STREAMS_MODEL = "streams_model"
INSTANCE_KINDS = {"KIND_CPU", "KIND_GPU"}


@dataclass
class ConfigOverrides:
    """config.pbtxt fields a deployment tunes without editing the repository."""

    runtime: str | None = None
    instance_kind: str | None = None
    instances: int | None = None
    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    parameters: dict[str, str] = field(default_factory=dict)

    def apply(self, config: model_config_pb2.ModelConfig) -> model_config_pb2.ModelConfig:
        """`config` with these overrides set (changed in place and returned)."""
        if self.instance_kind is not None and self.instance_kind not in INSTANCE_KINDS:
            raise ExportError(f"instance kind {self.instance_kind!r}: use {sorted(INSTANCE_KINDS)}")
        if self.max_batch_size is not None:
            config.max_batch_size = self.max_batch_size
        if self.max_queue_delay_us is not None:
            config.dynamic_batching.max_queue_delay_microseconds = self.max_queue_delay_us
        for group in config.instance_group:
            if self.instances is not None:
                group.count = self.instances
            if self.instance_kind is not None:
                group.kind = model_config_pb2.ModelInstanceGroup.Kind.Value(self.instance_kind)
        parameters = dict(self.parameters)
        if self.runtime is not None:
            parameters["runtime"] = self.runtime
        for key, value in parameters.items():
            config.parameters[key].string_value = value
        return config


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    """A model config in Triton's text format."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def config_parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    """The config's parameters as Triton hands them to the model: name -> string."""
    return {key: value.string_value for key, value in config.parameters.items()}


def manifest_parameters(manifest: dict[str, Any], manifest_file: Path) -> dict[str, str]:
    """The parameters copied from a weights manifest: model identity and contract values."""
    try:
        copied = {
            "model_name": manifest["model"]["name"],
            "model_version": manifest["model"]["version"],
            **manifest["contract"],
        }
    except (KeyError, TypeError) as exc:
        raise ExportError(
            f"{manifest_file} lacks {exc}: it predates this export, re-run `python -m export onnx`"
        ) from exc
    return {key: str(value) for key, value in copied.items()}


def write_exported_config(model_dir: Path, overrides: ConfigOverrides | None = None) -> Path:
    """configs/exported.pbtxt for the weights published under `model_dir/1/weights`."""
    manifest_file = model_dir / "1" / "weights" / WeightsSchema.of_model(model_dir).manifest_file
    if not manifest_file.is_file():
        raise ExportError(f"{manifest_file} does not exist: export the model first")
    copied = manifest_parameters(json.loads(manifest_file.read_text()), manifest_file)
    config = (overrides or ConfigOverrides()).apply(read_config(model_dir / "config.pbtxt"))
    for key, value in copied.items():
        config.parameters[key].string_value = value
    header = (
        "# Written by `python -m export config`: config.pbtxt + overrides + the values copied "
        "from the weights' manifest.\n"
    )
    target = _write(model_dir, header, config)
    for streaming_dir, streaming in streaming_models(model_dir):
        _write(
            streaming_dir,
            f"# Written by `python -m export config`: {model_dir.name}'s exported config with "
            "what config.pbtxt here adds.\n",
            streaming_config(config, streaming),
        )
    return target


def streaming_models(model_dir: Path) -> list[tuple[Path, model_config_pb2.ModelConfig]]:
    """The model folders beside `model_dir` whose config names it in `streams_model`."""
    found = []
    for path in sorted(model_dir.parent.glob("*/config.pbtxt")):
        config = read_config(path)
        if config_parameters(config).get(STREAMS_MODEL) == model_dir.name:
            found.append((path.parent, config))
    return found


def streaming_config(
    exported: model_config_pb2.ModelConfig, streaming: model_config_pb2.ModelConfig
) -> model_config_pb2.ModelConfig:
    """The streaming model's config: `exported` (inputs, outputs, batching, instances,
    contract) with `streaming`'s name, transaction policy, inputs, outputs and parameters."""
    config = model_config_pb2.ModelConfig()
    config.CopyFrom(exported)
    config.name = streaming.name
    config.model_transaction_policy.CopyFrom(streaming.model_transaction_policy)
    config.input.extend(streaming.input)
    config.output.extend(streaming.output)
    for key, value in streaming.parameters.items():
        config.parameters[key].CopyFrom(value)
    return config


def _write(model_dir: Path, header: str, config: model_config_pb2.ModelConfig) -> Path:
    """configs/exported.pbtxt in `model_dir`, replaced at once."""
    target = model_dir / "configs" / f"{EXPORTED_CONFIG}.pbtxt"
    target.parent.mkdir(exist_ok=True)
    scratch = target.with_suffix(f".{uuid.uuid4().hex}")
    scratch.write_text(header + text_format.MessageToString(config))
    os.replace(scratch, target)
    return target
