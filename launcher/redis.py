"""A local redis-server (Debian's package), in memory only."""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from launcher.process import Managed, Service, ServiceError, free_port


def _answers_ping(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")


@dataclass
class RedisServer(Managed):
    workdir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    persistent: bool = False  # append-only file in workdir: data survives a restart
    service: Service | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, *, detached: bool = False) -> RedisServer:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise ServiceError("redis-server is not installed (Debian package redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--dir",
            str(self.workdir),
            "--protected-mode",
            "yes",
        ]
        self.service = Service("redis", argv, self.workdir / "redis.log").start(detached=detached)
        self.service.wait_until(lambda: _answers_ping(self.host, self.port), 20, "PONG")
        return self

    def describe(self) -> dict[str, str]:
        return {"url": self.url}
