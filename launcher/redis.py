"""A local redis-server (Debian's package), in memory unless `persistent`, with a password.

It requires a password, as the chart's Redis does: one is made per server unless given,
and it is part of `url` (`redis://:<password>@host:port/0`), which is what clients get.

Ports: `redis-server --port 0` means "no TCP listener", so the port is picked free and
checked to belong to the process started (`start_on_ports`); redis exits when the bind
fails, and the start is retried on a fresh port.
"""

from __future__ import annotations

import secrets
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from launcher.process import Managed, Service, ServiceError, start_on_ports


def _answers_ping(host: str, port: int, password: str) -> bool:
    with socket.create_connection((host, port), timeout=1) as s:
        s.sendall(f"AUTH {password}\r\nPING\r\n".encode())
        reply = b""
        while reply.count(b"\r\n") < 2:
            chunk = s.recv(64)
            if not chunk:
                break
            reply += chunk
        return reply == b"+OK\r\n+PONG\r\n"


@dataclass
class RedisServer(Managed):
    """redis-server on `port` (0: picked free at the first start, kept for restarts)."""

    workdir: Path
    port: int = 0
    host: str = "127.0.0.1"
    # Append-only file in workdir, written through on every write (appendfsync always): job
    # state survives a restart, even a SIGKILL, as the chart's state Redis keeps it.
    persistent: bool = False
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    service: Service | None = None

    @property
    def url(self) -> str:
        """redis://:password@host:port/0."""
        return f"redis://:{self.password}@{self.host}:{self.port}/0"

    def _argv(self, binary: str, port: int) -> list[str]:
        return [
            binary,
            "--port",
            str(port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--appendfsync",
            "always",
            "--dir",
            str(self.workdir),
            "--protected-mode",
            "yes",
            "--requirepass",
            self.password,
        ]

    def start(self, *, detached: bool = False) -> RedisServer:
        """Start redis-server and wait until our process answers PING."""
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise ServiceError("redis-server is not installed (Debian package redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.service, (self.port,) = start_on_ports(
            lambda ports: Service(
                "redis", self._argv(binary, ports[0]), self.workdir / "redis.log"
            ),
            [self.port],
            lambda ports: _answers_ping(self.host, ports[0], self.password),
            timeout=20,
            what="PONG",
            detached=detached,
        )
        return self

    def describe(self) -> dict[str, str]:
        """Where it listens: the redis URL."""
        return {"url": self.url}
