"""The system under test, driven through its commands: `python -m launcher`, `python -m export`.

Benchmarks import nothing from the other wings: they start services with the launcher's
command line (every service on a free port, under a state folder of the benchmark's own),
read where each listens from the JSON it prints, and stop them with `down`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def command(module: str, *args: str) -> str:
    """Run `python -m <module> <args>` from the repository root; its stdout.

    Its stderr (progress, errors) goes to ours; a non-zero exit raises RuntimeError.
    """
    argv = [sys.executable, "-m", module, *args]
    run = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[1:])} exited with {run.returncode}")
    return run.stdout


def env_args(env: Mapping[str, str]) -> list[str]:
    """--env NAME=VALUE for each setting."""
    return [f"--env={name}={value}" for name, value in env.items()]


@contextmanager
def stack(
    state_dir: Path,
    services: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    repository: Path | None = None,
    load_model: bool = True,
) -> Iterator[dict[str, Any]]:
    """`python -m launcher up --free-ports` for `services`; yields its state, then `down`.

    The state (the launcher's JSON) holds each service's addresses under "services", the
    dev API key under "dev_api_key". `load_model=False` starts Triton without the model.
    """
    args = ["up", f"--state-dir={state_dir}", f"--services={','.join(services)}"]
    args += ["--free-ports", "--json", *env_args(env or {})]
    if repository is not None:
        args.append(f"--repository={repository}")
    if not load_model:
        args.append("--no-load")
    state = json.loads(command("launcher", *args))
    try:
        yield state
    finally:
        command("launcher", "down", f"--state-dir={state_dir}")


def add_worker(state_dir: Path) -> dict[str, Any]:
    """`python -m launcher add worker`: one more worker in the stack; its record."""
    record: dict[str, Any] = json.loads(
        command("launcher", "add", "worker", f"--state-dir={state_dir}", "--json")
    )
    return record
