"""A child service process: started with its log in a file, found listening, stopped cleanly.

Ports are never reserved ahead of time. A service that can bind port 0 is started on port 0
and the launcher reads the port the kernel gave it from the process's own listening socket
(`start_reporting_port`). A service that cannot (its address must be known before it starts,
or it refuses 0) is started on a port the kernel reported free a moment earlier, and the
start counts only if the socket listening there belongs to the process we started; when
another process took the port first, ours is stopped and started again on a fresh one
(`start_on_ports`). Either way a service is ready when our process listens and answers.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

POLL_S = 0.2
PORT_ATTEMPTS = 5  # fresh ports tried when another process keeps taking the picked one


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on at this moment: a candidate, never a reservation.

    The launcher starts a service on it only through `start_on_ports`, which checks who got
    it; a test may use it for an address that should refuse connections.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServiceError(RuntimeError):
    """A service did not start or become ready; the message quotes its log."""


class PortTaken(ServiceError):
    """A port the service was to listen on is held by another process."""


def listening_ports(pid: int) -> set[int]:
    """The TCP ports on which process `pid` or one of its descendants listens."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    ports = set()
    for process in processes:
        try:
            connections = process.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        ports |= {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}
    return ports


def port_holder(port: int, *, besides: int | None = None, unknown: bool = True) -> str | None:
    """Who listens on TCP `port` other than `besides`' process tree: "pid 123 (redis)", or None.

    psutil cannot name the process of some listeners: another user's, another PID
    namespace's, or one whose socket opened while it scanned the processes. Those count
    ("an unidentified process") only with `unknown`.
    """
    ours = set()
    if besides is not None:
        try:
            root = psutil.Process(besides)
            ours = {root.pid, *(c.pid for c in root.children(recursive=True))}
        except psutil.NoSuchProcess:
            pass
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:  # not allowed to see others' sockets: ask the kernel
        if besides is not None or not unknown:
            return None
        return None if _bindable(port) else "an unidentified process"
    for c in connections:
        if c.status != psutil.CONN_LISTEN or c.laddr.port != port or c.pid in ours:
            continue
        if c.pid:
            return f"pid {c.pid} ({_name(c.pid)})"
        if unknown:
            return "an unidentified process"
    return None


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return "gone"


