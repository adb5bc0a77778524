"""Async jobs: the Kafka message of one item, and job state in Redis.

A job is one or more items (images). Each item travels as its own Kafka message, so items
spread over workers and reach Triton's batcher together. The job's status is derived from
its items' states, which workers write to one Redis hash per job.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from gateway.schemas import ImageResult, ImageSpec, JobItem, JobStatus

PREFIX = "forge:job:"
TERMINAL = ("succeeded", "failed")


class JobMessage(BaseModel):
    """One item on a request or retry topic."""

    job_id: str
    index: int
    api_key_id: str
    spec: ImageSpec = Field(description="the image, resolved and seeded at submission")
    submitted_at: float
    topic: str = Field(description="the request topic it was first sent to")
    attempt: int = 0
    not_before: float = 0.0

    @property
    def key(self) -> bytes:
        """The Kafka message key: job and item, so an item's retries share a partition."""
        return f"{self.job_id}:{self.index}".encode()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def new_job_id() -> str:
    """A fresh, unguessable job id."""
    return f"job_{uuid.uuid4().hex}"


class JobStore:
    """Job state in Redis: one hash per job, a field per item, expiring with the job."""

    def __init__(self, redis: Redis, ttl_s: int) -> None:
        self.redis, self.ttl_s = redis, ttl_s

    async def create(
        self, job_id: str, api_key_id: str, count: int, priority: str, callback_url: str | None
    ) -> None:
        """Record a new job with every item queued."""
        now = time.time()
        meta = {
            "api_key_id": api_key_id,
            "count": count,
            "priority": priority,
            "callback_url": callback_url,
            "created_at": now,
        }
        fields: dict[str | bytes | bytearray | memoryview | int | float, str] = {
            "meta": json.dumps(meta)
        }
        fields |= {
            f"item:{i}": json.dumps({"status": "queued", "updated_at": now}) for i in range(count)
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(PREFIX + job_id, mapping=fields)
            pipe.expire(PREFIX + job_id, self.ttl_s)
            await pipe.execute()

    async def delete(self, job_id: str) -> None:
        """Forget a job (one that was never accepted)."""
        await self.redis.delete(PREFIX + job_id)

    async def meta(self, job_id: str) -> dict[str, Any] | None:
        """The job's owner, size, priority and callback, or None."""
        raw = await self.redis.hget(PREFIX + job_id, "meta")
        return None if raw is None else dict(json.loads(raw))

    async def item(self, job_id: str, index: int) -> dict[str, Any] | None:
        """One item's state, or None."""
        raw = await self.redis.hget(PREFIX + job_id, f"item:{index}")
        return None if raw is None else dict(json.loads(raw))

    async def set_item(
        self,
        job_id: str,
        index: int,
        status: str,
        *,
        attempts: int,
        result: ImageResult | None = None,
        error: str | None = None,
    ) -> None:
        """Write one item's state."""
        value = {
            "status": status,
            "attempts": attempts,
            "updated_at": time.time(),
            "result": result.model_dump(mode="json") if result else None,
            "error": error,
        }
        await self.redis.hset(PREFIX + job_id, f"item:{index}", json.dumps(value))

    async def claim_callback(self, job_id: str) -> bool:
        """True for exactly one caller once every item is done: that one sends the webhook."""
        status = await self.status(job_id)
        if status is None or status.status not in TERMINAL:
            return False
        return bool(await self.redis.hsetnx(PREFIX + job_id, "callback", str(time.time())))

    async def status(self, job_id: str) -> JobStatus | None:
        """The job with its items, its state derived from theirs; None if unknown."""
        raw = await self.redis.hgetall(PREFIX + job_id)
        if not raw:
            return None
        fields = {_text(k): json.loads(v) for k, v in raw.items() if _text(k) != "callback"}
        meta = fields.pop("meta")
        items = [
            JobItem(
                index=i,
                status=s["status"],
                result=s.get("result"),
                error=s.get("error"),
                attempts=s.get("attempts", 0),
            )
            for i, s in sorted(((int(k.split(":")[1]), v) for k, v in fields.items()))
        ]
        states = {item.status for item in items}
        if states <= {"succeeded"}:
            overall = "succeeded"
        elif states <= set(TERMINAL):
            overall = "failed"
        elif states & {"running", "succeeded", "failed"}:
            overall = "running"
        else:
            overall = "queued"
        errors = [f"item {i.index}: {i.error}" for i in items if i.status == "failed"]
        return JobStatus(
            id=job_id,
            status=overall,
            created_at=meta["created_at"],
            updated_at=max([meta["created_at"], *(v["updated_at"] for v in fields.values())]),
            priority=meta["priority"],
            items=items,
            error="; ".join(errors) if overall == "failed" else None,
        )
