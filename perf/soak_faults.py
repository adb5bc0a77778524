"""The soak's fault injector: SIGKILL one service the soak started, then start it again.

Only processes of the soak's own stack are killed: the pid comes from the launcher's state
(`python -m launcher status --state-dir DIR`), and the process must still be the one the
launcher recorded (same creation time) and run the service's command (tritonserver,
redis-server, the tansu broker on the recorded address, `python -m gateway`, `python -m
gateway.worker`) before it gets SIGKILL. After the hold, `python -m launcher start NAME`
starts it again on its recorded ports, as a supervisor would (Triton loads the model again).
One fault at a time, each kind once per round in a seeded random order (so that faults
follow one another in different orders), the long Triton outage first. A fault's window
runs from the kill until the service is back, plus a settling margin (`SETTLE_S`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("triton", "redis", "broker", "worker", "gateway")
SETTLE_S = 10.0  # after a service is back, clients reconnect and backlogs clear
LONG_TRITON_S = 60.0  # the one long Triton outage
RESTART_ESTIMATE_S = {"triton": 40.0, "redis": 3.0, "broker": 3.0, "worker": 8.0, "gateway": 8.0}
FINISH_WAIT_S = 180.0  # how long a launcher command may take once the soak is interrupted


def launcher(*args: str) -> str:
    """`python -m launcher ARGS` from the repository root, in a session of its own; stdout.

    Ctrl-C reaches only the soak: an interrupted soak waits for the command to finish (up to
    FINISH_WAIT_S) before it goes on, so a service being started is recorded in the state
    file and `down` stops it. A non-zero exit raises RuntimeError.
    """
    argv = [sys.executable, "-m", "launcher", *args]
    process = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, _ = process.communicate()
    except KeyboardInterrupt:
        out, _ = process.communicate(timeout=FINISH_WAIT_S)
        raise
    if process.returncode != 0:
        raise RuntimeError(f"launcher {' '.join(args)} exited with {process.returncode}")
    return out


def status(state_dir: Path) -> dict[str, Any]:
    """The launcher's state of the soak's stack."""
    state: dict[str, Any] = json.loads(launcher("status", f"--state-dir={state_dir}"))
    return state


def runs_service(process: psutil.Process, kind: str, record: dict[str, Any]) -> bool:
    """Whether `process` runs the command of a `kind` service as `record` describes it."""
    cmdline = process.cmdline()
    text = " ".join(cmdline)
    if kind == "triton":
        return Path(cmdline[0]).name == "tritonserver" and record["grpc"].split(":")[1] in text
    if kind == "redis":  # redis-server rewrites its title to "redis-server host:port"
        url = urlsplit(record["url"])
        return process.name() == "redis-server" and f"{url.hostname}:{url.port}" in text
    if kind == "broker":
        return " broker " in f" {text} " and f"tcp://{record['bootstrap']}" in text
    module = "gateway.worker" if kind == "worker" else "gateway"
    return cmdline[1:] == ["-m", module]


def verified(name: str, record: dict[str, Any]) -> psutil.Process:
    """The recorded process of service `name`, checked to be it; RuntimeError otherwise."""
    kind = name.split("-")[0]
    process = psutil.Process(int(record["pid"]))
    if abs(process.create_time() - float(record["started_at"])) > 0.5:
        raise RuntimeError(f"pid {record['pid']} is no longer {name}: not killed")
    if not runs_service(process, kind, record):
        raise RuntimeError(f"pid {record['pid']} runs {process.cmdline()}, not {name}: not killed")
    return process


@dataclass
class Fault:
    """One fault: which service, when it was killed and when it was back (epoch s)."""

    kind: str
    service: str
    pid: int
    hold_s: float
    killed_at: float
    back_at: float = 0.0
    restart_s: float = 0.0
    left_behind: list[int] = field(default_factory=list)  # its children still alive after
    error: str = ""

    def window(self) -> tuple[float, float]:
        """The span during which clients may see this fault: kill to back + SETTLE_S."""
        return self.killed_at, (self.back_at or time.time()) + SETTLE_S


def inject(state_dir: Path, name: str, hold_s: float, stop: Any) -> Fault:
    """SIGKILL service `name`, hold it down `hold_s` (less if `stop` is set), start it again."""
    record = status(state_dir)["services"][name]
    process = verified(name, record)
    children = process.children(recursive=True)
    os.kill(process.pid, signal.SIGKILL)
    fault = Fault(name.split("-")[0], name, process.pid, hold_s, time.time())
    psutil.wait_procs([process], timeout=10)
    stop.wait(hold_s)
    started = time.time()
    try:
        launcher("start", name, f"--state-dir={state_dir}")
    except RuntimeError as exc:
        fault.error = str(exc)
    fault.back_at = time.time()
    fault.restart_s = round(fault.back_at - started, 1)
    _, alive = psutil.wait_procs(children, timeout=10)
    fault.left_behind = [p.pid for p in alive]
    return fault


def reap_left_behind(faults: list[Fault], state_dir: Path) -> list[int]:
    """SIGKILL the children a killed service left running (Triton's Python backend stubs
    outlive a SIGKILLed tritonserver), once the stack is down; the pids killed.

    Only a process whose command line names the stack's state folder is killed.
    """
    killed = []
    for pid in (pid for fault in faults for pid in fault.left_behind):
        try:
            process = psutil.Process(pid)
            if str(state_dir) in " ".join(process.cmdline()):
                process.kill()
                killed.append(pid)
        except psutil.Error:  # gone meanwhile
            continue
    return killed


def worker_names(state_dir: Path) -> list[str]:
    """The workers of the stack, by their state names."""
    return sorted(n for n in status(state_dir)["services"] if n.split("-")[0] == "worker")


class Injector:
    """Faults in rounds (each kind once per round, in a seeded random order; the long Triton
    outage opens the first round), with gaps, until a deadline."""

    def __init__(self, state_dir: Path, gap_s: float, seed: int = 5) -> None:
        import random

        self.state_dir, self.gap_s = state_dir, gap_s
        self.rng = random.Random(seed)
        self.faults: list[Fault] = []
        self.planned: list[str] = []

    def next_fault(self) -> tuple[str, float]:
        """The next service to kill and how long to hold it down."""
        if not self.planned:
            kinds = list(KINDS)
            self.rng.shuffle(kinds)
            if not self.faults:
                kinds.remove("triton")
                kinds.insert(0, "triton")
            self.planned = kinds
        kind = self.planned.pop(0)
        if kind == "triton" and not any(f.kind == "triton" for f in self.faults):
            return "triton", LONG_TRITON_S
        name = kind
        if kind == "worker":
            workers = worker_names(self.state_dir)
            name = workers[sum(f.kind == "worker" for f in self.faults) % len(workers)]
        return name, round(self.rng.uniform(2.0, 6.0), 1)

    def run(self, until: float, stop: Any, say: Any) -> None:
        """Inject faults until the monotonic deadline `until` (or `stop`); each must fit."""
        while not stop.wait(self.gap_s):
            name, hold = self.next_fault()
            if time.monotonic() + hold + RESTART_ESTIMATE_S[name.split("-")[0]] > until:
                return
            say(f"fault {len(self.faults) + 1}: SIGKILL {name}, down {hold:g} s")
            fault = inject(self.state_dir, name, hold, stop)
            self.faults.append(fault)
            note = f" ({fault.error})" if fault.error else ""
            say(f"  {name} back after {fault.restart_s:g} s of restart{note}")
            if fault.error:
                raise RuntimeError(f"{name} did not come back: {fault.error}")
