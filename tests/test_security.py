"""No one in where they don't belong: callbacks reach only public addresses (or an operator's
allowlist), each tenant signs with its own secret, keys mean what they say, charges match
work. Real gateway and worker processes; DNS answers come from a server the test controls
(`FORGE_CALLBACK_NAMESERVERS`), so names can resolve to anything, and change their answer.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from gateway.jobs import PREFIX as JOB_PREFIX
from launcher.gateway import GatewayServer
from launcher.kafka import KafkaBroker
from launcher.redis import RedisServer
from launcher.triton import Triton
from tests.conftest import DEV_KEY, JobsStack
from tests.dns_server import Zone, dns_server
from tests.polling import wait_until
from tests.test_jobs import SMALL, api, wait_for
from tests.test_resilience import Hook

PUBLIC = "93.184.216.34"  # an address on the public internet (never contacted)
ALLOWED_HOST = "127.0.0.2"  # the operator's allowlisted receiver


def hook_server(host: str) -> tuple[ThreadingHTTPServer, type[Hook]]:
    """A receiver of its own on `host` (any port), accepting from the start."""
    handler = type("OwnHook", (Hook,), {"calls": [], "accepting": threading.Event()})
    handler.accepting.set()
    server = ThreadingHTTPServer((host, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler


class Secure:
    """The stack of these tests: gateway and worker with the callback rules configured."""

    def __init__(self, stack: JobsStack, zone: Zone, allowed: Any, forbidden: Any) -> None:
        self.stack, self.zone = stack, zone
        (self.allowed_server, self.allowed), (self.forbidden_server, self.forbidden) = (
            allowed,
            forbidden,
        )

    def url(self, host: str, server: ThreadingHTTPServer) -> str:
        return f"http://{host}:{server.server_address[1]}/hook"


@pytest.fixture
def secure(
    triton: Triton, redis_server: RedisServer, broker: KafkaBroker, tmp_path: Path
) -> Iterator[Secure]:
    allowed = hook_server(ALLOWED_HOST)
    forbidden = hook_server("127.0.0.1")
    ports = [80, 443, allowed[0].server_address[1], forbidden[0].server_address[1]]
    with dns_server() as (nameserver, zone):
        stack = JobsStack(triton, redis_server, broker, tmp_path, f"x{uuid.uuid4().hex[:8]}.")
        env = {
            "FORGE_CALLBACK_NAMESERVERS": json.dumps([nameserver]),
            "FORGE_CALLBACK_PORTS": json.dumps(ports),
            "FORGE_CALLBACK_ALLOW_NETWORKS": json.dumps([f"{ALLOWED_HOST}/32"]),
            "FORGE_WEBHOOK_BACKOFF_S": "1",
        }
        try:
            stack.start_gateway(**env)
            stack.start_worker(**env)
            yield Secure(stack, zone, allowed, forbidden)
        finally:
            stack.stop()
            for server, _ in (allowed, forbidden):
                server.shutdown()


INTERNAL_LITERALS = [
    ("http://127.0.0.1/hook", "loopback"),
    ("http://127.1/hook", "loopback"),
    ("http://2130706433/hook", "loopback"),
    ("http://0x7f000001/hook", "loopback"),
    ("http://017700000001/hook", "loopback"),
    ("http://0x7f.0.0.1/hook", "loopback"),
    ("http://0177.0.0.1/hook", "loopback"),
    ("http://127.0.0.1./hook", "loopback"),
    ("https://[::1]/hook", "loopback"),
    ("http://[::ffff:127.0.0.1]/hook", "loopback"),
    ("http://[::ffff:7f00:1]/hook", "loopback"),
    ("http://[64:ff9b::7f00:1]/hook", "loopback"),
    ("http://[2002:7f00:1::]/hook", "loopback"),
    ("http://0.0.0.0/hook", "unspecified"),
    ("http://[::]/hook", "unspecified"),
    ("http://10.0.0.1/hook", "private"),
    ("http://172.16.0.1/hook", "private"),
    ("http://192.168.1.1/hook", "private"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://0xa9.0xfe.0xa9.0xfe/", "link-local"),
    ("http://[::ffff:a9fe:a9fe]/", "link-local"),
    ("http://[fe80::1]/hook", "link-local"),
    ("http://[fc00::1]/hook", "private"),
    ("http://100.64.0.1/hook", "not a publicly routable"),
    ("http://224.0.0.1/hook", "multicast"),
    ("http://240.0.0.1/hook", "reserved"),
    ("http://255.255.255.255/hook", "reserved"),
    ("http://localhost/hook", "loopback name"),
    ("http://localhost./hook", "dot"),
    ("http://example.com./hook", "dot"),
    ("ftp://example.com/hook", "http or https"),
    ("http://example.com:8080/hook", "port 8080"),
    ("http://user:pw@example.com/hook", "credentials"),
]
INTERNAL_NAMES = {
    "internal.forge-test.example": ["10.1.2.3"],
    "metadata.forge-test.example": ["169.254.169.254"],
    "loop6.forge-test.example": ["::1"],
    "mixed.forge-test.example": [PUBLIC, "127.0.0.1"],
    "nat64.forge-test.example": ["64:ff9b::a00:1"],
}


def submit_callback(c: httpx.Client, url: str) -> httpx.Response:
    return c.post(
        "/v1/jobs", json={"images": [{"prompt": "a guarded axe", **SMALL}], "callback_url": url}
    )


def test_callbacks_to_internal_addresses_are_refused_at_submission(secure: Secure) -> None:
    secure.zone.records.update(INTERNAL_NAMES)
    secure.zone.records["public.forge-test.example"] = [PUBLIC]
    refused = [(url, reason) for url, reason in INTERNAL_LITERALS] + [
        (f"https://{name}/hook", "address") for name in INTERNAL_NAMES
    ]
    assert len(refused) >= 25
    with api(secure.stack) as c:
        for url, reason in refused:
            reply = submit_callback(c, url)
            assert reply.status_code == 422, (url, reply.text)
            assert reason in reply.json()["detail"], (url, reply.json()["detail"])
        assert submit_callback(c, "https://public.forge-test.example/hook").status_code == 202
    assert {"internal.forge-test.example", "loop6.forge-test.example"} <= set(secure.zone.asked)


def callback_record(secure: Secure, job_id: str) -> dict[str, Any]:
    redis = Redis.from_url(secure.stack.redis.url)
    raw = redis.hget(JOB_PREFIX + job_id, "callback")
    redis.close()
    return dict(json.loads(raw)) if raw else {}


def test_a_name_that_turns_internal_at_send_time_reaches_nothing(secure: Secure) -> None:
    name = "rebind.forge-test.example"
    secure.zone.records[name] = [PUBLIC]  # public when the job is submitted...
    url = secure.url(name, secure.forbidden_server)
    with api(secure.stack) as c:
        reply = submit_callback(c, url)
        assert reply.status_code == 202, reply.text
        secure.zone.records[name] = ["127.0.0.1"]  # ...loopback when the worker sends
        wait_for(c, reply.json()["id"], {"succeeded"})
    record = wait_until(
        "a refused send attempt",
        lambda: (r := callback_record(secure, reply.json()["id"])).get("attempts") and r,
    )
    assert "loopback" in record["last_error"]
    assert secure.forbidden.calls == []  # no connection reached 127.0.0.1


def make_key(c: httpx.Client, name: str) -> dict[str, Any]:
    reply = c.post("/v1/admin/keys", json={"name": name, "scopes": ["generate"]})
    assert reply.status_code == 201, reply.text
    assert reply.json()["webhook_secret"].startswith("whsec_")
    return dict(reply.json())


def delivered(hook: type[Hook], job_id: str) -> dict[str, str]:
    return wait_until(
        f"the callback of {job_id}",
        lambda: next((c for c in hook.calls if c["webhook-id"] == f"msg_{job_id}"), None),
    )


def verifies(secret: str, call: dict[str, str]) -> bool:
    headers = {k: v for k, v in call.items() if k.startswith("webhook-")}
    try:
        Webhook(secret).verify(call["body"], headers)
    except WebhookVerificationError:
        return False
    return True


def test_each_tenant_signs_with_its_own_secret_through_the_allowlist(secure: Secure) -> None:
    url = secure.url(ALLOWED_HOST, secure.allowed_server)
    with api(secure.stack) as admin:
        a, b = make_key(admin, "studio-a"), make_key(admin, "studio-b")
    with api(secure.stack, key=a["key"]) as c:
        first = submit_callback(c, url)
        assert first.status_code == 202, first.text  # an internal receiver, allowlisted
        call = delivered(secure.allowed, first.json()["id"])
    assert verifies(a["webhook_secret"], call)
    assert not verifies(b["webhook_secret"], call)  # B cannot forge, nor read, A's callbacks
    with api(secure.stack) as admin:
        rotated = admin.post(f"/v1/admin/keys/{a['id']}/webhook-secret")
        assert rotated.status_code == 200, rotated.text
    with api(secure.stack, key=a["key"]) as c:
        second = submit_callback(c, url)
        call = delivered(secure.allowed, second.json()["id"])
    new = rotated.json()["webhook_secret"]
    assert new != a["webhook_secret"]
    assert verifies(new, call) and verifies(a["webhook_secret"], call)  # both, meanwhile
    assert not verifies(b["webhook_secret"], call)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keys_file(path: Path, *secrets: str) -> Path:
    path.write_text(
        json.dumps(
            [
                {"name": f"file-{i}", "sha256": hashlib.sha256(s.encode()).hexdigest()}
                for i, s in enumerate(secrets)
            ]
        )
    )
    return path


def test_keys_mean_what_they_say_across_restarts(
    triton: Triton, broker: KafkaBroker, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path / "redis", persistent=True).start()
    stack = JobsStack(triton, redis, broker, tmp_path, f"k{uuid.uuid4().hex[:8]}.")
    kept, dropped = "fk_test_file_kept", "fk_test_file_dropped"
    path = keys_file(tmp_path / "keys.yaml", kept, dropped)
    try:
        gateway = stack.start_gateway(FORGE_API_KEYS_FILE=str(path))
        with httpx.Client(base_url=gateway.url) as c:
            made = c.post("/v1/admin/keys", json={"name": "api"}, headers=auth(DEV_KEY)).json()
            for secret in (kept, dropped, made["key"]):
                assert c.get("/v1/weapons/templates", headers=auth(secret)).status_code == 200
            assert (
                c.delete(f"/v1/admin/keys/{made['id']}", headers=auth(DEV_KEY)).status_code == 204
            )
            listed = c.get("/v1/admin/keys", headers=auth(DEV_KEY)).json()
        assert next(k for k in listed if k["name"] == "file-0")["last_used_at"] is not None
        keys_file(path, kept)  # `dropped` leaves the file
        gateway = restart(stack, gateway, FORGE_API_KEYS_FILE=str(path))
        with httpx.Client(base_url=gateway.url) as c:
            assert c.get("/v1/weapons/templates", headers=auth(made["key"])).status_code == 401
            assert c.get("/v1/weapons/templates", headers=auth(dropped)).status_code == 401
            assert c.get("/v1/weapons/templates", headers=auth(kept)).status_code == 200
        path.write_text("- {name: broken")  # not YAML a person meant
        gateway = restart(stack, gateway, FORGE_API_KEYS_FILE=str(path))
        with httpx.Client(base_url=gateway.url) as c:
            ready = c.get("/readyz")
        assert ready.status_code == 503 and "keys file" in ready.json()["checks"]["keys"]
    finally:
        stack.stop()
        redis.stop()


def restart(stack: JobsStack, gateway: GatewayServer, **env: str) -> GatewayServer:
    gateway.stop()
    return stack.start_gateway(**env)


def test_a_key_past_its_expiry_is_refused(redis_server: RedisServer) -> None:
    import asyncio

    from redis.asyncio import Redis as AsyncRedis

    from gateway.keys import KeyStore

    async def scenario() -> None:
        redis = AsyncRedis.from_url(redis_server.url)
        store = KeyStore(redis)
        secret, _ = await store.create("short-lived", expires_at=time.time() - 1)
        assert await store.authenticate(secret) == (None, "expired")
        fresh, _ = await store.create("long-lived", expires_at=time.time() + 3600)
        assert (await store.authenticate(fresh))[0] is not None
        await redis.aclose()

    asyncio.run(scenario())


def test_guided_generation_costs_twice_the_unguided(narrow_gateway: GatewayServer) -> None:
    body = {"prompt": "a measured mace", "steps": 40, "width": 256, "height": 256}
    with httpx.Client(base_url=narrow_gateway.url, headers=auth(DEV_KEY), timeout=120) as c:
        start = int(c.post("/v1/images", json={**body, "steps": 1}).headers["RateLimit-Remaining"])
        guided = int(c.post("/v1/images", json=body).headers["RateLimit-Remaining"])
        unguided = int(
            c.post("/v1/images", json={**body, "guidance_scale": 1.0}).headers[
                "RateLimit-Remaining"
            ]
        )
    assert start - guided == 10 and guided - unguided == 5  # 40 x 256^2 x passes / (2 x 512^2)


def test_work_the_server_fails_is_refunded(
    repository: Path, broker: KafkaBroker, tmp_path: Path
) -> None:
    """A sync generation that fails on the server's side, and a job item failed past its
    deadline (here 3 s, the sweeper every second), give their charge back."""
    import shutil

    shutil.copytree(repository, tmp_path / "model_repository", symlinks=True)
    own = Triton(tmp_path / "model_repository", tmp_path / "triton").start()
    redis = RedisServer(tmp_path / "redis").start()
    stack = JobsStack(own, redis, broker, tmp_path, f"f{uuid.uuid4().hex[:8]}.")
    small = {"prompt": "a cheap knife", "steps": 1, "width": 64, "height": 64}  # 1 unit
    big = {"prompt": "a costly hammer", "steps": 40, "width": 256, "height": 256}  # 10 units
    try:
        own.load_served()
        env = {"FORGE_RATE_LIMIT": "100000 per 1 year"}
        stack.start_gateway(**env)
        stack.start_worker(**env, FORGE_ITEM_DEADLINE_S="3", FORGE_SWEEP_EVERY_S="1")
        with api(stack) as c:
            before = int(c.post("/v1/images", json=small).headers["RateLimit-Remaining"])
            own.stop()
            assert c.post("/v1/images", json=big).status_code == 503
            job = c.post("/v1/jobs", json={"images": [big]})
            assert job.status_code == 202 and int(job.headers["RateLimit-Remaining"]) < before
            failed = wait_for(c, job.json()["id"], {"succeeded", "failed"})
            assert failed["status"] == "failed" and "deadline" in failed["error"]
            own.start()
            own.load_served()
            after = int(c.post("/v1/images", json=small).headers["RateLimit-Remaining"])
        assert after == before - 1  # only the two small requests stayed charged
    finally:
        stack.stop()
        redis.stop()
        own.stop()
