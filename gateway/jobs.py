"""Async jobs: the Kafka message of one item, and job state in Redis.

A job is one or more items (images). Each item travels as its own Kafka message, so items
spread over workers and reach Triton's batcher together. The job's status is derived from
its items' states, which workers write to one Redis hash per job:

- `meta`: owner, size, priority, callback URL, creation time;
- `item:<i>`: the item's state; `message:<i>`: its Kafka message (the sweeper sends it again
  when the broker lost it); `sent:<i>`: set once its results message is on the results topic;
- `callback`: the callback's outbox record, written in the same step as the item state that
  finished the job, so a worker that dies right after still leaves the callback to send.

State writes are Lua scripts, atomic in Redis: a job that expired is never recreated by a
late write, and a finished item (succeeded or failed) is never overwritten by a late
duplicate. Unfinished jobs are indexed in `forge:jobs:active` (for the sweeper), callbacks
to send in `forge:outbox:callbacks` (scored by when to try next).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from enum import Enum
from typing import Any

from pydantic import BaseModel, Field
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from gateway.schemas import ImageResult, ImageSpec, JobItem, JobStatus, Priority

PREFIX = "forge:job:"
OUTBOX = "forge:outbox:callbacks"
TERMINAL = ("succeeded", "failed")

# KEYS: job hash, active index, callback outbox.
# ARGV: item field, item state JSON, now, item count, job id, callback record JSON or "".
# Returns 0: no such job (expired); -1: the item had finished already (nothing written);
# 1: written; 2: written, and it finished the job.
SET_ITEM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local status = cjson.decode(current)['status']
  if status == 'succeeded' or status == 'failed' then return -1 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local status = cjson.decode(ARGV[2])['status']
if status ~= 'succeeded' and status ~= 'failed' then return 1 end
for i = 0, tonumber(ARGV[4]) - 1 do
  local item = redis.call('HGET', KEYS[1], 'item:' .. i)
  local s = item and cjson.decode(item)['status']
  if s ~= 'succeeded' and s ~= 'failed' then return 1 end
end
redis.call('ZREM', KEYS[2], ARGV[5])
if ARGV[6] ~= '' and redis.call('HSETNX', KEYS[1], 'callback', ARGV[6]) == 1 then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[5])
end
return 2
"""


class Written(Enum):
    """What a state write did."""

    MISSING = 0  # the job does not exist (expired): nothing was written
    FINISHED_BEFORE = -1  # the item had finished already: a late duplicate, ignored
    WRITTEN = 1
    JOB_FINISHED = 2  # written, and every item of the job has now finished


class JobMessage(BaseModel):
    """One item on a request or retry topic."""

    job_id: str
    index: int
    api_key_id: str
    spec: ImageSpec = Field(description="the image, resolved and seeded at submission")
    submitted_at: float
    tier: Priority = Field(description="the queue it travels on (its retries too)")
    units: int = Field(0, description="what the item was charged; refunded if the server fails it")
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


def webhook_id(job_id: str) -> str:
    """The callback's webhook-id: the same on every delivery attempt, so receivers dedupe."""
    return f"msg_{job_id}"


