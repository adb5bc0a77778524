"""The model's pipeline core in this process: the one place perf imports the model's code.

The model's modules (`sd_pipeline`, `sd_requests`, ...) sit beside Triton's `model.py` and are
no package, so they are imported from their folder here, and nowhere else in perf. A core is
built as Triton builds it: from the model config that `python -m export config` wrote into a
repository (`configs/exported.pbtxt`), with parameter overrides where a check needs another
runtime setting (`torch_compile`, say).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL_CODE = ROOT / "model_repository" / "stable_diffusion" / "1"
MODEL = "stable_diffusion"


def import_pipeline_core() -> tuple[ModuleType, ModuleType]:
    """The model's `sd_pipeline` and `sd_requests` modules, imported from their folder."""
    if str(MODEL_CODE) not in sys.path:
        sys.path.insert(0, str(MODEL_CODE))
    return importlib.import_module("sd_pipeline"), importlib.import_module("sd_requests")


def exported_config(repository: Path) -> tuple[dict[str, str], int]:
    """The parameters (strings, as Triton passes them) and max_batch_size of the config that
    `python -m export config` wrote into `repository`."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = (repository / MODEL / "configs" / "exported.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    return parameters, int(config.max_batch_size)


def weights_dir(repository: Path) -> Path:
    """The published weights of the model in `repository`."""
    return repository / MODEL / "1" / "weights"


def load_core(repository: Path, **overrides: str) -> Any:
    """The pipeline core on `repository`'s weights and exported config, with parameter
    `overrides`; on CUDA when torch sees a GPU (runtime `torch`: fp16 there, fp32 on a CPU)."""
    sd_pipeline, _ = import_pipeline_core()
    parameters, max_batch_size = exported_config(repository)
    return sd_pipeline.StableDiffusionCore(
        weights_dir(repository), {**parameters, **overrides}, max_batch_size=max_batch_size
    )


def generation_request(**fields: Any) -> Any:
    """A `GenerationRequest` of the model's own type."""
    _, sd_requests = import_pipeline_core()
    return sd_requests.GenerationRequest(**fields)
