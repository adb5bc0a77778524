"""`python -m launcher start`: a recorded service that died comes back where it was."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest

from launcher.__main__ import main
from launcher.process import free_port


def status(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["status", f"--state-dir={state_dir}"]) == 0
    state: dict[str, Any] = json.loads(capsys.readouterr().out)
    return state


def kill(pid: int) -> None:
    process = psutil.Process(pid)
    os.kill(pid, signal.SIGKILL)
    process.wait(10)


def redis_call(url: str, *command: str) -> bytes:
    """One command's reply, after AUTH when the URL carries a password."""
    parts = urlsplit(url)
    commands = [("AUTH", parts.password)] if parts.password else []
    with socket.create_connection((parts.hostname, parts.port), timeout=2) as s:
        for words in [*commands, command]:
            args = "".join(f"${len(a)}\r\n{a}\r\n" for a in words)
            s.sendall(f"*{len(words)}\r\n{args}".encode())
            time.sleep(0.1)
            reply = s.recv(100)
        return reply


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A stack of redis, the broker and the gateway (Triton named but absent), then down."""
    nobody = f"127.0.0.1:{free_port()}"
    argv = ["up", f"--state-dir={tmp_path}", "--services=redis,broker,gateway", "--free-ports"]
    assert main([*argv, f"--env=FORGE_TRITON_GRPC_URL={nobody}"]) == 0
    try:
        yield tmp_path
    finally:
        main(["down", f"--state-dir={tmp_path}"])


def test_killed_services_start_again_on_their_ports_with_their_data(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = status(state_dir, capsys)["services"]
    assert redis_call(before["redis"]["url"], "SET", "kept", "yes") == b"+OK\r\n"
    assert main(["add", "worker", f"--state-dir={state_dir}", "--env=FORGE_SWEEP_EVERY_S=7"]) == 0
    worker = status(state_dir, capsys)["services"]["worker"]
    assert worker["env"] == {"FORGE_SWEEP_EVERY_S": "7"}  # kept for a restart
    for name in ("redis", "gateway", "worker"):
        kill(int(status(state_dir, capsys)["services"][name]["pid"]))
        capsys.readouterr()
        assert main(["start", name, f"--state-dir={state_dir}", "--json"]) == 0
        again = json.loads(capsys.readouterr().out)
        assert again["pid"] != before.get(name, worker)["pid"]
        recorded = status(state_dir, capsys)["services"][name]
        assert recorded["pid"] == again["pid"]
        assert {k: v for k, v in recorded.items() if k not in ("pid", "started_at")} == {
            k: v for k, v in before.get(name, worker).items() if k not in ("pid", "started_at")
        }
    assert redis_call(before["redis"]["url"], "GET", "kept") == b"$3\r\nyes\r\n"
    with urllib.request.urlopen(before["gateway"]["url"] + "/healthz", timeout=5) as reply:
        assert reply.status == 200
    log = Path(before["gateway"]["log"]).read_text()
    assert log.count("Uvicorn running") == 2  # one log, appended to by the restart


def test_only_a_dead_recorded_service_of_the_serving_path_is_started(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["start", "broker", f"--state-dir={state_dir}"]) == 1
    assert "still running" in capsys.readouterr().err
    assert main(["start", "triton", f"--state-dir={state_dir}"]) == 1
    assert "no service 'triton'" in capsys.readouterr().err
    assert main(["start", "redis", f"--state-dir={state_dir / 'elsewhere'}"]) == 1
    assert "nothing is up" in capsys.readouterr().err
