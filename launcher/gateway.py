"""The gateway (`python -m gateway`) as a local service, configured through FORGE_ variables."""

from __future__ import annotations

import os
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from launcher.process import Service, free_port


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/healthz", timeout=1) as reply:
        return bool(reply.status == 200)


@dataclass
class GatewayServer:
    workdir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    module: str = "gateway"
    service: Service | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, *, detached: bool = False) -> GatewayServer:
        env = {**os.environ, **self.env, "FORGE_HOST": self.host, "FORGE_PORT": str(self.port)}
        self.service = Service(
            self.module,
            [sys.executable, "-m", self.module],
            self.workdir / f"{self.module}.log",
            env=env,
        )
        self.service.start(detached=detached)
        self.service.wait_until(lambda: _healthy(self.url), 60, "/healthz")
        return self

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()

    def describe(self) -> dict[str, str]:
        return {"url": self.url}
