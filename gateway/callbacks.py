"""The callback outbox: finished jobs' callbacks, sent at least once, whoever dies meanwhile.

The write that finishes a job also records its callback in Redis (`gateway.jobs`). Every
worker runs an `Outbox`: it claims due callbacks for a lease (so only one worker sends each
at a time), sends one attempt, and on failure schedules the next with exponential backoff
and jitter, from seconds up to an hour, until the callback is older than the give-up age
(a setting, a day by default). Every attempt carries the same webhook-id, so a receiver
that saw one already can drop the rest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway import metrics
from gateway.backoff import jittered
from gateway.callback_urls import CallbackRules, UnsafeCallback
from gateway.jobs import OUTBOX, PREFIX, JobStore
from gateway.keys import KeyStore
from gateway.settings import Settings
from gateway.webhooks import DeliveryFailed, deliver_once

log = logging.getLogger(__name__)

# KEYS: outbox. ARGV: now, lease end, how many. Due entries, leased to the caller.
CLAIM_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return due
"""


class Outbox:
    """Sends the callbacks recorded in the outbox (one instance per worker), each signed
    with the webhook secrets of the API key that submitted the job, to the address the
    callback rules checked."""

    def __init__(
        self,
        redis: Redis,
        jobs: JobStore,
        keys: KeyStore,
        rules: CallbackRules | None,
        settings: Settings,
    ) -> None:
        self.redis, self.jobs, self.keys, self.rules = redis, jobs, keys, rules
        self.settings = settings
        self._claim = redis.register_script(CLAIM_DUE)

    async def run(self, every_s: float = 1.0) -> None:
        """Send due callbacks forever (a background task); Redis errors wait and retry."""
        async with httpx.AsyncClient(
            timeout=self.settings.webhook_timeout_s, follow_redirects=False
        ) as client:
            while True:
                try:
                    await self.send_due(client)
                except RedisError as exc:
                    log.warning("callback outbox: Redis unavailable (%r); retrying", exc)
                await asyncio.sleep(every_s)

    async def send_due(self, client: httpx.AsyncClient) -> int:
        """One attempt for each due callback (up to ten); how many were attempted."""
        now = time.time()
        lease = now + 3 * self.settings.webhook_timeout_s
        due = await self._claim(keys=[OUTBOX], args=[now, lease, 10])
        for raw in due:
            await self._attempt(client, raw.decode() if isinstance(raw, bytes) else raw)
        return len(due)

    async def _attempt(self, client: httpx.AsyncClient, job_id: str) -> None:
        key = PREFIX + job_id
        record_raw, meta = await self.redis.hget(key, "callback"), await self.jobs.meta(job_id)
        status = await self.jobs.status(job_id)
        if record_raw is None or meta is None or status is None or self.rules is None:
            await self.redis.zrem(OUTBOX, job_id)  # the job expired, or callbacks are off
            return
        record = json.loads(record_raw)
        owner = await self.keys.get(meta["api_key_id"])
        secrets = owner.signing_secrets(time.time()) if owner else []
        try:
            if not secrets:
                raise UnsafeCallback("the job's API key has no webhook secret (deleted?)")
            _, address = await self.rules.pinned(meta["callback_url"])
            await deliver_once(
                client,
                meta["callback_url"],
                str(address),
                status,
                secrets,
                record["webhook_id"],
                max_response_bytes=self.settings.webhook_max_response_bytes,
            )
        except (httpx.HTTPError, DeliveryFailed, UnsafeCallback) as exc:
            await self._failed(job_id, record, repr(exc))
            return
        record |= {"delivered_at": time.time(), "attempts": record.get("attempts", 0) + 1}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, "callback", json.dumps(record))
            pipe.zrem(OUTBOX, job_id)
            await pipe.execute()
        metrics.CALLBACKS.labels("delivered").inc()
        log.info("callback %s for %s delivered", record["webhook_id"], job_id)

    async def _failed(self, job_id: str, record: dict[str, object], reason: str) -> None:
        attempts = int(str(record.get("attempts", 0))) + 1
        record |= {"attempts": attempts, "last_error": reason}
        age = time.time() - float(str(record["created_at"]))
        async with self.redis.pipeline(transaction=True) as pipe:
            if age > self.settings.webhook_give_up_after_s:
                record["gave_up_at"] = time.time()
                pipe.zrem(OUTBOX, job_id)
                metrics.CALLBACKS.labels("gave_up").inc()
                log.error(
                    "callback for %s: gave up after %d attempts: %s", job_id, attempts, reason
                )
            else:
                wait = jittered(
                    attempts, self.settings.webhook_backoff_s, self.settings.webhook_backoff_max_s
                )
                pipe.zadd(OUTBOX, {job_id: time.time() + wait})
                metrics.CALLBACKS.labels("retried").inc()
                log.warning("callback for %s failed (%s); next try in %.0f s", job_id, reason, wait)
            pipe.hset(PREFIX + job_id, "callback", json.dumps(record))
            await pipe.execute()
