"""`python -m launcher up|down`: the local stack for `make up`, detached, tracked in var/run."""

from __future__ import annotations

import argparse
import json
import sys

from launcher.process import ServiceError, stop_pid
from launcher.settings import LauncherSettings
from launcher.triton import Triton


def up(settings: LauncherSettings) -> int:
    if settings.run_file.exists():
        print(f"already up ({settings.run_file}); run `make down` first", file=sys.stderr)
        return 1
    triton = Triton(
        settings.model_repository,
        settings.state_dir / "triton",
        http_port=settings.triton_http_port,
        grpc_port=settings.triton_grpc_port,
        metrics_port=settings.triton_metrics_port,
        host=settings.host,
    )
    services: dict[str, dict[str, object]] = {}
    try:
        triton.start(detached=True)
        assert triton.service is not None
        services["triton"] = {
            "pid": triton.service.pid,
            **triton.describe(),
            "log": str(triton.service.log_file),
        }
        triton.load()
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for service in services.values():
            stop_pid(int(str(service["pid"])))
        return 1
    settings.run_file.parent.mkdir(parents=True, exist_ok=True)
    settings.run_file.write_text(json.dumps(services, indent=2))
    for name, service in services.items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in service.items()))
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