class JobStore:
    """Job state in Redis: one hash per job, a field per item, expiring with the job."""

    def __init__(self, redis: Redis, ttl_s: int, topic_prefix: str) -> None:
        self.redis, self.ttl_s = redis, ttl_s
        self.active_key = f"forge:jobs:active:{topic_prefix}"
        self._set_item = redis.register_script(SET_ITEM)

    async def create(
        self,
        job_id: str,
        api_key_id: str,
        messages: list[JobMessage],
        priority: str,
        callback_url: str | None,
        within: Callable[[Pipeline], None] = lambda pipe: None,
    ) -> JobStatus:
        """Record a new job with every item queued and its message kept for the sweeper, in
        one transaction with whatever `within` adds to it; the job as recorded."""
        now = time.time()
        meta = {
            "api_key_id": api_key_id,
            "count": len(messages),
            "priority": priority,
            "callback_url": callback_url,
            "created_at": now,
        }
        states = {m.index: {"status": "queued", "updated_at": now} for m in messages}
        fields: dict[str | bytes | bytearray | memoryview | int | float, str] = {
            "meta": json.dumps(meta)
        }
        for m in messages:
            fields[f"item:{m.index}"] = json.dumps(states[m.index])
            fields[f"message:{m.index}"] = m.model_dump_json()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(PREFIX + job_id, mapping=fields)
            pipe.expire(PREFIX + job_id, self.ttl_s)
            pipe.zadd(self.active_key, {job_id: now})
            within(pipe)
            await pipe.execute()
        return as_status(job_id, meta, states)

    async def delete(
        self, job_id: str, within: Callable[[Pipeline], None] = lambda pipe: None
    ) -> None:
        """Forget a job (one that was never accepted), with whatever `within` adds."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(PREFIX + job_id)
            pipe.zrem(self.active_key, job_id)
            within(pipe)
            await pipe.execute()

    async def meta(self, job_id: str) -> dict[str, Any] | None:
        """The job's owner, size, priority and callback, or None."""
        raw = await self.redis.hget(PREFIX + job_id, "meta")
        return None if raw is None else dict(json.loads(raw))

    async def item(self, job_id: str, index: int) -> dict[str, Any] | None:
        """One item's state, or None."""
        raw = await self.redis.hget(PREFIX + job_id, f"item:{index}")
        return None if raw is None else dict(json.loads(raw))

    async def message(self, job_id: str, index: int) -> JobMessage | None:
        """The item's Kafka message as submitted, or None."""
        raw = await self.redis.hget(PREFIX + job_id, f"message:{index}")
        return None if raw is None else JobMessage.model_validate_json(raw)

    async def set_item(
        self,
        job_id: str,
        index: int,
        status: str,
        *,
        attempts: int,
        result: ImageResult | None = None,
        error: str | None = None,
    ) -> Written:
        """Write one item's state, unless the job is gone or the item finished already.

        The write that finishes the job also records its callback in the outbox (if the
        job has a callback URL), in the same atomic step.
        """
        meta = await self.meta(job_id)
        if meta is None:
            return Written.MISSING
        now = time.time()
        value = {
            "status": status,
            "attempts": attempts,
            "updated_at": now,
            "result": result.model_dump(mode="json") if result else None,
            "error": error,
        }
        callback = ""
        if meta.get("callback_url"):
            callback = json.dumps({"webhook_id": webhook_id(job_id), "created_at": now})
        written = await self._set_item(
            keys=[PREFIX + job_id, self.active_key, OUTBOX],
            args=[f"item:{index}", json.dumps(value), now, meta["count"], job_id, callback],
        )
        return Written(int(written))

    async def mark_sent(self, job_id: str, index: int) -> None:
        """The item's results message is on the results topic."""
        await self.redis.hset(PREFIX + job_id, f"sent:{index}", "1")

    async def sent(self, job_id: str, index: int) -> bool:
        """Whether the item's results message was sent."""
        return bool(await self.redis.hexists(PREFIX + job_id, f"sent:{index}"))

    async def _snapshot(self, job_id: str) -> tuple[dict[str, Any], dict[int, Any]] | None:
        """The job's meta and its items' states by index (one read), or None."""
        raw = await self.redis.hgetall(PREFIX + job_id)
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        states = {
            int(k.split(":")[1]): json.loads(v) for k, v in fields.items() if k.startswith("item:")
        }
        return json.loads(fields["meta"]), states

    async def items(self, job_id: str) -> dict[int, dict[str, Any]] | None:
        """Every item's state by index, or None if the job does not exist."""
        snapshot = await self._snapshot(job_id)
        return None if snapshot is None else snapshot[1]

    async def active(self) -> list[str]:
        """The ids of jobs not yet finished (or expired without finishing)."""
        members = await self.redis.zrange(self.active_key, 0, -1)
        return [_text(j) for j in members if isinstance(j, bytes | str)]

    async def forget_active(self, job_id: str) -> None:
        """Drop a job from the active index (it expired)."""
        await self.redis.zrem(self.active_key, job_id)

    async def status(self, job_id: str) -> JobStatus | None:
        """The job with its items, its state derived from theirs; None if unknown."""
        snapshot = await self._snapshot(job_id)
        return None if snapshot is None else as_status(job_id, *snapshot)


def as_status(job_id: str, meta: dict[str, Any], states: dict[int, Any]) -> JobStatus:
    """The job of `meta` with items in `states`, its state derived from theirs."""
    items = [
        JobItem(
            index=i,
            status=s["status"],
            result=s.get("result"),
            error=s.get("error"),
            attempts=s.get("attempts", 0),
        )
        for i, s in sorted(states.items())
    ]
    state = overall({item.status for item in items})
    errors = [f"item {i.index}: {i.error}" for i in items if i.status == "failed"]
    return JobStatus(
        id=job_id,
        status=state,
        created_at=meta["created_at"],
        updated_at=max([meta["created_at"], *(s["updated_at"] for s in states.values())]),
        priority=meta["priority"],
        items=items,
        error="; ".join(errors) if state == "failed" else None,
    )


def overall(states: set[str]) -> str:
    """A job's state from its items' states."""
    if states <= {"succeeded"}:
        return "succeeded"
    if states <= set(TERMINAL):
        return "failed"
    if states & {"running", "succeeded", "failed"}:
        return "running"
    return "queued"
