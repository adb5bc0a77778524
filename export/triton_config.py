"""The model config Triton loads: committed config.pbtxt + deployment overrides + identity.

`python -m export config` writes `<model>/configs/exported.pbtxt`, which Triton loads with
`--model-config-name=exported`. It starts from the committed config.pbtxt (the source of
truth for tensor names), applies what a deployment tunes (runtime, instance kind and count,
batch size, queue delay, parameters) and adds the published model's name and version from
its manifest, so clients can read them from Triton's model config. The ONNX export writes it
too; a Kubernetes init container rewrites it with the node's settings.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.errors import ExportError

EXPORTED_CONFIG = "exported"
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
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def write_exported_config(model_dir: Path, overrides: ConfigOverrides | None = None) -> Path:
    """configs/exported.pbtxt for the weights published under `model_dir/1/weights`."""
    manifest_file = model_dir / "1" / "weights" / "manifest.json"
    if not manifest_file.is_file():
        raise ExportError(f"{manifest_file} does not exist: export the model first")
    identity = json.loads(manifest_file.read_text())["model"]
    config = (overrides or ConfigOverrides()).apply(read_config(model_dir / "config.pbtxt"))
    config.parameters["model_name"].string_value = identity["name"]
    config.parameters["model_version"].string_value = identity["version"]
    target = model_dir / "configs" / f"{EXPORTED_CONFIG}.pbtxt"
    target.parent.mkdir(exist_ok=True)
    scratch = target.with_suffix(f".{uuid.uuid4().hex}")
    header = "# Written by `python -m export`: config.pbtxt + overrides + model identity.\n"
    scratch.write_text(header + text_format.MessageToString(config))
    os.replace(scratch, target)
    return target
