"""A child service process: started with its log in a file, waited for, stopped cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceError(RuntimeError):
    """A service did not start or become ready; the message quotes its log."""


@dataclass
class Service:
    name: str
    argv: list[str]
    log_file: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self, *, detached: bool = False) -> Service:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                start_new_session=detached,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServiceError(
                    f"{self.name} exited with {self.process.returncode} before "
                    f"{what}:\n{self.log_tail()}"
                )
            try:
                if ready():
                    return
            except Exception:  # not listening yet: keep polling until the deadline
                pass
            time.sleep(0.2)
        raise ServiceError(f"{self.name}: no {what} after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Managed:
    """Stop and kill for the launcher's services, which keep their process in `service`."""

    service: Service | None

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM, then wait up to `timeout` (a worker finishes its batch), then SIGKILL."""
        if self.service is not None:
            self.service.stop(timeout)

    def kill(self) -> None:
        if self.service is not None:
            self.service.kill()


def stop_pid(pid: int, timeout: float = 30.0) -> bool:
    """Stop a detached service by pid (for `make down`); False if it was not running."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    return True
