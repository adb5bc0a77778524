"""Async jobs through the real broker (tansu), Redis, Triton, gateway and worker processes."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from gateway.jobs import PREFIX as JOB_PREFIX
from launcher.triton import Triton
from tests.conftest import DEV_KEY, WEBHOOK_SECRET, JobsStack
from tests.polling import wait_until

SMALL = {"steps": 3, "width": 64, "height": 64}


def api(stack: JobsStack, key: str = DEV_KEY) -> httpx.Client:
    assert stack.gateway is not None
    return httpx.Client(
        base_url=stack.gateway.url, timeout=60, headers={"Authorization": f"Bearer {key}"}
    )


def submit(c: httpx.Client, images: list[dict[str, Any]], **options: Any) -> str:
    reply = c.post("/v1/jobs", json={"images": images, **options})
    assert reply.status_code == 202, reply.text
    assert reply.headers["Location"] == f"/v1/jobs/{reply.json()['id']}"
    assert reply.json()["status"] == "queued"
    return str(reply.json()["id"])


def wait_for(c: httpx.Client, job_id: str, statuses: set[str]) -> dict:
    def reached() -> dict | None:
        job = c.get(f"/v1/jobs/{job_id}").json()
        return dict(job) if job["status"] in statuses else None

    return dict(wait_until(f"job {job_id} is {' or '.join(sorted(statuses))}", reached, every=0.3))


def item_state(c: httpx.Client, job_id: str) -> str:
    return str(c.get(f"/v1/jobs/{job_id}").json()["items"][0]["status"])


def wait_running(c: httpx.Client, job_id: str) -> None:
    wait_until(f"job {job_id} runs", lambda: item_state(c, job_id) == "running", every=0.1)


def stored_assets(stack: JobsStack) -> list[Path]:
    return sorted(p for p in stack.assets.rglob("*.png"))


def worker_metric(worker: Any, name: str) -> float:
    text = httpx.get(f"{worker.url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def standard_partitions(stack: JobsStack, worker: Any) -> set[int]:
    """The partitions of the standard topic in the worker's latest assignment (its log)."""
    lines = [line for line in worker.service.log_tail(400).splitlines() if "assigned:" in line]
    if not lines:
        return set()
    found = re.findall(rf"topic='{re.escape(stack.prefix)}standard', partition=(\d+)", lines[-1])
    return {int(p) for p in found}


def test_fifty_jobs_over_two_workers_succeed_exactly_once(jobs_stack: JobsStack) -> None:
    jobs_stack.start_gateway()
    workers = [jobs_stack.start_worker(), jobs_stack.start_worker()]
    # The group has settled: each worker owns one of the standard topic's two partitions (so
    # both take part, however fast the first one could have drained the topic alone).
    wait_until(
        "each worker is assigned a partition of the standard topic",
        lambda: [len(standard_partitions(jobs_stack, w)) for w in workers] == [1, 1],
    )
    with api(jobs_stack) as c:
        ids = [submit(c, [{"prompt": f"weapon {i}", "seed": i, **SMALL}]) for i in range(50)]
        jobs = [wait_for(c, job_id, {"succeeded", "failed"}) for job_id in ids]
    assert {j["status"] for j in jobs} == {"succeeded"}
    keys = [j["items"][0]["result"]["id"] for j in jobs]
    assert len(set(keys)) == 50
    assert [p.name for p in stored_assets(jobs_stack)] == sorted(keys)
    handled = [worker_metric(w, 'forge_jobs_total{outcome="succeeded"') for w in workers]
    print(f"items per worker: {handled}")
    assert sum(handled) == 50 and all(n > 0 for n in handled)  # both workers took part


