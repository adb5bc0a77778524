"""Job progress, events and cancellation: the state in Redis, and the real stack (broker,
Redis, Triton's streaming model, gateway and worker processes)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from redis.asyncio import Redis

from gateway.jobs import JobMessage, JobStore, Written
from gateway.schemas import ImageSpec
from gateway.triton_client import GeneratedImage
from launcher.redis import RedisServer
from launcher.triton import Triton
from tests.conftest import WEBHOOK_SECRET, JobsStack
from tests.polling import wait_until
from tests.test_gateway import gateway_metric
from tests.test_jobs import api, callback_receiver, submit, worker_metric
from tests.test_streaming_gateway import read_sse
from tests.test_streaming_model import AXE, stream
from tests.triton_state import steps_done

Event = tuple[str, str, dict[str, Any]]  # id, event, data


def spec(prompt: str) -> ImageSpec:
    return ImageSpec(
        prompt=prompt,
        negative_prompt="",
        seed=1,
        steps=4,
        guidance_scale=7.5,
        width=64,
        height=64,
        scheduler="euler",
        format="png",
    )


def test_cancelling_ends_the_job_and_refuses_later_progress(redis_server: RedisServer) -> None:
    """In Redis alone: a cancel ends the job (callback recorded, no longer active), stops
    the running item's progress writes, and every state change is an event in order."""

    async def scenario() -> None:
        redis = Redis.from_url(redis_server.url)
        jobs = JobStore(
            redis, ttl_s=60, topic_prefix="cancel-test.", events_max=100, events_ttl_s=60
        )
        job_id = f"job_{uuid.uuid4().hex}"
        messages = [
            JobMessage(
                job_id=job_id,
                index=i,
                api_key_id="k",
                spec=spec(f"x{i}"),
                submitted_at=0,
                tier="standard",
            )
            for i in range(3)
        ]
        await jobs.create(job_id, "k", messages, "standard", "https://example.com/hook")
        meta = await jobs.meta(job_id)
        assert meta is not None
        for index in (0, 1):
            assert await jobs.set_item(job_id, index, "running", attempts=1) is Written.WRITTEN
        step = {"step": 1, "total_steps": 4, "elapsed_ms": 5.0}
        assert await jobs.progress(job_id, 1, "progress", step)
        assert await jobs.set_item(job_id, 0, "succeeded", attempts=1) is Written.WRITTEN
        running = await jobs.status(job_id)
        assert running is not None and running.status == "running"
        assert running.items[1].progress is not None and running.items[1].progress.step == 1
        assert (running.items_done, running.items_total) == (1, 3)

        assert await jobs.cancel(job_id, meta) == {1: "running", 2: "queued"}
        assert not await jobs.progress(job_id, 1, "progress", step | {"step": 2})
        late = await jobs.set_item(job_id, 1, "succeeded", attempts=1)
        assert late is Written.FINISHED_BEFORE
        assert await jobs.cancel(job_id, meta) == {}  # nothing left to cancel
        status = await jobs.status(job_id)
        assert status is not None and status.status == "cancelled"
        assert [i.status for i in status.items] == ["succeeded", "cancelled", "cancelled"]
        assert status.items[1].progress is None and (status.items_done, status.items_total) == (
            3,
            3,
        )
        assert job_id not in await jobs.active()
        assert await redis.hexists(f"forge:job:{job_id}", "callback")

        events = await jobs.events(job_id, "0", None)
        seen = [(name, json.loads(data)) for _, name, data in events]
        assert [(name, d["index"], d.get("status", d.get("step"))) for name, d in seen] == [
            ("item", 0, "running"),
            ("item", 1, "running"),
            ("progress", 1, 1),
            ("item", 0, "succeeded"),
            ("item", 1, "cancelled"),
            ("item", 2, "cancelled"),
        ]
        ids = [event_id for event_id, _, _ in events]
        assert await jobs.events(job_id, ids[2], None) == events[3:]  # resumed after an id
        await redis.aclose()

    asyncio.run(scenario())


