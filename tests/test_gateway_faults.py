"""The gateway when Redis or Triton goes away, and when they come back (own stack per test)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from launcher.gateway import GatewayServer
from launcher.redis import RedisServer
from launcher.triton import Triton
from tests.conftest import DEV_KEY, gateway_env

BODY = {"prompt": "a storm-forged glaive", "steps": 2, "width": 64, "height": 64}


@pytest.fixture
def stack(repository: Path, tmp_path: Path) -> Iterator[tuple[Triton, RedisServer, GatewayServer]]:
    triton = Triton(repository, tmp_path / "triton").start()
    redis = RedisServer(tmp_path / "redis", persistent=True).start()
    gateway = None
    try:
        triton.load()
        gateway = GatewayServer(
            tmp_path / "gateway", gateway_env(triton, redis, tmp_path / "assets")
        ).start()
        yield triton, redis, gateway
    finally:
        for server in (gateway, redis, triton):
            if server is not None:
                server.stop()


def post(gateway: GatewayServer) -> httpx.Response:
    with httpx.Client(
        base_url=gateway.url, timeout=60, headers={"Authorization": f"Bearer {DEV_KEY}"}
    ) as c:
        return c.post("/v1/images", json=BODY)


def eventually(check, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "did not recover in time"
        time.sleep(0.5)


def assert_unavailable(reply: httpx.Response, detail: str) -> None:
    assert reply.status_code == 503, reply.text
    assert reply.headers["Retry-After"] == "3"
    assert reply.headers["content-type"] == "application/problem+json"
    assert detail in reply.json()["detail"]


def test_redis_down_fails_closed_and_recovers(stack) -> None:  # type: ignore[no-untyped-def]
    _, redis, gateway = stack
    assert post(gateway).status_code == 200
    redis.stop()
    assert_unavailable(post(gateway), "unavailable")  # never unlimited, never a 500
    with httpx.Client(base_url=gateway.url) as c:
        ready = c.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("error")
    with httpx.Client(base_url=gateway.url) as c:  # what the RedisUnreachable alert reads
        assert 'forge_dependency_up{dependency="redis"} 0.0' in c.get("/metrics").text
    redis.start()  # same port and data directory: the keys survive
    eventually(lambda: post(gateway).status_code == 200)


def test_triton_down_gives_503_and_recovers(stack) -> None:  # type: ignore[no-untyped-def]
    triton, _, gateway = stack
    assert post(gateway).status_code == 200
    triton.stop()
    assert_unavailable(post(gateway), "image model is unavailable")
    with httpx.Client(base_url=gateway.url) as c:
        assert c.get("/readyz").json()["checks"]["triton"].startswith("error")
    triton.start()
    triton.load()
    eventually(lambda: post(gateway).status_code == 200)
