"""Where the local stack listens and keeps its files, from FORGE_ environment variables.

A plain dataclass rather than pydantic-settings: the launcher also runs the GPU benchmark's
Triton on a machine whose Python has no pydantic.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

PREFIX = "FORGE_"


@dataclass(frozen=True)
class LauncherSettings:
    """`make up`'s fixed addresses; each field is read from FORGE_<FIELD NAME IN CAPITALS>."""

    host: str = "127.0.0.1"
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    redis_port: int = 6379
    kafka_port: int = 9092
    gateway_port: int = 8080
    worker_metrics_port: int = 9300
    prometheus_port: int = 9090
    alertmanager_port: int = 9093
    # Where the local Alertmanager delivers every alert (a webhook); unset keeps the
    # placeholder receivers of helm/forge/files/monitoring/alertmanager.yml (never delivered).
    alert_webhook_url: str | None = None
    dev_api_key: str | None = None
    model_repository: Path = Path("model_repository")
    state_dir: Path = Path("var")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LauncherSettings:
        """The defaults above, overridden by FORGE_ variables (os.environ by default)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(PREFIX + f.name.upper())
            if raw is None:
                continue
            if isinstance(f.default, bool):
                raise AssertionError(f"no boolean settings: {f.name}")
            if isinstance(f.default, int):
                values[f.name] = int(raw)
            elif isinstance(f.default, Path):
                values[f.name] = Path(raw)
            else:
                values[f.name] = raw
        return cls(**values)

    def with_free_ports(self) -> LauncherSettings:
        """The same settings with every port 0: each service gets one from the kernel."""
        ports: dict[str, Any] = {f.name: 0 for f in fields(self) if f.name.endswith("_port")}
        return replace(self, **ports)

    @property
    def run_file(self) -> Path:
        """The state file: what `up` started, where it listens (JSON)."""
        return self.state_dir / "run" / "services.json"

    @property
    def dev_key_file(self) -> Path:
        """The dev API key `up` gave the gateway, for the CLI and curl."""
        return self.state_dir / "run" / "dev-api-key"
