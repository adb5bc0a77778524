"""The real `tritonserver` from the nvidia-pytriton wheel, on a model repository.

Triton's Python backend runs each model in a stub process that links libpython and finds
this project's packages through the `python3` first on PATH, so the environment is set here.
Models load in explicit mode, which also lets a caller override config.pbtxt fields
(batch size, queue delay, instances) at load time without editing the repository.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

from export.triton_config import EXPORTED_CONFIG, ConfigOverrides, read_config
from launcher.process import Managed, Service, ServiceError, free_port


def _pytriton_dir() -> Path:
    """The tritonserver the nvidia-pytriton wheel carries: located, never imported (its
    client needs packages the server does not)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise ServiceError("nvidia-pytriton is not installed: it carries the tritonserver binary")
    return Path(spec.origin).parent / "tritonserver"


PYTRITON_DIR = _pytriton_dir()
MODEL_SOURCE = Path(__file__).resolve().parents[1] / "model_repository" / "stable_diffusion"


def copy_model_repository(target: Path) -> Path:
    """The committed model (config and code) in a fresh repository, without exported weights."""
    model = target / MODEL_SOURCE.name
    (model / "1").mkdir(parents=True)
    shutil.copy(MODEL_SOURCE / "config.pbtxt", model / "config.pbtxt")
    for source in (MODEL_SOURCE / "1").glob("*.py"):
        shutil.copy(source, model / "1" / source.name)
    return target


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
class Triton(Managed):
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
            f"--model-config-name={EXPORTED_CONFIG}",  # written by the export, with identity
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
            # Latency quantiles (P50/P90/P95/P99 over a sliding window) for request, queue
            # and compute time: nv_inference_{request,queue,compute_infer}_summary_us.
            "--metrics-config=summary_latencies=true",
            "--exit-timeout-secs=30",
            "--log-verbose=0",
        ]
        self.service = Service(
            "tritonserver", argv, self.workdir / "tritonserver.log", env=self._env()
        ).start(detached=detached)
        self.service.wait_until(self._live, 60, "live server")
        return self

    def _client(self) -> Any:
        import tritonclient.grpc as grpcclient  # no gevent, unlike the HTTP client

        return grpcclient.InferenceServerClient(self.grpc_url)

    def _live(self) -> bool:
        with self._client() as client:
            return bool(client.is_server_live())

    def load(
        self, model: str = "stable_diffusion", overrides: ConfigOverrides | None = None
    ) -> None:
        """Load `model`; overrides apply to this load only (Triton's load API with a config)."""
        config = None
        if overrides is not None:
            exported = self.repository / model / "configs" / f"{EXPORTED_CONFIG}.pbtxt"
            config = json_format.MessageToJson(
                overrides.apply(read_config(exported)), preserving_proto_field_name=True
            )
        assert self.service is not None
        try:
            with self._client() as client:
                client.load_model(model, config=config)
        except InferenceServerException as exc:
            raise ServiceError(f"{model} did not load: {exc}\n{self.service.log_tail()}") from exc
        self.service.wait_until(lambda: self._model_ready(model), 120, f"{model} ready")

    def _model_ready(self, model: str) -> bool:
        with self._client() as client:
            return bool(client.is_model_ready(model))

    def unload(self, model: str = "stable_diffusion") -> None:
        with self._client() as client:
            client.unload_model(model)

    def describe(self) -> dict[str, Any]:
        return {
            "http": self.http_url,
            "grpc": self.grpc_url,
            "metrics": f"{self.host}:{self.metrics_port}",
        }


def describe_json(triton: Triton) -> str:
    return json.dumps(triton.describe())
