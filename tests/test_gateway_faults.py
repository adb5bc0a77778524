"""The gateway when Redis or Triton goes away, and when they come back (own stack per test).

Ready means "can accept work" (Redis and the broker); Triton is reported, not required.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from launcher.gateway import GatewayServer
from launcher.kafka import KafkaBroker
from launcher.redis import RedisServer
from launcher.triton import Triton
from tests.conftest import DEV_KEY, gateway_env
from tests.polling import wait_until

BODY = {"prompt": "a storm-forged glaive", "steps": 2, "width": 64, "height": 64}


@pytest.fixture
def stack(
    repository: Path, broker: KafkaBroker, tmp_path: Path
) -> Iterator[tuple[Triton, RedisServer, GatewayServer]]:
    triton = Triton(repository, tmp_path / "triton").start()
    redis = RedisServer(tmp_path / "redis", persistent=True).start()
    gateway = None
    try:
        triton.load()
        env = gateway_env(
            triton,
            redis,
            tmp_path / "assets",
            FORGE_KAFKA_BOOTSTRAP=broker.bootstrap,
            FORGE_TOPIC_PREFIX=f"faults{uuid.uuid4().hex[:6]}.",
        )
        gateway = GatewayServer(tmp_path / "gateway", env).start()
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
    wait_until("generation works again", lambda: post(gateway).status_code == 200, 60)


def test_without_triton_the_gateway_stays_ready_and_accepts_jobs(stack) -> None:  # type: ignore[no-untyped-def]
    triton, _, gateway = stack
    made = post(gateway)
    assert made.status_code == 200
    triton.stop()
    assert_unavailable(post(gateway), "image model is unavailable")
    auth = {"Authorization": f"Bearer {DEV_KEY}"}
    with httpx.Client(base_url=gateway.url, headers=auth) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200, ready.text  # still in the load balancer's pool
        assert ready.json()["checks"]["triton"].startswith("error")
        assert ready.json()["checks"]["broker"] == "ok"
        job = c.post("/v1/jobs", json={"images": [BODY]})
        assert job.status_code == 202, job.text
        assert c.get(job.headers["Location"]).json()["status"] == "queued"
        assert c.get(made.json()["asset_url"]).status_code == 200
        assert 'forge_dependency_up{dependency="triton"} 0.0' in c.get("/metrics").text
    triton.start()
    triton.load()
    wait_until("generation works again", lambda: post(gateway).status_code == 200, 60)
