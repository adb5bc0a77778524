"""`python -m gateway.worker`: job items from Kafka, generated through Triton, at least once.

One consumer group. Each poll takes up to `worker_concurrency` items, highest priority
topic first (lower topics are paused while a higher one has a backlog), generates them
concurrently so Triton's batcher gets them together, and commits the offsets only after every
item's asset is stored and its state written. A redelivered item that already succeeded is
skipped; one that had started makes the same image again (its seed was fixed at submission),
so the content-addressed store still holds one asset. Transient failures go to the retry
topic with backoff and an attempt count; invalid items and exhausted retries go to the
dead-letter topic and fail their job with a reason. SIGTERM finishes the batch in flight,
commits and leaves the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from prometheus_client import start_http_server
from pydantic import ValidationError

from gateway import metrics
from gateway.contract import UnknownContract
from gateway.jobs import JobMessage
from gateway.services import open_services
from gateway.settings import Settings
from gateway.topics import Topics, ensure_topics
from gateway.triton_client import ModelError, ModelRejected
from gateway.webhooks import deliver

log = logging.getLogger("gateway.worker")


class Rebalance(ConsumerRebalanceListener):
    """Offsets are committed after every batch, so a revoke loses no finished work."""

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Log the revoke and hand the lag metric to the new owner."""
        log.info("partitions revoked: %s", sorted(map(str, revoked)))
        for tp in revoked:  # its new owner reports the lag now
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(0)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Log the new assignment."""
        log.info("partitions assigned: %s", sorted(map(str, assigned)))


class Worker:
    """One member of the consumer group: polls, generates, stores, commits."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.services = open_services(settings)
        self.generator, self.jobs, self.queue = (
            self.services.generator,
            self.services.jobs,
            self.services.queue,
        )
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=settings.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=settings.max_poll_interval_ms,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            rebalance_timeout_ms=settings.session_timeout_ms,
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
        )
        self.stopping = asyncio.Event()
        self.callbacks: set[asyncio.Task[None]] = set()

    # ---- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until SIGTERM: the contract and topics first, then poll, handle, commit."""
        await self.services.contract.load()
        contract_watch = asyncio.create_task(
            self.services.contract.watch(self.settings.contract_refresh_s)
        )
        try:
            if await self._topics_ready():
                await self._consume()
        finally:
            contract_watch.cancel()
            await self._shutdown()

    async def _topics_ready(self) -> bool:
        """Make the topics, retrying while the broker is away; False if stopped first."""
        while True:
            try:
                await ensure_topics(self.settings)
                return True
            except Exception as exc:  # the broker is not up yet: keep trying until stopped
                log.warning("broker not ready (%r); retrying", exc)
                if await self._stopped_within(2.0):
                    return False

    async def _consume(self) -> None:
        await self.consumer.start()
        self.consumer.subscribe(self.topics.consumed, listener=Rebalance())
        log.info(
            "worker consuming %s as group %s", self.topics.consumed, self.settings.consumer_group
        )
        while not self.stopping.is_set():
            lags = await self._lags()  # once a poll: for the metric and the priorities
            for tp, lag in lags.items():
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)
            self._prioritize(lags)
            batch = await self.consumer.getmany(
                timeout_ms=500, max_records=self.settings.worker_concurrency
            )
            records = sorted(
                (r for rs in batch.values() for r in rs),
                key=lambda r: (self.topics.rank(r.topic), r.timestamp),
            )
            if records:
                await asyncio.gather(*(self.handle(r) for r in records))
                await self.consumer.commit(
                    {tp: rs[-1].offset + 1 for tp, rs in batch.items() if rs}
                )

    async def _stopped_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)
        return self.stopping.is_set()

    async def _lags(self) -> dict[TopicPartition, int]:
        lags = {}
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is not None:
                lags[tp] = max(0, high - await self.consumer.position(tp))
        return lags

    def _prioritize(self, lags: dict[TopicPartition, int]) -> None:
        """Pause every topic below the highest-priority one that has a backlog."""
        assigned = self.consumer.assignment()
        waiting = [self.topics.rank(tp.topic) for tp, lag in lags.items() if lag > 0]
        best = min(waiting, default=len(self.topics.consumed))
        lower = {tp for tp in assigned if self.topics.rank(tp.topic) > best}
        self.consumer.pause(*lower)
        self.consumer.resume(*(assigned - lower))

    async def _shutdown(self) -> None:
        if self.callbacks:
            await asyncio.wait(self.callbacks, timeout=30)
        await self.consumer.stop()  # leaves the group: partitions move on at once
        await self.services.close()
        log.info("worker stopped")

    # ---- one item ---------------------------------------------------------------------------

    async def handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """One item: skip if done, generate, store, record; retry or fail on errors."""
        try:
            message = JobMessage.model_validate_json(record.value or b"")
        except ValidationError as exc:
            await self.dead_letter(record, "malformed", f"not a job item: {exc.errors()[:3]}")
            return
        state = await self.jobs.item(message.job_id, message.index)
        if state is None:
            await self.dead_letter(record, "unknown_job", f"no job {message.job_id} (expired?)")
            return
        if state["status"] == "succeeded":
            metrics.JOBS.labels(record.topic, "duplicate").inc()
            return
        delay = message.not_before - time.time()
        if delay > 0:
            await asyncio.sleep(min(delay, self.settings.retry_backoff_max_s))
        if message.attempt == 0:
            metrics.JOB_QUEUE_WAIT.labels(message.topic).observe(time.time() - message.submitted_at)
        await self.jobs.set_item(
            message.job_id, message.index, "running", attempts=message.attempt + 1
        )
        metrics.JOBS_IN_FLIGHT.inc()
        try:
            result = await self.generator.cached(message.spec) or await self.generator.generate(
                message.spec, source="job"
            )
        except ModelRejected as exc:
            await self.fail(record, message, "invalid", exc.message)
            return
        except ModelError as exc:
            await self.retry(record, message, f"the image model: {exc.message}")
            return
        except UnknownContract as exc:
            await self.retry(record, message, str(exc))
            return
        except Exception as exc:  # Redis, the asset store, ...: try again later
            log.exception("item %s:%s failed", message.job_id, message.index)
            await self.retry(record, message, f"{type(exc).__name__}: {exc}")
            return
        finally:
            metrics.JOBS_IN_FLIGHT.dec()
        await self.jobs.set_item(
            message.job_id, message.index, "succeeded", attempts=message.attempt + 1, result=result
        )
        await self.queue.send(
            self.topics.results,
            message.key,
            json.dumps(
                {
                    "job_id": message.job_id,
                    "index": message.index,
                    "status": "succeeded",
                    "result": result.model_dump(mode="json"),
                }
            ).encode(),
        )
        metrics.JOBS.labels(record.topic, "succeeded").inc()
        await self.maybe_callback(message.job_id)

    async def retry(
        self, record: ConsumerRecord[bytes, bytes], message: JobMessage, reason: str
    ) -> None:
        """Back on the retry topic with backoff, or failed once the attempts are spent."""
        attempt = message.attempt + 1
        if attempt >= self.settings.max_attempts:
            await self.fail(
                record, message, "exhausted", f"gave up after {attempt} attempts: {reason}"
            )
            return
        backoff = min(
            self.settings.retry_backoff_s * 2**message.attempt, self.settings.retry_backoff_max_s
        )
        again = message.model_copy(update={"attempt": attempt, "not_before": time.time() + backoff})
        await self.queue.send(self.topics.retry, again.key, again.model_dump_json().encode())
        await self.jobs.set_item(
            message.job_id,
            message.index,
            "queued",
            attempts=attempt,
            error=f"retrying after: {reason}",
        )
        metrics.JOB_RETRIES.labels(record.topic).inc()
        metrics.JOBS.labels(record.topic, "retried").inc()
        log.warning(
            "item %s:%s retry %d in %.1fs: %s",
            message.job_id,
            message.index,
            attempt,
            backoff,
            reason,
        )

    async def fail(
        self, record: ConsumerRecord[bytes, bytes], message: JobMessage, reason: str, detail: str
    ) -> None:
        """Fail the item for good: its state, the dead-letter topic, maybe the callback."""
        await self.jobs.set_item(
            message.job_id, message.index, "failed", attempts=message.attempt + 1, error=detail
        )
        await self.dead_letter(record, reason, detail)
        metrics.JOBS.labels(record.topic, "failed").inc()
        await self.maybe_callback(message.job_id)

    async def dead_letter(
        self, record: ConsumerRecord[bytes, bytes], reason: str, detail: str
    ) -> None:
        """The record, with why, on the dead-letter topic (for an operator to inspect)."""
        envelope: dict[str, Any] = {
            "reason": reason,
            "detail": detail,
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "value": (record.value or b"").decode("utf-8", errors="replace"),
            "failed_at": time.time(),
        }
        await self.queue.send(
            self.topics.dead_letter, record.key or b"", json.dumps(envelope).encode()
        )
        metrics.DEAD_LETTERS.labels(reason).inc()
        metrics.JOBS.labels(record.topic, "dead_lettered").inc()
        log.error(
            "dead letter (%s) from %s[%d]@%d: %s",
            reason,
            record.topic,
            record.partition,
            record.offset,
            detail,
        )

    async def maybe_callback(self, job_id: str) -> None:
        """Once every item is done, one worker sends the signed callback (in the background)."""
        meta = await self.jobs.meta(job_id)
        if not meta or not meta.get("callback_url") or not self.settings.webhook_secret:
            return
        if not await self.jobs.claim_callback(job_id):
            return
        status = await self.jobs.status(job_id)
        assert status is not None
        task = asyncio.create_task(self._deliver(meta["callback_url"], status))
        self.callbacks.add(task)
        task.add_done_callback(self.callbacks.discard)

    async def _deliver(self, url: str, status: Any) -> None:
        try:
            await deliver(
                url,
                status,
                str(self.settings.webhook_secret),
                attempts=self.settings.webhook_attempts,
                timeout_s=self.settings.webhook_timeout_s,
            )
        except Exception as exc:  # the job itself succeeded or failed already; log only
            log.error("callback for %s to %s failed: %r", status.id, url, exc)


async def main() -> None:
    """Run one worker until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings()
    start_http_server(settings.worker_metrics_port, addr=settings.host)
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main())
