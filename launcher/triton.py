"""The real `tritonserver` from the nvidia-pytriton wheel, on a model repository.

Triton's Python backend runs each model in a stub process that links libpython and finds
this project's packages through the `python3` first on PATH, so the environment is set here.
Models load in explicit mode. Triton loads each model's `configs/exported.pbtxt`, the config
that `python -m export config` writes (the committed config.pbtxt, its overrides and the
exported model's identity); a different configuration is a different file written by that
command, never an override passed at load time.

Ports: Triton refuses port 0 for more than one of its three listeners, and reports the
configured port rather than the bound one, so its HTTP, gRPC and metrics ports are picked
free and checked to belong to the process started (`start_on_ports`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.process import Managed, Service, ServiceError, start_on_ports

REPOSITORY_SOURCE = Path(__file__).resolve().parents[1] / "model_repository"
MODEL_SOURCE = REPOSITORY_SOURCE / "stable_diffusion"
MODEL_NAME = "stable_diffusion"
# The same model under a decoupled policy: progress after every step, then the image.
STREAM_MODEL_NAME = "stable_diffusion_stream"
# The studio styles MODEL_NAME serves now (a listing: no image work).
STYLES_MODEL_NAME = "stable_diffusion_styles"
# What a stack serves: all three, from one copy of the code and weights.
SERVED_MODELS = (MODEL_NAME, STREAM_MODEL_NAME, STYLES_MODEL_NAME)
# configs/<name>.pbtxt in each model folder: what `python -m export config` writes.
MODEL_CONFIG_NAME = "exported"
# What an export adds to a model folder; a fresh copy of the committed model leaves it out.
EXPORTED = ("weights", "weights-*", ".staging-*", "configs", "__pycache__", "*.pyc")


def pytriton_dir() -> Path:
    """The tritonserver the nvidia-pytriton wheel carries: located, never imported.

    Importing pytriton would pull in its client's dependencies, which the server does not need.
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise ServiceError("nvidia-pytriton is not installed: it carries the tritonserver binary")
    return Path(spec.origin).parent / "tritonserver"


def copy_model_repository(target: Path) -> Path:
    """A fresh model repository at `target` holding the committed models, without exports.

    Everything in model_repository is copied (configs, code, schemas; the streaming model's
    version folder stays a link to stable_diffusion's) except what an export writes there
    (weights, the exported configs).
    """
    shutil.copytree(
        REPOSITORY_SOURCE,
        target,
        symlinks=True,
        ignore=shutil.ignore_patterns(*EXPORTED),
        dirs_exist_ok=True,
    )
    return target


def backend_directory(root: Path) -> Path:
    """A backend folder Triton accepts: the Python backend plus the stub for this Python."""
    server = pytriton_dir()
    python_dir = root / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        "libtriton_python.so": server / "backends/python/libtriton_python.so",
        "triton_python_backend_utils.py": server / "backends/python/triton_python_backend_utils.py",
        "triton_python_backend_stub": server
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
    """tritonserver on `repository`; a port left at 0 is picked free at the first start.

    After `start()` the ports are the ones in use, and a later `start()` (a restart) reuses
    them, so clients keep their address.
    """

    repository: Path
    workdir: Path
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    host: str = "127.0.0.1"
    service: Service | None = None

    @property
    def http_url(self) -> str:
        """host:port of the HTTP/REST endpoint (KServe v2)."""
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """host:port of the gRPC endpoint."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """host:port of the Prometheus metrics endpoint (/metrics)."""
        return f"{self.host}:{self.metrics_port}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        lib = Path(sys.base_prefix) / "lib"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(lib), env.get("LD_LIBRARY_PATH", "")) if p
        )
        return env

    def _argv(self, http: int, grpc: int, metrics: int) -> list[str]:
        return [
            str(pytriton_dir() / "bin/tritonserver"),
            f"--model-repository={self.repository.resolve()}",
            f"--backend-directory={backend_directory(self.workdir / 'backends')}",
            "--model-control-mode=explicit",
            f"--model-config-name={MODEL_CONFIG_NAME}",
            f"--http-address={self.host}",
            f"--http-port={http}",
            f"--grpc-address={self.host}",
            f"--grpc-port={grpc}",
            f"--metrics-address={self.host}",
            f"--metrics-port={metrics}",
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

    def start(self, *, detached: bool = False) -> Triton:
        """Start the server (no model loaded) and wait until it is live on its ports."""

        def make(ports: list[int]) -> Service:
            return Service(
                "tritonserver",
                self._argv(*ports),
                self.workdir / "tritonserver.log",
                env=self._env(),
            )

        self.service, ports = start_on_ports(
            make,
            [self.http_port, self.grpc_port, self.metrics_port],
            lambda ports: self._live(*ports),
            timeout=60,
            what="a live server",
            detached=detached,
        )
        self.http_port, self.grpc_port, self.metrics_port = ports
        return self

    def _client(self, grpc_port: int | None = None) -> Any:
        import tritonclient.grpc as grpcclient  # no gevent, unlike the HTTP client

        return grpcclient.InferenceServerClient(f"{self.host}:{grpc_port or self.grpc_port}")

    def _live(self, http: int, grpc: int, metrics: int) -> bool:
        """Live over gRPC and HTTP, and serving metrics."""
        with self._client(grpc) as client:
            if not client.is_server_live():
                return False
        for port, path in ((http, "/v2/health/live"), (metrics, "/metrics")):
            with urllib.request.urlopen(f"http://{self.host}:{port}{path}", timeout=2) as r:
                if r.status != 200:
                    return False
        return True

    def load(self, model: str = MODEL_NAME, timeout: float = 120.0) -> None:
        """Load `model` from the repository and wait until it is ready (its warm-up included)."""
        from tritonclient.utils import InferenceServerException

        assert self.service is not None, "start() first"
        try:
            with self._client() as client:
                client.load_model(model)
        except InferenceServerException as exc:
            raise ServiceError(f"{model} did not load: {exc}\n{self.service.log_tail()}") from exc
        self.service.wait_listening(
            [self.grpc_port], lambda: self._model_ready(model), timeout, f"{model} ready"
        )

    def load_served(self) -> None:
        """Load every model a stack serves (`SERVED_MODELS`), in order."""
        for model in SERVED_MODELS:
            self.load(model)

    def _model_ready(self, model: str) -> bool:
        with self._client() as client:
            return bool(client.is_model_ready(model))

    def unload(self, model: str = MODEL_NAME) -> None:
        """Unload `model` (the server stays up)."""
        with self._client() as client:
            client.unload_model(model)

    def describe(self) -> dict[str, Any]:
        """Where it listens (host:port for http, grpc and metrics) and what it serves."""
        return {
            "http": self.http_url,
            "grpc": self.grpc_url,
            "metrics": self.metrics_url,
            "repository": str(self.repository.resolve()),
        }
