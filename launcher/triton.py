"""The real `tritonserver` from the nvidia-pytriton wheel, on a model repository.

Triton's Python backend runs each model in a stub process that links libpython and finds
this project's packages through the `python3` first on PATH, so the environment is set here.
Models load in explicit mode, which also lets a caller override config.pbtxt fields
(batch size, queue delay, instances) at load time without editing the repository.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytriton
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from launcher.process import Service, free_port

PYTRITON_DIR = Path(pytriton.__file__).parent / "tritonserver"


def backend_directory(root: Path) -> Path:
    """A backend folder Triton accepts: the Python backend plus the stub for this Python."""
    python_dir = root / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        "libtriton_python.so": PYTRITON_DIR / "backends/python/libtriton_python.so",
        "triton_python_backend_utils.py": PYTRITON_DIR
        / "backends/python/triton_python_backend_utils.py",
        "triton_python_backend_stub": PYTRITON_DIR
        / f"python_backend_stubs/{version}/triton_python_backend_stub",
    }
    for name, source in sources.items():
        link = python_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    return root


@dataclass
class ModelOverrides:
    """config.pbtxt fields a deployment tunes without editing the repository."""

    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    instances: int | None = None
    parameters: dict[str, str] = field(default_factory=dict)

    def apply(self, config_pbtxt: Path) -> str | None:
        """The model config as JSON with the overrides applied, or None if there are none."""
        if self == ModelOverrides():
            return None
        config = text_format.Parse(config_pbtxt.read_text(), model_config_pb2.ModelConfig())
        if self.max_batch_size is not None:
            config.max_batch_size = self.max_batch_size
        if self.max_queue_delay_us is not None:
            config.dynamic_batching.max_queue_delay_microseconds = self.max_queue_delay_us
        if self.instances is not None:
            for group in config.instance_group:
                group.count = self.instances
        for key, value in self.parameters.items():
            config.parameters[key].string_value = value
        return json_format.MessageToJson(config, preserving_proto_field_name=True)


@dataclass
class Triton:
    repository: Path
    workdir: Path
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    service: Service | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        lib = Path(sys.base_prefix) / "lib"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(lib), env.get("LD_LIBRARY_PATH", "")) if p
        )
        return env

    def start(self, *, detached: bool = False) -> Triton:
        argv = [
            str(PYTRITON_DIR / "bin/tritonserver"),
            f"--model-repository={self.repository.resolve()}",
            f"--backend-directory={backend_directory(self.workdir / 'backends')}",
            "--model-control-mode=explicit",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=true",
            "--metrics-interval-ms=1000",
            "--exit-timeout-secs=30",
            "--log-verbose=0",
        ]
        self.service = Service(
            "tritonserver", argv, self.workdir / "tritonserver.log", env=self._env()
        ).start(detached=detached)
        self.service.wait_until(self._live, 60, "live server")
        return self

    def _client(self) -> Any:
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(self.http_url, network_timeout=600)

    def _live(self) -> bool:
        return bool(self._client().is_server_live())

    def load(
        self, model: str = "stable_diffusion", overrides: ModelOverrides | None = None
    ) -> None:
        config = (overrides or ModelOverrides()).apply(self.repository / model / "config.pbtxt")
        self._client().load_model(model, config=config)
        assert self.service is not None
        self.service.wait_until(lambda: self._client().is_model_ready(model), 120, f"{model} ready")

    def unload(self, model: str = "stable_diffusion") -> None:
        self._client().unload_model(model)

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()

    def describe(self) -> dict[str, Any]:
        return {
            "http": self.http_url,
            "grpc": self.grpc_url,
            "metrics": f"{self.host}:{self.metrics_port}",
        }


def describe_json(triton: Triton) -> str:
    return json.dumps(triton.describe())
