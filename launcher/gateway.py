"""The gateway and its job workers as local services, configured by FORGE_ variables.

`python -m gateway` and `python -m gateway.worker`, each in a process of its own.

Ports: both bind the port their setting names, and accept 0 (uvicorn, and prometheus_client's
start_http_server for the worker's metrics), so a port left at 0 is given by the kernel and
read from the process's own listening socket (`start_reporting_port`).
"""

from __future__ import annotations

import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from launcher.process import Managed, Service, start_reporting_port


def _answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as reply:
        return bool(reply.status == 200)


@dataclass
class PythonService(Managed):
    """A Python module of this project run as a service; `port` 0: any, read back at start."""

    workdir: Path
    env: dict[str, str]
    module: str
    port_env: str  # the setting that takes the port
    health_path: str
    port: int = 0
    host: str = "127.0.0.1"
    service: Service | None = None
    log_file: Path | None = None  # chosen at the first start, appended to by restarts

    @property
    def url(self) -> str:
        """http://host:port."""
        return f"http://{self.host}:{self.port}"

    def _service(self, port: int) -> Service:
        env = {**os.environ, **self.env, "FORGE_HOST": self.host, self.port_env: str(port)}
        if self.log_file is None:  # one per instance: workers may share a folder
            self.log_file = self.workdir / f"{self.module}.{port or os.urandom(3).hex()}.log"
        return Service(self.module, [sys.executable, "-m", self.module], self.log_file, env=env)

    def start(self, *, detached: bool = False) -> PythonService:
        """Start the module and wait until our process answers `health_path` with 200."""
        self.service, self.port = start_reporting_port(
            self._service,
            self.port,
            lambda port: _answers(f"http://{self.host}:{port}{self.health_path}"),
            timeout=60,
            what=self.health_path,
            detached=detached,
        )
        return self

    def describe(self) -> dict[str, str]:
        """Where it listens: its URL."""
        return {"url": self.url}


@dataclass
class GatewayServer(PythonService):
    """The FastAPI gateway under uvicorn; ready when /healthz answers."""

    module: str = "gateway"
    port_env: str = "FORGE_PORT"
    health_path: str = "/healthz"


@dataclass
class WorkerServer(PythonService):
    """A Kafka job worker; `port` is its probes and metrics port, started when /healthz answers."""

    module: str = "gateway.worker"
    port_env: str = "FORGE_WORKER_METRICS_PORT"
    health_path: str = "/healthz"
