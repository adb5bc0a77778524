"""Async jobs: the Kafka message of one item, and job state in Redis.

A job is one or more items (images). Each item travels as its own Kafka message, so items
spread over workers and reach Triton's batcher together. The job's status is derived from
its items' states, which workers write to one Redis hash per job:

- `meta`: owner, size, priority, callback URL, creation time;
- `item:<i>`: the item's state; `progress:<i>`: its current denoising step while it runs;
  `message:<i>`: its Kafka message (the sweeper sends it again when the broker lost it);
  `sent:<i>`: set once its results message is on the results topic;
- `callback`: the callback's outbox record, written in the same step as the item state that
  finished the job, so a worker that dies right after still leaves the callback to send.

Beside the hash, a Redis stream per job holds its events for clients that watch it (`item`
on every state change, `progress` and `preview` while items run), each written in the same
atomic step as the state it reports, so a client resuming after an event id misses nothing
the job's state says. The stream keeps its newest `events_max` events and outlives the
job's end by `events_ttl_s`; the hash outlives it by the job's TTL.

State writes are Lua scripts, atomic in Redis: a job that expired is never recreated by a
late write, and a finished item (succeeded, failed or cancelled) is never overwritten by a
late duplicate. Unfinished jobs are indexed in `forge:jobs:active` (for the sweeper),
callbacks to send in `forge:outbox:callbacks` (scored by when to try next).
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

from gateway.content_policy import Mode
from gateway.schemas import ImageResult, ImageSpec, JobItem, JobStatus, Priority, StepProgress

PREFIX = "forge:job:"
OUTBOX = "forge:outbox:callbacks"
TERMINAL = ("succeeded", "failed", "cancelled")

# What the scripts share. KEYS[1] is the job's hash; event() appends to its stream,
# which expires with the job; finish() ends the job: out of the active index (KEYS[2]),
# its callback in the outbox (KEYS[3]) if it has one, its stream (KEYS[4]) kept
# `events_ttl_ms` more.
LUA_COMMON = """
local function finished(status)
  return status == 'succeeded' or status == 'failed' or status == 'cancelled'
end
local function event(stream, maxlen, name, data)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'event', name, 'data', data)
  redis.call('PEXPIRE', stream, redis.call('PTTL', KEYS[1]))
end
local function all_finished(count)
  for i = 0, count - 1 do
    local item = redis.call('HGET', KEYS[1], 'item:' .. i)
    if not (item and finished(cjson.decode(item)['status'])) then return false end
  end
  return true
end
local function finish(now, job_id, callback, events_ttl_ms)
  redis.call('ZREM', KEYS[2], job_id)
  if callback ~= '' and redis.call('HSETNX', KEYS[1], 'callback', callback) == 1 then
    redis.call('ZADD', KEYS[3], now, job_id)
  end
  redis.call('PEXPIRE', KEYS[4], events_ttl_ms)
end
"""

# KEYS: job hash, active index, callback outbox, events stream.
# ARGV: item index, item state JSON, now, item count, job id, callback record JSON or "",
# the item event's data JSON, events max, events TTL (ms).
# Returns 0: no such job (expired); -1: the item had finished already (nothing written);
# 1: written; 2: written, and it finished the job.
SET_ITEM = (
    LUA_COMMON
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local current = redis.call('HGET', KEYS[1], 'item:' .. ARGV[1])
if current and finished(cjson.decode(current)['status']) then return -1 end
redis.call('HSET', KEYS[1], 'item:' .. ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[1], 'progress:' .. ARGV[1])
event(KEYS[4], ARGV[8], 'item', ARGV[7])
if not finished(cjson.decode(ARGV[2])['status']) then return 1 end
if not all_finished(tonumber(ARGV[4])) then return 1 end
finish(ARGV[3], ARGV[5], ARGV[6], ARGV[9])
return 2
"""
)

