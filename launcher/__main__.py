"""`python -m launcher up|down`: the local stack for `make up`, detached, tracked in var/run."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from typing import Any

from launcher.gateway import GatewayServer, WorkerServer
from launcher.kafka import KafkaBroker
from launcher.process import ServiceError, stop_pid
from launcher.prometheus import AlertmanagerServer, PrometheusServer
from launcher.redis import RedisServer
from launcher.settings import LauncherSettings
from launcher.triton import Triton


def local_stack(settings: LauncherSettings, dev_key: str) -> list[tuple[str, Any]]:
    """Every service of `make up`, in start order."""
    host, state = settings.host, settings.state_dir
    triton = Triton(
        settings.model_repository,
        state / "triton",
        host=host,
        http_port=settings.triton_http_port,
        grpc_port=settings.triton_grpc_port,
        metrics_port=settings.triton_metrics_port,
    )
    redis = RedisServer(state / "redis", port=settings.redis_port, host=host, persistent=True)
    broker = KafkaBroker(state / "broker", port=settings.kafka_port, host=host)
    env = {
        "FORGE_TRITON_GRPC_URL": triton.grpc_url,
        "FORGE_REDIS_URL": redis.url,
        "FORGE_KAFKA_BOOTSTRAP": broker.bootstrap,
        "FORGE_ASSET_DIR": str((state / "assets").resolve()),
        "FORGE_DEV_API_KEY": dev_key,
    }
    gateway = GatewayServer(state / "gateway", env, port=settings.gateway_port, host=host)
    worker = WorkerServer(state / "worker", env, port=settings.worker_metrics_port, host=host)
    # Last: Prometheus scrapes the services above with the chart's rule files, and alerts
    # through Alertmanager (the chart's routes).
    alertmanager = AlertmanagerServer(
        state / "alertmanager",
        webhook_url=settings.alert_webhook_url,
        port=settings.alertmanager_port,
        host=host,
    )
    prometheus = PrometheusServer(
        state / "prometheus",
        {
            "triton": [f"{host}:{settings.triton_metrics_port}"],
            "gateway": [f"{host}:{settings.gateway_port}"],
            "worker": [f"{host}:{settings.worker_metrics_port}"],
        },
        port=settings.prometheus_port,
        host=host,
        alertmanagers=[alertmanager.address],
    )
    return [
        ("triton", triton),
        ("redis", redis),
        ("broker", broker),
        ("gateway", gateway),
        ("worker", worker),
        ("alertmanager", alertmanager),
        ("prometheus", prometheus),
    ]


def up(settings: LauncherSettings) -> int:
    if settings.run_file.exists():
        print(f"already up ({settings.run_file}); run `make down` first", file=sys.stderr)
        return 1
    dev_key = settings.dev_api_key or f"fk_dev_{secrets.token_urlsafe(24)}"
    started: dict[str, Any] = {}
    try:
        for name, server in local_stack(settings, dev_key):
            server.start(detached=True)
            started[name] = {
                "pid": server.service.pid,
                **server.describe(),
                "log": str(server.service.log_file),
            }
            if isinstance(server, Triton):
                server.load()
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for service in reversed(started.values()):
            stop_pid(int(service["pid"]))
        return 1
    settings.run_file.parent.mkdir(parents=True, exist_ok=True)
    settings.run_file.write_text(json.dumps(started, indent=2))
    (settings.state_dir / "run" / "dev-api-key").write_text(dev_key + "\n")
    for name, service in started.items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in service.items() if k != "pid"))
    print(f"dev API key: {dev_key}")
    return 0


def down(settings: LauncherSettings) -> int:
    if not settings.run_file.exists():
        print("nothing to stop")
        return 0
    services = json.loads(settings.run_file.read_text())
    for name, service in reversed(services.items()):
        stopped = stop_pid(int(service["pid"]))
        print(f"{name}: {'stopped' if stopped else 'was not running'}")
    settings.run_file.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher")
    parser.add_argument("command", choices=["up", "down"])
    args = parser.parse_args(argv)
    settings = LauncherSettings()
    return up(settings) if args.command == "up" else down(settings)


if __name__ == "__main__":
    sys.exit(main())
