"""Fixtures that build the tiny model, export it, and run the real services on free ports."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.triton import Triton

ROOT = Path(__file__).resolve().parents[1]
MODEL_SOURCE = ROOT / "model_repository" / "stable_diffusion"
MODEL_CODE = MODEL_SOURCE / "1"

# The pipeline core is a plain module beside model.py; tests import it without Triton.
sys.path.insert(0, str(MODEL_CODE))


def copy_model_repository(target: Path) -> Path:
    """The committed model (config and code) in a fresh repository, without exported weights."""
    model = target / "stable_diffusion"
    (model / "1").mkdir(parents=True)
    shutil.copy(MODEL_SOURCE / "config.pbtxt", model / "config.pbtxt")
    for source in MODEL_CODE.glob("*.py"):
        shutil.copy(source, model / "1" / source.name)
    return target


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("models") / "forge-tiny-sd")


@pytest.fixture(scope="session")
def repository(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.onnx_export import export_onnx

    repo = copy_model_repository(tmp_path_factory.mktemp("model_repository"))
    export_onnx(str(tiny_model), repo)
    return repo


@pytest.fixture(scope="session")
def weights(repository: Path) -> Path:
    return repository / "stable_diffusion" / "1" / "weights"


@pytest.fixture(scope="session")
def triton(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    server = Triton(repository, tmp_path_factory.mktemp("triton")).start()
    try:
        server.load()
        yield server
    finally:
        server.stop()