def test_a_worker_killed_mid_job_is_redelivered_and_makes_one_asset(
    jobs_stack: JobsStack,
) -> None:
    jobs_stack.start_gateway()
    first = jobs_stack.start_worker()
    slow = {
        "prompt": "a slow killing blade",
        "steps": 30,
        "width": 512,
        "height": 512,
        "scheduler": "euler",
    }  # no seed: the gateway fixes one at submission
    with api(jobs_stack) as c:
        job_id = submit(c, [slow])
        wait_running(c, job_id)
        first.kill()  # SIGKILL: no commit, no goodbye to the group
        jobs_stack.start_worker()
        job = wait_for(c, job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded" and job["items"][0]["attempts"] == 1
    assert [p.name for p in stored_assets(jobs_stack)] == [job["items"][0]["result"]["id"]]


def test_sigterm_lets_the_job_in_flight_finish(jobs_stack: JobsStack) -> None:
    jobs_stack.start_gateway()
    worker = jobs_stack.start_worker()
    with api(jobs_stack) as c:
        job_id = submit(
            c, [{"prompt": "a graceful halberd", "steps": 25, "width": 512, "height": 512}]
        )
        wait_running(c, job_id)
        worker.stop(timeout=120)  # SIGTERM, then wait for the exit
        assert worker.service is not None and worker.service.process is not None
        assert worker.service.process.returncode == 0
        job = c.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    assert "worker stopped" in worker.service.log_tail()


async def _produce(bootstrap: str, topic: str, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"garbage")
    finally:
        await producer.stop()


async def _read_all(bootstrap: str, topic: str, expected: int) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    out: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 30
        while len(out) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            out += [json.loads(r.value) for rs in batch.values() for r in rs]
    finally:
        await consumer.stop()
    return out


def test_malformed_and_invalid_items_go_to_the_dead_letter_topic(jobs_stack: JobsStack) -> None:
    jobs_stack.start_gateway()
    worker = jobs_stack.start_worker()
    prefix = jobs_stack.prefix
    asyncio.run(_produce(jobs_stack.broker.bootstrap, f"{prefix}standard", b"{not a job"))
    with api(jobs_stack) as c:
        # Valid for the gateway, refused by the model: only the model counts CLIP tokens.
        bad = submit(c, [{"prompt": "axe " * 80, "steps": 2, "width": 64, "height": 64}])
        good = submit(c, [{"prompt": "a fine axe", **SMALL}])
        assert wait_for(c, good, {"succeeded", "failed"})["status"] == "succeeded"
        failed = wait_for(c, bad, {"succeeded", "failed"})
    assert failed["status"] == "failed" and "82 tokens long" in failed["error"]
    letters = asyncio.run(_read_all(jobs_stack.broker.bootstrap, f"{prefix}dead-letter", 2))
    assert sorted(letter["reason"] for letter in letters) == ["invalid", "malformed"]
    assert any(letter["value"] == "{not a job" for letter in letters)
    assert worker_metric(worker, "forge_dead_letters_total") == 2


def test_a_triton_outage_pauses_the_workers_and_fails_nothing(
    jobs_stack: JobsStack, repository: Path, tmp_path: Path
) -> None:
    """Triton down 90 s with queued jobs, default settings: the worker stops taking work,
    nothing fails or counts an attempt, and every job succeeds once Triton is back."""
    own = Triton(repository, tmp_path / "own-triton").start()
    try:
        own.load_served()
        jobs_stack.triton = own
        jobs_stack.start_gateway()
        worker = jobs_stack.start_worker()
        with api(jobs_stack) as c:
            first = submit(c, [{"prompt": "a warm-up mace", "seed": 1, **SMALL}])
            assert wait_for(c, first, {"succeeded", "failed"})["status"] == "succeeded"
            own.stop()
            ids = [submit(c, [{"prompt": f"a patient mace {i}", **SMALL}]) for i in range(6)]
            wait_until(
                "the worker pauses", lambda: worker_metric(worker, "forge_worker_paused") == 1
            )
            ready = httpx.get(f"{worker.url}/readyz")
            assert (
                ready.status_code == 503 and "unavailable" in ready.json()["checks"]["image_model"]
            )
            time.sleep(90)  # the outage: what a node drain or a model rollout does
            during = [c.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
            assert {j["status"] for j in during} == {"queued"}
            assert {j["items"][0]["attempts"] for j in during} == {0}
            own.start()
            own.load_served()
            jobs = [wait_for(c, job_id, {"succeeded", "failed"}) for job_id in ids]
        assert {j["status"] for j in jobs} == {"succeeded"}
        assert {j["items"][0]["attempts"] for j in jobs} == {1}  # the outage was not an attempt
        assert worker_metric(worker, "forge_worker_paused") == 0
        assert worker_metric(worker, "forge_job_retries_total") == 0
    finally:
        own.stop()


Calls = list[tuple[dict[str, str], bytes]]


@contextmanager
def callback_receiver(failures: int) -> Iterator[tuple[str, Calls, dict[str, str]]]:
    """A webhook endpoint of this test's own on a free port: its URL, the calls it records
    (answering the first `failures` with 500, then 204), and the settings that admit it (it
    is internal: the operator's allowlist admits it, on its port)."""
    calls: Calls = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            calls.append((dict(self.headers), body))
            self.send_response(500 if len(calls) <= failures else 204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    allow = {
        "FORGE_CALLBACK_ALLOW_NETWORKS": '["127.0.0.1/32"]',
        "FORGE_CALLBACK_PORTS": f"[80, 443, {server.server_port}]",
    }
    try:
        yield f"http://127.0.0.1:{server.server_port}/forge-hook", calls, allow
    finally:
        server.shutdown()
        server.server_close()


def test_callbacks_are_signed_and_retried(jobs_stack: JobsStack) -> None:
    from standardwebhooks import Webhook

    with callback_receiver(failures=1) as (url, calls, allow):
        settings = {**allow, "FORGE_WEBHOOK_BACKOFF_S": "1"}
        jobs_stack.start_gateway(**settings)
        jobs_stack.start_worker(**settings)
        with api(jobs_stack) as c:
            job_id = submit(
                c,
                [{"prompt": "a signed spear", **SMALL}, {"prompt": "a signed shield", **SMALL}],
                callback_url=url,
            )
            wait_for(c, job_id, {"succeeded"})
            wait_until("the callback is sent again", lambda: len(calls) >= 2)
    headers, body = calls[-1]
    payload = Webhook(WEBHOOK_SECRET).verify(body, headers)  # raises if the signature is wrong
    assert payload["id"] == job_id and payload["status"] == "succeeded"
    assert len(payload["items"]) == 2
    assert calls[0][0]["webhook-id"] == headers["webhook-id"]  # same message, retried


def test_job_api_rules(jobs_stack: JobsStack) -> None:
    gateway = jobs_stack.start_gateway(FORGE_MAX_JOB_ITEMS="3")
    with api(jobs_stack) as c:
        too_many = c.post("/v1/jobs", json={"images": [{"prompt": "x", **SMALL}] * 4})
        assert too_many.status_code == 422 and "at most 3" in too_many.json()["detail"]
        bulk = c.post("/v1/admin/keys", json={"name": "bulk", "tier": "bulk"}).json()
        job_id = submit(c, [{"prompt": "mine", **SMALL}])
    with httpx.Client(
        base_url=gateway.url, headers={"Authorization": f"Bearer {bulk['key']}"}
    ) as b:
        assert b.get(f"/v1/jobs/{job_id}").status_code == 404  # another key's job
        higher = b.post(
            "/v1/jobs", json={"images": [{"prompt": "x", **SMALL}], "priority": "priority"}
        )
        assert higher.status_code == 403 and "bulk" in higher.json()["detail"]
        weapons = b.post(
            "/v1/weapons/jobs",
            json={
                "weapons": [
                    {"weapon_type": "bow", "material": "wood", "seed": s, **SMALL}
                    for s in (1, 2, 3)
                ]
            },
        )
        assert weapons.status_code == 202 and len(weapons.json()["items"]) == 3
        assert weapons.json()["priority"] == "bulk"
    with httpx.Client(base_url=gateway.url) as anonymous:
        assert anonymous.get(f"/v1/jobs/{job_id}").status_code == 401


def job_records(stack: JobsStack) -> set[str]:
    """The job records in Redis (`forge:job:<id>` hashes)."""
    import redis

    with redis.Redis.from_url(stack.redis.url) as r:
        return {key.decode() for key in r.scan_iter(match=f"{JOB_PREFIX}*")}


async def _topic_messages(bootstrap: str, topics: list[str]) -> dict[str, int]:
    """Messages on each of `topics` that exists (end offset over its partitions)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        existing = await consumer.topics()
        found: dict[str, int] = {}
        for topic in (t for t in topics if t in existing):
            partitions = [
                TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()
            ]
            ends = await consumer.end_offsets(partitions) if partitions else {}
            found[topic] = sum(ends.values())
        return found
    finally:
        await consumer.stop()


@pytest.mark.parametrize("down", ["broker"])
def test_submission_when_the_broker_is_unreachable_is_refused_and_leaves_nothing(
    jobs_stack: JobsStack, down: str
) -> None:
    broker = jobs_stack.broker
    jobs_stack.broker = type(broker)(jobs_stack.workdir, port=1)  # nothing listens
    jobs_stack.start_gateway()
    records = job_records(jobs_stack)
    with api(jobs_stack) as c:
        reply = c.post("/v1/jobs", json={"images": [{"prompt": "lost?", **SMALL}]})
        assert reply.status_code == 503 and reply.headers["Retry-After"] == "3"
        assert "job queue is unavailable" in reply.json()["detail"]
    # No job record was left in Redis (the gateway writes it before sending, and takes it back
    # when the send fails), and no message of this stack's topics reached a broker.
    assert job_records(jobs_stack) - records == set()
    topics = [f"{jobs_stack.prefix}{t}" for t in ("priority", "standard", "bulk", "retry")]
    messages = asyncio.run(_topic_messages(broker.bootstrap, topics))
    assert sum(messages.values()) == 0, messages


def test_the_priority_topic_is_served_first(jobs_stack: JobsStack) -> None:
    gateway = jobs_stack.start_gateway()
    with api(jobs_stack) as c:
        vip = c.post("/v1/admin/keys", json={"name": "vip", "tier": "priority"}).json()
        bulk_ids = [
            submit(c, [{"prompt": f"bulk {i}", "seed": i, **SMALL}], priority="bulk")
            for i in range(6)
        ]
    with httpx.Client(
        base_url=gateway.url, timeout=60, headers={"Authorization": f"Bearer {vip['key']}"}
    ) as v:
        vip_ids = [submit(v, [{"prompt": f"vip {i}", "seed": i, **SMALL}]) for i in range(3)]
    jobs_stack.start_worker(FORGE_WORKER_CONCURRENCY="1")  # one item at a time, after all
    with api(jobs_stack) as c:
        done_bulk = [wait_for(c, j, {"succeeded"})["updated_at"] for j in bulk_ids]
    with httpx.Client(
        base_url=gateway.url, timeout=60, headers={"Authorization": f"Bearer {vip['key']}"}
    ) as v:
        done_vip = [wait_for(v, j, {"succeeded"})["updated_at"] for j in vip_ids]
    # At most the very first item polled, before any backlog was known, may be a bulk one.
    assert sum(b < max(done_vip) for b in done_bulk) <= 1, (done_vip, done_bulk)
