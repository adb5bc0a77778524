"""`python -m launcher`: start, extend, inspect and stop a local stack from the command line.

    python -m launcher up [--state-dir DIR] [--services triton,redis,...] [--free-ports]
                          [--env FORGE_X=VALUE ...] [--repository DIR] [--no-load] [--json]
    python -m launcher add worker [--state-dir DIR] [--env FORGE_X=VALUE ...] [--json]
    python -m launcher start SERVICE [--state-dir DIR] [--no-load] [--json]
    python -m launcher status [--state-dir DIR]
    python -m launcher down [--state-dir DIR]
    python -m launcher repository --out DIR

`up` alone is `make up`: every service on the fixed ports of LauncherSettings (FORGE_*_PORT
overrides them), state in var/. `--free-ports` gives each service a port of its own instead;
`--json` prints the state file (where everything listens) instead of a summary. `start` starts
one recorded service that died (triton, redis, broker, gateway, worker, worker-N) again on its
recorded ports, as a supervisor would; Triton loads the model unless `--no-load`. `repository`
writes a fresh model repository with the committed model and no exported weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from launcher.process import ServiceError
from launcher.settings import LauncherSettings
from launcher.stack import (
    SERVICES,
    StackState,
    add_worker,
    down,
    parse_env,
    parse_services,
    start_service,
    up,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launcher", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def with_state(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--state-dir", type=Path, help="state folder (default var, FORGE_STATE_DIR)")
        return p

    start = with_state(sub.add_parser("up", help="start services (all of make up by default)"))
    start.add_argument("--services", default=",".join(SERVICES), help="comma-separated subset")
    start.add_argument("--free-ports", action="store_true", help="any free port for each")
    start.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a FORGE_ setting for the gateway and workers (repeatable)",
    )
    start.add_argument("--repository", type=Path, help="Triton model repository")
    start.add_argument("--no-load", action="store_true", help="start Triton without the model")
    start.add_argument("--json", action="store_true", help="print the state as JSON")
    add = with_state(sub.add_parser("add", help="add a service to a running stack"))
    add.add_argument("what", choices=["worker"])
    add.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    add.add_argument("--json", action="store_true", help="print the new service as JSON")
    again = with_state(sub.add_parser("start", help="start a recorded service that died again"))
    again.add_argument("service", help="its name in the state file: triton, redis, worker-2, ...")
    again.add_argument("--no-load", action="store_true", help="start Triton without the model")
    again.add_argument("--json", action="store_true", help="print its new record as JSON")
    with_state(sub.add_parser("status", help="print the state file (JSON)"))
    with_state(sub.add_parser("down", help="stop every service of the stack"))
    copy = sub.add_parser("repository", help="a fresh model repository without exports")
    copy.add_argument("--out", type=Path, required=True)
    return parser


def _summary(state: StackState) -> None:
    for name, record in state.services.items():
        details = ", ".join(f"{k} {v}" for k, v in record.items() if k not in ("pid", "started_at"))
        print(f"{name}: {details}")
    print(f"dev API key: {state.dev_api_key}")


def _up(args: argparse.Namespace, settings: LauncherSettings) -> int:
    if args.free_ports:
        settings = settings.with_free_ports()
    if args.repository is not None:
        settings = replace(settings, model_repository=args.repository)
    state = up(
        settings,
        parse_services(args.services),
        parse_env(args.env),
        load_model=not args.no_load,
    )
    if args.json:
        print(json.dumps(asdict(state), indent=2))
    else:
        _summary(state)
    return 0


def _run(args: argparse.Namespace) -> int:
    settings = LauncherSettings.from_env()
    if getattr(args, "state_dir", None) is not None:
        settings = replace(settings, state_dir=args.state_dir)
    if args.command == "up":
        return _up(args, settings)
    if args.command == "add":
        name, state = add_worker(settings.state_dir, parse_env(args.env))
        record = {"name": name, **state.services[name]}
        print(json.dumps(record, indent=2) if args.json else f"{name}: {record['url']}")
        return 0
    if args.command == "start":
        state = start_service(settings.state_dir, args.service, load_model=not args.no_load)
        record = {"name": args.service, **state.services[args.service]}
        print(json.dumps(record, indent=2) if args.json else f"{args.service}: pid {record['pid']}")
        return 0
    if args.command == "status":
        current = StackState.load(settings.state_dir)
        print(json.dumps(asdict(current) if current else None, indent=2))
        return 0 if current else 1
    if args.command == "down":
        stopped = down(settings.state_dir)
        for name, was_running in stopped:
            print(f"{name}: {'stopped' if was_running else 'was not running'}")
        if not stopped:
            print("nothing to stop")
        return 0
    from launcher.triton import copy_model_repository

    print(copy_model_repository(args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one launcher command; errors are printed, with exit status 1 (2 for usage)."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (ServiceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