# KEYS: as SET_ITEM's. ARGV: now, item count, job id, callback record JSON or "", events
# max, events TTL (ms), the cancelled items' error.
# Every item not finished becomes cancelled (its event written), and the job ends.
# Returns "<state it was in>:<index>" per cancelled item (none: it had finished already).
CANCEL = (
    LUA_COMMON
    + """
local cancelled = {}
for i = 0, tonumber(ARGV[2]) - 1 do
  local raw = redis.call('HGET', KEYS[1], 'item:' .. i)
  local state = raw and cjson.decode(raw)
  if state and not finished(state['status']) then
    table.insert(cancelled, state['status'] .. ':' .. i)
    state['status'] = 'cancelled'
    state['updated_at'] = tonumber(ARGV[1])
    state['error'] = ARGV[7]
    redis.call('HSET', KEYS[1], 'item:' .. i, cjson.encode(state))
    redis.call('HDEL', KEYS[1], 'progress:' .. i)
    state['index'] = i
    event(KEYS[4], ARGV[5], 'item', cjson.encode(state))
  end
end
if #cancelled > 0 then finish(ARGV[1], ARGV[3], ARGV[4], ARGV[6]) end
return cancelled
"""
)

# KEYS: job hash, events stream. ARGV: item index, progress JSON, event name, event data
# JSON, events max. Written only while the item runs; returns 0 (nothing written) once it
# does not: it was cancelled, or the job is gone.
PROGRESS = (
    LUA_COMMON
    + """
local raw = redis.call('HGET', KEYS[1], 'item:' .. ARGV[1])
if not raw or cjson.decode(raw)['status'] ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'progress:' .. ARGV[1], ARGV[2])
event(KEYS[2], ARGV[5], ARGV[3], ARGV[4])
return 1
"""
)


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
    content_policy: Mode = Field(
        "strict", description="its API key's mode: strict keys are refused flagged images"
    )
    attempt: int = 0
    not_before: float = 0.0

    @property
    def key(self) -> bytes:
        """The Kafka message key: job and item, so an item's retries share a partition."""
        return f"{self.job_id}:{self.index}".encode()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def events_key(job_id: str) -> str:
    """The Redis stream of a job's events (beside its hash, expiring with it)."""
    return f"{PREFIX}{job_id}:events"


def new_job_id() -> str:
    """A fresh, unguessable job id."""
    return f"job_{uuid.uuid4().hex}"


def webhook_id(job_id: str) -> str:
    """The callback's webhook-id: the same on every delivery attempt, so receivers dedupe."""
    return f"msg_{job_id}"