@dataclass
class Service:
    """One process, its output appended to `log_file`; detached ones outlive the launcher."""

    name: str
    argv: list[str]
    log_file: Path
    env: dict[str, str] | None = None  # None: the launcher's own environment
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    started_at: float = field(default=0.0)  # the process's creation time: its identity

    def start(self, *, detached: bool = False) -> Service:
        """Start the process; `detached` puts it in a session of its own (for `make up`)."""
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
        try:
            self.started_at = psutil.Process(self.process.pid).create_time()
        except psutil.NoSuchProcess:  # already gone: wait_listening reports its log
            self.started_at = 0.0
        return self

    @property
    def pid(self) -> int:
        """The process id (the service must have been started)."""
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines of the log, for error messages."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def _check_alive(self, what: str, ports: Sequence[int]) -> None:
        if self.running():
            return
        code = self.process.returncode if self.process is not None else None
        for port in ports:
            holder = port_holder(port)
            if holder is not None:
                raise PortTaken(f"{self.name}: port {port} is held by {holder}")
        raise ServiceError(f"{self.name} exited with {code} before {what}:\n{self.log_tail()}")

    def wait_port(self, timeout: float, what: str) -> int:
        """The port this process listens on, once it does (a service started on port 0)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(what, ())
            ports = listening_ports(self.pid)
            if len(ports) == 1:
                return ports.pop()
            if ports:
                raise ServiceError(f"{self.name} listens on several ports {sorted(ports)}")
            time.sleep(POLL_S)
        raise ServiceError(f"{self.name}: no listener after {timeout:.0f}s:\n{self.log_tail()}")

    def wait_listening(
        self, ports: Sequence[int], answers: Callable[[], bool], timeout: float, what: str
    ) -> None:
        """Until this process listens on every one of `ports` and `answers()` is true.

        Raises PortTaken as soon as another process holds one of the ports (ours then failed
        to bind it, or will), and ServiceError if ours exits or the deadline passes.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(what, ports)
            missing = set(ports) - listening_ports(self.pid)
            for port in sorted(missing):
                holder = port_holder(port, besides=self.pid)
                # An unidentified listener may be our socket, opened during the scan.
                if holder is not None and port not in listening_ports(self.pid):
                    raise PortTaken(f"{self.name}: port {port} is held by {holder}")
            if not missing and self._answers(answers):
                for port in ports:  # a shared (SO_REUSEPORT) port is not ours alone
                    holder = port_holder(port, besides=self.pid, unknown=False)
                    if holder is not None:
                        raise PortTaken(f"{self.name}: port {port} is shared with {holder}")
                return
            time.sleep(POLL_S)
        raise ServiceError(f"{self.name}: no {what} after {timeout:.0f}s:\n{self.log_tail()}")

    @staticmethod
    def _answers(answers: Callable[[], bool]) -> bool:
        try:
            return answers()
        except Exception:  # listening but not serving yet: keep polling
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if the process has not exited after `timeout` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no clean shutdown (for tests of what a crash leaves behind)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_on_ports(
    make: Callable[[list[int]], Service],
    ports: Sequence[int],
    answers: Callable[[list[int]], bool],
    *,
    timeout: float,
    what: str,
    detached: bool = False,
) -> tuple[Service, list[int]]:
    """Start a service that must be told its ports; a 0 in `ports` means "pick a free one".

    `make(ports)` builds the process for the chosen ports. The start counts once our process
    listens on all of them and `answers(ports)`; if another process holds a picked port, ours
    is stopped and started again on fresh ones. A port given explicitly is never replaced.
    """
    for attempt in range(1, PORT_ATTEMPTS + 1):
        chosen: list[int] = []
        for port in ports:
            candidate = port or free_port()
            while candidate in chosen:
                candidate = free_port()
            chosen.append(candidate)
        service = make(chosen).start(detached=detached)
        try:
            service.wait_listening(chosen, lambda: answers(chosen), timeout, what)  # noqa: B023
            return service, chosen
        except PortTaken:
            service.stop(timeout=10)
            if all(ports) or attempt == PORT_ATTEMPTS:
                raise
        except ServiceError:
            service.stop(timeout=10)
            raise
    raise AssertionError("unreachable")


def start_reporting_port(
    make: Callable[[int], Service],
    port: int,
    answers: Callable[[int], bool],
    *,
    timeout: float,
    what: str,
    detached: bool = False,
) -> tuple[Service, int]:
    """Start a service that binds `port` itself; with 0, the port the kernel gave it.

    The port is read from the process's listening socket, so it is ours by construction.
    """
    service = make(port).start(detached=detached)
    try:
        if port == 0:
            port = service.wait_port(timeout, what)
        service.wait_listening([port], lambda: answers(port), timeout, what)
    except ServiceError:
        service.stop(timeout=10)
        raise
    return service, port


class Managed:
    """What every launcher service shares: its process in `service`, stop and kill."""

    service: Service | None

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM, then wait up to `timeout` (a worker finishes its batch), then SIGKILL."""
        if self.service is not None:
            self.service.stop(timeout)

    def kill(self) -> None:
        """SIGKILL the process."""
        if self.service is not None:
            self.service.kill()

    def record(self) -> dict[str, object]:
        """Process identity and log for the state file: pid, creation time, log path."""
        assert self.service is not None, "not started"
        return {
            "pid": self.service.pid,
            "started_at": self.service.started_at,
            "log": str(self.service.log_file),
        }


def stop_pid(pid: int, started_at: float | None = None, timeout: float = 30.0) -> bool:
    """Stop a detached service by pid (for `down`); False if it was not running.

    With `started_at` (the creation time recorded at start), a process that merely reuses
    the pid is left alone.
    """
    try:
        process = psutil.Process(pid)
        if started_at and abs(process.create_time() - started_at) > 0.5:
            return False
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        process.send_signal(signal.SIGTERM)
    except psutil.NoSuchProcess:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(process):
            return True
        time.sleep(POLL_S)
    with contextlib.suppress(psutil.NoSuchProcess):
        process.kill()
    return True


def _alive(process: psutil.Process) -> bool:
    """Running, not merely a zombie waiting for a parent that never reaps it."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
