"""Nothing lost when parts fail: Redis and broker blips, rebalances, worker crashes, lost
messages, late duplicates, retried submissions, store errors. Real services, default
settings (attempt limits and backoffs as shipped) unless a test says which it shortens.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from gateway.jobs import OUTBOX, JobMessage, JobStore, Written
from gateway.jobs import PREFIX as JOB_PREFIX
from gateway.topics import Topics
from launcher.kafka import KafkaBroker
from launcher.process import free_port
from launcher.redis import RedisServer
from launcher.triton import Triton
from tests.conftest import WEBHOOK_SECRET, JobsStack
from tests.polling import wait_until
from tests.test_job_progress import spec
from tests.test_jobs import SMALL, api, submit, wait_for, wait_running, worker_metric


@pytest.fixture
def own_stack(
    triton: Triton, broker: KafkaBroker, tmp_path: Path
) -> Iterator[tuple[JobsStack, RedisServer]]:
    """A jobs stack with a Redis of its own (persistent: data survives a restart)."""
    redis = RedisServer(tmp_path / "redis", persistent=True).start()
    stack = JobsStack(triton, redis, broker, tmp_path, f"r{uuid.uuid4().hex[:8]}.")
    try:
        yield stack, redis
    finally:
        stack.stop()
        redis.stop()


def test_redis_down_under_a_worker_is_waited_out(own_stack) -> None:  # type: ignore[no-untyped-def]
    stack, redis = own_stack
    stack.start_gateway()
    worker = stack.start_worker()
    pid = worker.service.pid if worker.service else None
    with api(stack) as c:
        ids = [submit(c, [{"prompt": f"a steady spear {i}", **SMALL}]) for i in range(4)]
        redis.stop()
        time.sleep(20)  # the blip
        redis.start()  # same port, same data
        jobs = [wait_for(c, job_id, {"succeeded", "failed"}) for job_id in ids]
    assert {j["status"] for j in jobs} == {"succeeded"}
    assert worker.service is not None and worker.service.pid == pid
    assert worker.service.process is not None and worker.service.process.poll() is None


def test_submissions_right_after_a_redis_restart_are_accepted_once(own_stack) -> None:  # type: ignore[no-untyped-def]
    """The gateway's pooled connections all break when Redis restarts: each is tried again on
    a fresh one, so no submission is answered 503 while its job was recorded."""
    stack, redis = own_stack
    stack.start_gateway()
    body = {"images": [{"prompt": "a restart-proof bow", **SMALL}]}
    with api(stack) as c:
        warm = [
            c.post("/v1/jobs", json=body, headers={"Idempotency-Key": f"w{i}"}) for i in range(3)
        ]
        assert {r.status_code for r in warm} == {202}
        redis.stop()
        redis.start()  # same port, same data
        first = [
            c.post("/v1/jobs", json=body, headers={"Idempotency-Key": f"k{i}"}) for i in range(6)
        ]
        again = [
            c.post("/v1/jobs", json=body, headers={"Idempotency-Key": f"k{i}"}) for i in range(6)
        ]
    assert [r.status_code for r in first] == [202] * 6, [r.text for r in first]
    assert [r.json()["id"] for r in again] == [r.json()["id"] for r in first]
    assert all(r.headers["Idempotent-Replayed"] == "true" for r in again)


def test_a_commit_refused_after_a_rebalance_is_logged_and_the_item_deduplicated(
    jobs_stack: JobsStack,
) -> None:
    """A worker frozen mid-item loses its partitions (session timeout); the other worker
    makes the item again; the frozen one wakes and commits nothing (the broker refuses its
    stale commit, or the revoke it learns of first withholds it); it keeps running."""
    jobs_stack.start_gateway()
    frozen = jobs_stack.start_worker()
    with api(jobs_stack) as c:
        warm = submit(c, [{"prompt": "a warm-up blade", **SMALL}])
        wait_for(c, warm, {"succeeded"})
        slow = submit(c, [{"prompt": "a long-forged blade", "steps": 40, "width": 512}])
        wait_running(c, slow)
        refused = worker_metric(frozen, "forge_commit_failures_total")
        assert frozen.service is not None
        os.kill(frozen.service.pid, signal.SIGSTOP)
        try:
            other = jobs_stack.start_worker()
            job = wait_for(c, slow, {"succeeded", "failed"})
        finally:
            os.kill(frozen.service.pid, signal.SIGCONT)
        wait_until(
            "the woken worker's commit is refused",
            lambda: worker_metric(frozen, "forge_commit_failures_total") > refused,
        )
        assert job["status"] == "succeeded"
        again = submit(c, [{"prompt": "after the rebalance", **SMALL}])
        assert wait_for(c, again, {"succeeded", "failed"})["status"] == "succeeded"
    assert frozen.service.process is not None and frozen.service.process.poll() is None
    assert worker_metric(other, 'forge_jobs_total{outcome="succeeded"') >= 1
    assets = [p.name for p in jobs_stack.assets.rglob("*.png")]
    assert len(assets) == len(set(assets)) == 3  # warm-up, slow (once), after


class Hook(BaseHTTPRequestHandler):
    """A callback receiver: records each call; answers 500 until `accepting` is set."""

    calls: ClassVar[list[dict[str, str]]] = []  # replaced per server (see `receiver`)
    accepting: ClassVar[threading.Event] = threading.Event()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"])).decode()
        ok = self.accepting.is_set()
        self.calls.append({**dict(self.headers), "body": body, "answered": "204" if ok else "500"})
        self.send_response(204 if ok else 500)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[Hook]]]:
    """A receiver of this test's own (its own class: no state shared between tests)."""
    handler = type("OwnHook", (Hook,), {"calls": [], "accepting": threading.Event()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler
    finally:
        server.shutdown()


def test_a_worker_killed_before_its_callback_went_through_leaves_it_to_the_next(
    jobs_stack: JobsStack, receiver: tuple[str, type[Hook]]
) -> None:
    url, hook = receiver
    allow = {  # the receiver is internal: the operator's allowlist admits it, on its port
        "FORGE_CALLBACK_ALLOW_NETWORKS": '["127.0.0.1/32"]',
        "FORGE_CALLBACK_PORTS": f"[80, 443, {urlsplit(url).port}]",
    }
    jobs_stack.start_gateway(**allow)
    first = jobs_stack.start_worker(**allow)
    with api(jobs_stack) as c:
        job_id = submit(c, [{"prompt": "a signed axe", **SMALL}], callback_url=url)
        wait_for(c, job_id, {"succeeded"})
        wait_until("a first callback attempt", lambda: hook.calls)
        first.kill()  # the state is written, the callback not delivered
        hook.accepting.set()
        jobs_stack.start_worker(**allow)
        wait_until(
            "the callback delivered",
            lambda: any(call["answered"] == "204" for call in hook.calls),
            timeout=120,
        )
        # Delivered: recorded as such and out of the outbox, so no worker sends it again.
        redis = SyncRedis.from_url(jobs_stack.redis.url)
        record = json.loads(redis.hget(JOB_PREFIX + job_id, "callback"))
        pending = redis.zscore(OUTBOX, job_id)
        redis.close()
    assert record["delivered_at"] and pending is None
    ids = {call["webhook-id"] for call in hook.calls}
    assert ids == {f"msg_{job_id}"}  # one webhook-id, every attempt
    delivered = [call for call in hook.calls if call["answered"] == "204"]
    assert len(delivered) == 1
    from standardwebhooks import Webhook

    headers = {k: v for k, v in delivered[0].items() if k.startswith("webhook-")}
    assert Webhook(WEBHOOK_SECRET).verify(delivered[0]["body"], headers)["status"] == "succeeded"


def test_a_broker_that_lost_its_messages_is_repaired_by_the_sweeper(
    triton: Triton, tmp_path: Path
) -> None:
    """A broker restarted without its data (tansu in memory): the sweeper sends the items'
    messages again. The sweeper runs every 2 s here and repairs after 10 s without progress
    (the shipped values are 30 s and 15 minutes)."""
    broker = KafkaBroker(tmp_path / "broker").start()
    redis = RedisServer(tmp_path / "redis").start()
    stack = JobsStack(triton, redis, broker, tmp_path, f"s{uuid.uuid4().hex[:8]}.")
    sweeper = {"FORGE_SWEEP_EVERY_S": "2", "FORGE_STUCK_AFTER_S": "10"}
    try:
        stack.start_gateway()
        with api(stack) as c:
            ids = [submit(c, [{"prompt": f"a lost bow {i}", **SMALL}]) for i in range(3)]
            broker.stop()  # with every message in it
            broker.start()  # same port, empty
            worker = stack.start_worker(**sweeper)
            jobs = [wait_for(c, job_id, {"succeeded", "failed"}) for job_id in ids]
        assert {j["status"] for j in jobs} == {"succeeded"}
        assert worker_metric(worker, 'forge_swept_total{action="requeued"') >= 3
    finally:
        stack.stop()
        broker.stop()
        redis.stop()


def test_job_state_is_never_resurrected_nor_overwritten(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        redis = Redis.from_url(redis_server.url)
        jobs = JobStore(
            redis, ttl_s=60, topic_prefix="state-test.", events_max=100, events_ttl_s=60
        )
        job_id = f"job_{uuid.uuid4().hex}"
        message = JobMessage(
            job_id=job_id, index=0, api_key_id="k", spec=spec("x"), submitted_at=0, tier="standard"
        )
        await jobs.create(job_id, "k", [message], "standard", "https://example.com/hook")
        assert await jobs.set_item(job_id, 0, "running", attempts=1) is Written.WRITTEN
        assert await jobs.set_item(job_id, 0, "failed", attempts=1, error="x") is (
            Written.JOB_FINISHED
        )
        late = await jobs.set_item(job_id, 0, "running", attempts=2)
        assert late is Written.FINISHED_BEFORE
        item = await jobs.item(job_id, 0)
        assert item is not None and item["status"] == "failed"
        assert json.loads(await redis.hget(JOB_PREFIX + job_id, "callback"))["webhook_id"]
        assert job_id not in await jobs.active()  # finished: no longer swept
        await redis.delete(JOB_PREFIX + job_id)  # expired
        assert await jobs.set_item(job_id, 0, "succeeded", attempts=1) is Written.MISSING
        assert not await redis.exists(JOB_PREFIX + job_id)  # not recreated
        await redis.aclose()

    asyncio.run(scenario())


def test_a_retried_submission_gets_the_same_job(jobs_stack: JobsStack) -> None:
    jobs_stack.start_gateway()
    body = {"images": [{"prompt": "an idempotent shield", **SMALL}]}
    with api(jobs_stack) as c:
        first = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-7"})
        again = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-7"})
        other = c.post(
            "/v1/jobs",
            json={"images": [{"prompt": "another", **SMALL}]},
            headers={"Idempotency-Key": "order-7"},
        )
        weapons = {"weapons": [{"weapon_type": "axe", "material": "iron", **SMALL}]}
        w1 = c.post("/v1/weapons/jobs", json=weapons, headers={"Idempotency-Key": "w-1"})
        w2 = c.post("/v1/weapons/jobs", json=weapons, headers={"Idempotency-Key": "w-1"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert other.status_code == 422  # the same key with another body
    assert w1.status_code == w2.status_code == 202 and w1.json()["id"] == w2.json()["id"]


def test_an_unreachable_asset_store_is_503_not_500(
    triton: Triton, redis_server: RedisServer, broker: KafkaBroker, tmp_path: Path
) -> None:
    stack = JobsStack(triton, redis_server, broker, tmp_path, f"a{uuid.uuid4().hex[:8]}.")
    try:
        gateway = stack.start_gateway(
            FORGE_ASSET_S3_BUCKET="forge-assets",
            FORGE_ASSET_S3_ENDPOINT=f"http://127.0.0.1:{free_port()}",  # nobody listens
            AWS_ACCESS_KEY_ID="test",
            AWS_SECRET_ACCESS_KEY="test",
            AWS_DEFAULT_REGION="us-east-1",
        )
        with httpx.Client(base_url=gateway.url) as c:
            reply = c.get(f"/assets/{'a' * 64}.png")
        assert reply.status_code == 503 and int(reply.headers["Retry-After"]) > 0
        assert reply.headers["content-type"] == "application/problem+json"
    finally:
        stack.stop()


def test_a_priority_items_retry_is_read_before_lower_tiers() -> None:
    topics = Topics("forge.jobs.")
    ranks = {t: topics.rank(t) for t in topics.consumed}
    assert ranks[topics.retry("priority")] < ranks[topics.requests("standard")]
    assert ranks[topics.retry("standard")] < ranks[topics.requests("bulk")]
    assert topics.retry("bulk") in topics.all