def job_stream(
    stack: JobsStack, job_id: str, last_event_id: str | None = None, take: int = 0
) -> list[Event]:
    """The job's events (all until the stream ends, or the first `take`, then the connection
    is dropped), as (id, event, data)."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    seen: list[Event] = []
    with api(stack) as c, c.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as reply:
        assert reply.status_code == 200, reply.read()
        for event_id, name, data in read_sse(reply):
            seen.append((event_id, name, data))
            if len(seen) == take:
                break
    return seen


def test_job_events_resume_after_a_dropped_connection(jobs_stack: JobsStack) -> None:
    """A client reads a few events, loses its connection, and resumes with Last-Event-ID:
    what it saw in two parts is the job's whole stream, in order, without gaps or repeats;
    the stream holds each item's state changes, its steps and previews, and ends with the
    job's status."""
    jobs_stack.start_gateway()
    # Progress on every step (no interval), a preview every 2 steps.
    jobs_stack.start_worker(FORGE_STREAM_PROGRESS_INTERVAL_S="0", FORGE_JOB_PREVIEW_EVERY="2")
    images = [
        {
            "prompt": f"a resumable glaive {uuid.uuid4().hex[:6]}",
            "steps": 8,
            "width": 64,
            "height": 64,
            "scheduler": "euler",
        }
        for _ in range(2)
    ]
    with api(jobs_stack) as c:
        job_id = submit(c, images)
    first = job_stream(jobs_stack, job_id, take=3)
    rest = job_stream(jobs_stack, job_id, last_event_id=first[-1][0])
    whole = job_stream(jobs_stack, job_id)
    assert first + rest == whole
    ids = [tuple(map(int, event_id.split("-"))) for event_id, _, _ in whole[:-1]]
    assert ids == sorted(set(ids))  # increasing: no repeats
    *events, (_, last, status) = whole
    assert last == "status" and status["status"] == "succeeded"
    assert (status["items_done"], status["items_total"]) == (2, 2)
    for index in (0, 1):
        mine = [(name, data) for _, name, data in events if data["index"] == index]
        states = [data["status"] for name, data in mine if name == "item"]
        assert states == ["running", "succeeded"]
        steps = [data["step"] for name, data in mine if name in ("progress", "preview")]
        assert steps == list(range(1, 9))
        previews = [data for name, data in mine if name == "preview"]
        assert [p["step"] for p in previews] == [2, 4, 6]  # not the last: the image follows
        assert all(p["image"].startswith("data:image/png;base64,") for p in previews)
        succeeded = mine[-1][1]
        assert succeeded["result"]["asset_url"] == status["items"][index]["result"]["asset_url"]
    with api(jobs_stack) as c:
        again = c.delete(f"/v1/jobs/{job_id}")
        assert again.status_code == 409 and "succeeded" in again.json()["detail"]
    assert job_stream(jobs_stack, job_id, last_event_id="not-an-id") == whole  # from the start


def test_cancelling_a_job_stops_its_running_item_and_skips_its_queued_one(
    jobs_stack: JobsStack, triton: Triton
) -> None:
    """A job of a quick item, then two long ones, made one at a time in order: cancelled
    while the first long one runs. The finished item keeps its image; the running one
    stops early (Triton counted fewer than its steps); the queued one never reaches Triton;
    the callback says cancelled; nothing is left running."""
    marker = uuid.uuid4().hex[:6]
    quick = {"prompt": f"a quick dirk {marker}", "steps": 2, "width": 64, "height": 64}
    long = {"steps": 150, "width": 512, "height": 512, "scheduler": "euler"}
    images = [
        quick,
        {"prompt": f"a long pike {marker}", **long},
        {"prompt": f"a long maul {marker}", **long},
    ]
    # One partition and one item at a time: the items run in their order.
    in_order = {"FORGE_TOPIC_PARTITIONS": "1"}
    with callback_receiver(failures=0) as (url, calls, allow):
        gateway = jobs_stack.start_gateway(**allow, **in_order)
        worker = jobs_stack.start_worker(**allow, **in_order, FORGE_WORKER_CONCURRENCY="1")
        steps_before = steps_done(triton)
        running_before = gateway_metric(gateway, "forge_job_items_cancelled_total", state="running")
        queued_before = gateway_metric(gateway, "forge_job_items_cancelled_total", state="queued")
        with api(jobs_stack) as c:
            job_id = submit(c, images, callback_url=url)

            def second_item_stepping() -> dict[str, Any] | None:
                job = c.get(f"/v1/jobs/{job_id}").json()
                progress = job["items"][1]["progress"]
                return job if progress and progress["step"] >= 1 else None

            during = wait_until("the first long item is stepping", second_item_stepping, every=0.1)
            assert [i["status"] for i in during["items"]] == ["succeeded", "running", "queued"]
            reply = c.delete(f"/v1/jobs/{job_id}")
            assert reply.status_code == 200, reply.text
            job = reply.json()
            assert job["status"] == "cancelled"
            assert [i["status"] for i in job["items"]] == ["succeeded", "cancelled", "cancelled"]
            assert job["items"][0]["result"]["asset_url"]
            assert c.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"  # again: same
            wait_until(
                "the worker has seen both cancelled items",
                lambda: worker_metric(worker, 'forge_jobs_total{outcome="cancelled"') >= 2,
            )
            assert worker_metric(worker, "forge_jobs_in_flight") == 0
            assert c.get(f"/v1/jobs/{job_id}").json() == c.delete(f"/v1/jobs/{job_id}").json()
        # One model instance: this request runs once the cancelled one has stopped.
        *progress, final = stream(triton, AXE, 0)
        assert isinstance(final, GeneratedImage)
        ran = steps_done(triton) - steps_before - len(progress) - quick["steps"]
        assert 1 <= ran < 150, f"the cancelled item ran {ran} of its 150 steps"
        wait_until("the callback is sent", lambda: calls)
    assert (
        gateway_metric(gateway, "forge_job_items_cancelled_total", state="running")
        == running_before + 1
    )
    assert (
        gateway_metric(gateway, "forge_job_items_cancelled_total", state="queued")
        == queued_before + 1
    )
    from standardwebhooks import Webhook

    headers, body = calls[-1]
    payload = Webhook(WEBHOOK_SECRET).verify(body, headers)
    assert payload["id"] == job_id and payload["status"] == "cancelled"
    assert [i["status"] for i in payload["items"]] == ["succeeded", "cancelled", "cancelled"]
