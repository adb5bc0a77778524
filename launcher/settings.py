"""Where the local stack listens and keeps its files (env prefix FORGE_)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class LauncherSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FORGE_", extra="ignore")

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

    @property
    def run_file(self) -> Path:
        return self.state_dir / "run" / "services.json"