class JobStore:
    """Job state in Redis: one hash per job, a field per item, expiring with the job."""

    def __init__(
        self, redis: Redis, ttl_s: int, topic_prefix: str, events_max: int, events_ttl_s: int
    ) -> None:
        self.redis, self.ttl_s = redis, ttl_s
        self.events_max, self.events_ttl_ms = events_max, events_ttl_s * 1000
        self.active_key = f"forge:jobs:active:{topic_prefix}"
        self._set_item = redis.register_script(SET_ITEM)
        self._cancel = redis.register_script(CANCEL)
        self._progress = redis.register_script(PROGRESS)

    def _keys(self, job_id: str) -> list[str]:
        """The keys of SET_ITEM and CANCEL: the job, the active index, the outbox, the
        job's events."""
        return [PREFIX + job_id, self.active_key, OUTBOX, events_key(job_id)]

    async def create(
        self,
        job_id: str,
        api_key_id: str,
        messages: list[JobMessage],
        priority: str,
        callback_url: str | None,
        content_flags: list[list[str]] | None = None,
        within: Callable[[Pipeline], None] = lambda pipe: None,
    ) -> JobStatus:
        """Record a new job with every item queued and its message kept for the sweeper, in
        one transaction with whatever `within` adds to it; the job as recorded.
        `content_flags`: each item's content policy categories (review mode)."""
        now = time.time()
        meta = {
            "api_key_id": api_key_id,
            "count": len(messages),
            "priority": priority,
            "callback_url": callback_url,
            "created_at": now,
            "content_flags": content_flags or [[] for _ in messages],
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
            pipe.delete(PREFIX + job_id, events_key(job_id))
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
        written = await self._set_item(
            keys=self._keys(job_id),
            args=[
                index,
                json.dumps(value),
                now,
                meta["count"],
                job_id,
                callback_record(job_id, meta, now),
                json.dumps({"index": index, **value}),
                self.events_max,
                self.events_ttl_ms,
            ],
        )
        return Written(int(written))

    async def cancel(self, job_id: str, meta: dict[str, Any]) -> dict[int, str]:
        """Cancel every item of the job not finished yet, which ends the job (its callback
        recorded as when its last item finishes): the state each cancelled item was in
        (queued or running), by index; none if the job had finished already. A worker
        running one of them stops at its next progress write."""
        now = time.time()
        cancelled = await self._cancel(
            keys=self._keys(job_id),
            args=[
                now,
                meta["count"],
                job_id,
                callback_record(job_id, meta, now),
                self.events_max,
                self.events_ttl_ms,
                "cancelled by the client",
            ],
        )
        states = (_text(entry).split(":") for entry in cancelled)
        return {int(index): state for state, index in states}

    async def progress(self, job_id: str, index: int, event: str, data: dict[str, Any]) -> bool:
        """Record a running item's step (`data`: step, total_steps, elapsed_ms, and the
        preview's fields if `event` is "preview") and its event; False, with nothing
        written, if the item no longer runs (it was cancelled, or the job is gone)."""
        step = {k: data[k] for k in ("step", "total_steps", "elapsed_ms")}
        written = await self._progress(
            keys=[PREFIX + job_id, events_key(job_id)],
            args=[
                index,
                json.dumps(step),
                event,
                json.dumps({"index": index, **data}),
                self.events_max,
            ],
        )
        return bool(written)

    async def events(
        self, job_id: str, after: str, block_ms: int | None
    ) -> list[tuple[str, str, str]]:
        """The job's events after the event id `after` ("0" for all that are kept), as
        (id, event, data JSON); waiting up to `block_ms` for one if there is none yet."""
        reply = await self.redis.xread({events_key(job_id): after}, count=100, block=block_ms)
        assert not isinstance(reply, dict)  # RESP2's shape: [[stream, entries]]
        found = []
        for _, entries in reply or []:
            for entry_id, raw in entries:
                fields = {_text(k): _text(v) for k, v in raw.items()}
                found.append((_text(entry_id), fields["event"], fields["data"]))
        return found

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
        for key, value in fields.items():
            if key.startswith("progress:"):
                states[int(key.split(":")[1])]["progress"] = json.loads(value)
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
            content_flags=meta["content_flags"][i] if "content_flags" in meta else [],
            progress=StepProgress(**s["progress"])
            if s["status"] == "running" and "progress" in s
            else None,
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
        items_done=sum(item.status in TERMINAL for item in items),
        items_total=len(items),
        error="; ".join(errors) if state == "failed" else None,
    )


def callback_record(job_id: str, meta: dict[str, Any], now: float) -> str:
    """The outbox record of the job's callback, or "" if it has no callback URL."""
    if not meta.get("callback_url"):
        return ""
    return json.dumps({"webhook_id": webhook_id(job_id), "created_at": now})


def overall(states: set[str]) -> str:
    """A job's state from its items' states: once every item finished, cancelled if any
    was (the client stopped it), else failed if any failed."""
    if states <= {"succeeded"}:
        return "succeeded"
    if states <= set(TERMINAL):
        return "cancelled" if "cancelled" in states else "failed"
    if states & {"running", "succeeded", "failed"}:
        return "running"
    return "queued"
