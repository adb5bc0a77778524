"""The gateway (`python -m gateway`) and its workers (`python -m gateway.worker`) as local
services, configured through FORGE_ environment variables."""

from __future__ import annotations

import os
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from launcher.process import Managed, Service, free_port


def _answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as reply:
        return bool(reply.status == 200)


@dataclass
class PythonService(Managed):
    workdir: Path
    env: dict[str, str]
    module: str
    port_env: str  # the setting that takes the port
    health_path: str
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    service: Service | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, *, detached: bool = False) -> PythonService:
        env = {**os.environ, **self.env, "FORGE_HOST": self.host, self.port_env: str(self.port)}
        self.service = Service(
            self.module,
            [sys.executable, "-m", self.module],
            self.workdir / f"{self.module}.{self.port}.log",
            env=env,
        )
        self.service.start(detached=detached)
        self.service.wait_until(lambda: _answers(self.url + self.health_path), 60, self.health_path)
        return self

    def describe(self) -> dict[str, str]:
        return {"url": self.url}


@dataclass
class GatewayServer(PythonService):
    module: str = "gateway"
    port_env: str = "FORGE_PORT"
    health_path: str = "/healthz"


@dataclass
class WorkerServer(PythonService):
    module: str = "gateway.worker"
    port_env: str = "FORGE_WORKER_METRICS_PORT"
    health_path: str = "/metrics"
