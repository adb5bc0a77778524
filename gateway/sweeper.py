"""The sweeper: nothing stays queued or running forever, no result message goes missing.

A message can be lost (a broker restarted without its data, a crash between the state write
and the produce). Every worker runs a `Sweeper`; one at a time sweeps (a lock in Redis).
For each unfinished job it:

- sends again the message of an item with no progress for `stuck_after_s` (dedupe makes a
  duplicate harmless: a finished item is skipped, a running one makes the same image), but
  not while its worker is paused for the image model (then nothing progresses anyway);
- fails an item past its deadline (`item_deadline_s` from submission), saying why;
- sends the results message of an item finished `stuck_after_s` ago that has none yet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable

from redis.exceptions import RedisError

from gateway import metrics
from gateway.jobs import TERMINAL, JobMessage, Written
from gateway.queue import QueueUnavailable
from gateway.services import Services
from gateway.topics import Topics

log = logging.getLogger(__name__)
LOCK = "forge:sweeper:lock"


class Sweeper:
    """Periodic repair of lost messages and overdue items (one instance per worker)."""

    def __init__(self, svc: Services, topics: Topics, taking_work: Callable[[], bool]) -> None:
        self.svc, self.jobs, self.queue = svc, svc.jobs, svc.queue
        self.topics, self.settings = topics, svc.settings
        self.taking_work = taking_work  # False while the worker is paused (the model away)
        self.owner = uuid.uuid4().hex

    async def run(self) -> None:
        """Sweep every `sweep_every_s` while this worker holds the lock; errors wait."""
        every = self.settings.sweep_every_s
        while True:
            await asyncio.sleep(every)
            try:
                if await self.jobs.redis.set(LOCK, self.owner, nx=True, ex=max(1, int(every))):
                    await self.sweep()
            except (RedisError, QueueUnavailable) as exc:
                log.warning("sweeper: a dependency is unavailable (%r); next sweep later", exc)

    async def sweep(self) -> dict[str, int]:
        """One pass over the unfinished jobs; counts of what it did."""
        done = {"requeued": 0, "expired": 0, "results_sent": 0}
        now = time.time()
        for job_id in await self.jobs.active():
            states = await self.jobs.items(job_id)
            if states is None:
                await self.jobs.forget_active(job_id)
                continue
            for index, state in states.items():
                outcome = await self._check(job_id, index, state, now)
                if outcome:
                    done[outcome] += 1
                    metrics.SWEPT.labels(outcome).inc()
        if any(done.values()):
            log.info("sweeper: %s", done)
        return done

    async def _check(self, job_id: str, index: int, state: dict[str, object], now: float) -> str:
        status, updated = str(state["status"]), float(str(state["updated_at"]))
        if status in TERMINAL:
            if now - updated > self.settings.stuck_after_s and not await self.jobs.sent(
                job_id, index
            ):
                message = await self.jobs.message(job_id, index)
                if message is not None:
                    await self.send_results(message, state)
                    return "results_sent"
            return ""
        message = await self.jobs.message(job_id, index)
        if message is None:
            return ""
        if now - message.submitted_at > self.settings.item_deadline_s:
            hours = self.settings.item_deadline_s / 3600
            written = await self.jobs.set_item(
                job_id,
                index,
                "failed",
                attempts=int(str(state.get("attempts", 0))),
                error=f"no image within the item deadline ({hours:g} h): the image model was "
                "unavailable or the queue too long",
            )
            if written in (Written.WRITTEN, Written.JOB_FINISHED):
                await self.svc.limiter.refund_item(self.svc.keys, message)
            return "expired"
        if now - updated > self.settings.stuck_after_s and self.taking_work():
            await self.queue.send(
                self.topics.requests(message.tier), message.key, message.model_dump_json().encode()
            )
            await self.jobs.set_item(
                job_id,
                index,
                "queued",
                attempts=int(str(state.get("attempts", 0))),
                error=f"sent again: no progress for {self.settings.stuck_after_s:g} s",
            )
            return "requeued"
        return ""

    async def send_results(self, message: JobMessage, state: dict[str, object]) -> None:
        """The results message of a finished item, then its `sent` mark."""
        await self.queue.send(
            self.topics.results, message.key, results_message(message, state).encode()
        )
        await self.jobs.mark_sent(message.job_id, message.index)


def results_message(message: JobMessage, state: dict[str, object]) -> str:
    """The results topic's record for a finished item."""
    return json.dumps(
        {
            "job_id": message.job_id,
            "index": message.index,
            "status": state["status"],
            "result": state.get("result"),
            "error": state.get("error"),
        }
    )
