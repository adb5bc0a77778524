"""`python -m gateway.worker`: job items from Kafka, generated through Triton, at least once.

One consumer group. Each poll takes up to `worker_concurrency` items, highest priority
first (each tier's requests, then its retries; lower topics wait while a higher one has a
backlog), generates them concurrently so Triton's batcher gets them together, and commits
a partition's offset only past items that are done: stored, their state written, their
results message sent; a batch whose partitions were revoked while it ran commits nothing
(the partitions' next owner reads its items again). Items are made by the streaming model,
each step recorded as the item's progress (`gateway.jobs`); a write that finds the item
cancelled closes the stream, so the model stops before its next step. An item that is not
done is read again:

- the image model is away (Triton down or loading): the worker stops taking work (every
  partition paused, reported not ready) until Triton answers again; the item's attempts
  do not count the outage, only its deadline (`item_deadline_s`) does;
- Redis, the broker or the asset store failed: the worker waits (growing backoff) and reads
  the item again; it does not exit;
- a retry whose time has not come: its partition waits until then, the rest flow on.

A redelivered item that already finished is skipped (its missing side effects are sent
again); one that had started makes the same image again (its seed was fixed at
submission), so the content-addressed store still holds one asset. An item's own failures
go to its tier's retry topic with exponential backoff and jitter (seconds to minutes);
invalid items and exhausted retries go to the dead-letter topic and fail their job with a
reason. Callbacks are sent from the outbox (`gateway.callbacks`), lost messages repaired by
the sweeper (`gateway.sweeper`). SIGTERM finishes the batch in flight, commits and leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from enum import Enum
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError
from redis.exceptions import RedisError

from gateway import metrics
from gateway.assets import StoreUnavailable
from gateway.backoff import jittered
from gateway.callbacks import Outbox
from gateway.content_policy import audit_refusal
from gateway.contract import UnknownContract
from gateway.generation import UNSAFE_IMAGE, ImageFlagged, progress_event
from gateway.input_images import InputImageError
from gateway.jobs import TERMINAL, JobMessage, Written
from gateway.queue import QueueUnavailable
from gateway.schemas import ImageResult
from gateway.services import open_services
from gateway.settings import Settings
from gateway.sweeper import Sweeper, results_message
from gateway.topics import Topics, ensure_topics
from gateway.triton_client import STREAM_MODEL_NAME, ModelError, ModelFailed, ModelRejected
from gateway.worker_probe import serve_probes

log = logging.getLogger("gateway.worker")
Record: TypeAlias = "ConsumerRecord[bytes, bytes]"
# Failures of a dependency, not of the item: the item is read again later.
DEPENDENCY_ERRORS = (RedisError, QueueUnavailable, StoreUnavailable, KafkaError, OSError)


class Outcome(Enum):
    """What became of one record in a poll."""

    DONE = "done"  # finished with: its offset may be committed
    DEFERRED = "deferred"  # a retry whose time has not come: read again then
    MODEL_AWAY = "model_away"  # the image model is unavailable: read again when it is back
    DEPENDENCY_FAILED = "dependency_failed"  # Redis, the broker or the store: read again soon


class Rebalance(ConsumerRebalanceListener):
    """Offsets are committed after every batch, so a revoke loses no finished work; a batch
    that was running when its partitions were revoked is not committed at all (`revokes`)."""

    def __init__(self) -> None:
        self.revokes = 0  # how many revokes so far: a batch remembers the count it began at

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Log the revoke and hand the lag metric to the new owner."""
        self.revokes += 1
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
        metrics.start_worker_series()
        self.services = svc = open_services(settings)
        self.generator, self.jobs, self.queue = svc.generator, svc.jobs, svc.queue
        self.outbox = Outbox(svc.redis, svc.jobs, svc.keys, svc.callbacks, settings)
        self.sweeper = Sweeper(svc, self.topics, lambda: self.model_ready)
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
        self.rebalance = Rebalance()
        self.stopping = asyncio.Event()
        self.consuming = False
        self.model_ready = True  # until a call says otherwise
        self.dependency_failures = 0  # in a row: the backoff before reading again grows
        self.deferred: dict[TopicPartition, float] = {}  # partition -> when its retry is due

    # ---- readiness ----------------------------------------------------------------------

    def readiness(self) -> dict[str, str]:
        """What the worker waits for, if anything ("ok" when it takes work)."""
        return {
            "consuming": "ok" if self.consuming else "not yet",
            "image_model": "ok" if self.model_ready else "unavailable: work paused",
            "dependencies": "ok" if not self.dependency_failures else "failing: backing off",
        }

    # ---- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until SIGTERM: the contract and topics first, then poll, handle, commit."""
        await self.services.contract.load()
        background = [
            asyncio.create_task(self.services.contract.watch(self.settings.contract_refresh_s)),
            asyncio.create_task(self.outbox.run()),
            asyncio.create_task(self.sweeper.run()),
        ]
        try:
            if await self._topics_ready():
                await self._consume()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
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
        self.consumer.subscribe(self.topics.consumed, listener=self.rebalance)
        self.consuming = True
        log.info(
            "worker consuming %s as group %s", self.topics.consumed, self.settings.consumer_group
        )
        while not self.stopping.is_set():
            try:
                if self.model_ready:
                    await self._poll()
                else:
                    await self._wait_for_model()
            except KafkaError as exc:  # a broker blip: wait, then poll again
                self.dependency_failures += 1
                log.warning("broker unavailable (%r); polling again", exc)
                await self._stopped_within(self._backoff())

    async def _wait_for_model(self) -> None:
        """Take no work (every partition paused; polls keep the group membership) until
        Triton answers again."""
        self.consumer.pause(*self.consumer.assignment())
        await self.consumer.getmany(timeout_ms=1000)
        try:
            answering = await self.services.triton.ready(STREAM_MODEL_NAME)
        except ModelError:
            return
        if answering and not self.services.contract.known:
            await self.services.contract.load()
        self.model_ready = answering and self.services.contract.known
        if self.model_ready:
            log.info("the image model is back: taking work again")
            metrics.WORKER_PAUSED.set(0)

    async def _poll(self) -> None:
        lags = await self._lags()  # once a poll: for the metric and the priorities
        for tp, lag in lags.items():
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)
        self._flow_control(lags)
        batch = await self.consumer.getmany(
            timeout_ms=500, max_records=self.settings.worker_concurrency
        )
        revokes = self.rebalance.revokes  # the records are of the assignment held now
        records = sorted(
            (r for rs in batch.values() for r in rs),
            key=lambda r: (self.topics.rank(r.topic), r.timestamp),
        )
        if not records:
            return
        outcomes = await asyncio.gather(*(self._outcome(r) for r in records))
        if self.rebalance.revokes != revokes:
            self._refuse_stale(batch)
            return
        await self._settle(batch, dict(zip(map(id, records), outcomes, strict=True)))

    def _refuse_stale(self, batch: dict[TopicPartition, list[Record]]) -> None:
        """A batch whose partitions were revoked while it ran commits nothing: its offsets
        could overwrite a newer commit of the partition's next owner, which reads the
        batch's items again (finished ones are skipped as duplicates)."""
        metrics.COMMIT_FAILURES.inc()
        log.warning(
            "partitions revoked while %s ran: not committed; their items will be read again",
            {tp: [r.offset for r in records] for tp, records in batch.items()},
        )

    async def _settle(
        self, batch: dict[TopicPartition, list[Record]], outcomes: dict[int, tuple[Outcome, float]]
    ) -> None:
        """Commit each partition past its done records; read the others again."""
        offsets = {}
        failed = False
        for tp, records in batch.items():
            done_to = records[-1].offset + 1
            for record in records:
                outcome, due = outcomes[id(record)]
                if outcome is Outcome.DONE:
                    continue
                done_to = record.offset
                self.consumer.seek(tp, record.offset)
                if outcome is Outcome.DEFERRED:
                    self.deferred[tp] = due
                failed |= outcome is Outcome.DEPENDENCY_FAILED
                break
            if done_to > records[0].offset:
                offsets[tp] = done_to
        await self._commit(offsets)
        if failed:
            self.dependency_failures += 1
            await self._stopped_within(self._backoff())
        else:
            self.dependency_failures = 0

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:  # e.g. revoked by a rebalance: redelivered items are skipped
            metrics.COMMIT_FAILURES.inc()
            log.warning("commit of %s failed (%r): those items will be read again", offsets, exc)

    def _backoff(self) -> float:
        return jittered(self.dependency_failures - 1, 1.0, self.settings.retry_backoff_max_s)

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

    def _flow_control(self, lags: dict[TopicPartition, int]) -> None:
        """Pause every topic below the highest-priority one with work to do now, and every
        partition whose next retry is not due yet."""
        assigned, now = self.consumer.assignment(), time.time()
        self.deferred = {tp: t for tp, t in self.deferred.items() if t > now and tp in assigned}
        waiting = [
            self.topics.rank(tp.topic)
            for tp, lag in lags.items()
            if lag > 0 and tp not in self.deferred
        ]
        best = min(waiting, default=len(self.topics.consumed))
        held = {tp for tp in assigned if self.topics.rank(tp.topic) > best} | set(self.deferred)
        self.consumer.pause(*held)
        self.consumer.resume(*(assigned - held))

    async def _shutdown(self) -> None:
        await self.consumer.stop()  # leaves the group: partitions move on at once
        await self.services.close()
        log.info("worker stopped")

    # ---- one item ---------------------------------------------------------------------------

    async def _outcome(self, record: Record) -> tuple[Outcome, float]:
        """handle(record), with the failures that mean "read it again" turned into outcomes."""
        try:
            return await self.handle(record)
        except (ModelError, UnknownContract) as exc:  # Triton away, loading, or never seen
            if self.model_ready:
                log.warning("the image model is unavailable (%s): pausing work", exc)
                metrics.WORKER_PAUSED.set(1)
            self.model_ready = False
            return Outcome.MODEL_AWAY, 0.0
        except DEPENDENCY_ERRORS as exc:
            log.warning("item at %s[%d]@%d: %r", record.topic, record.partition, record.offset, exc)
            return Outcome.DEPENDENCY_FAILED, 0.0

    async def handle(self, record: Record) -> tuple[Outcome, float]:
        """One item: skip if done, generate, store, record; retry or fail the item's own
        failures. Raises what means "read it again" (see `_outcome`)."""
        try:
            message = JobMessage.model_validate_json(record.value or b"")
        except ValidationError as exc:
            await self.dead_letter(record, "malformed", f"not a job item: {exc.errors()[:3]}")
            return Outcome.DONE, 0.0
        state = await self.jobs.item(message.job_id, message.index)
        if state is None:
            # A submission that was withdrawn (answered 503 after some of its items were
            # sent), or a job the sweeper failed and refunded long ago: nothing to do.
            metrics.JOBS.labels(record.topic, "orphaned").inc()
            log.info(
                "no job %s for %s[%d]@%d: skipped",
                message.job_id,
                record.topic,
                record.partition,
                record.offset,
            )
            return Outcome.DONE, 0.0
        if state["status"] in TERMINAL:
            await self.finished_before(record, message)
            return Outcome.DONE, 0.0
        if message.not_before > time.time():
            return Outcome.DEFERRED, message.not_before
        if message.attempt == 0:
            metrics.JOB_QUEUE_WAIT.labels(record.topic).observe(time.time() - message.submitted_at)
        await self.generate(record, message)
        return Outcome.DONE, 0.0

    async def generate(self, record: Record, message: JobMessage) -> None:
        """Make, store and record the item's image; its own failures retried or failed."""
        attempts = message.attempt + 1
        running = await self.jobs.set_item(
            message.job_id, message.index, "running", attempts=attempts
        )
        if running is not Written.WRITTEN:  # cancelled meanwhile, or the job expired
            await self.finished_before(record, message)
            return
        metrics.JOBS_IN_FLIGHT.inc()
        try:
            result = await self.make(message)
        except ModelRejected as exc:
            await self.fail(record, message, "invalid", exc.message)
            return
        except InputImageError as exc:  # its input image is gone: retrying cannot help
            await self.fail(record, message, "invalid", exc.detail)
            return
        except ImageFlagged:  # the same seed makes the same image: not retried
            texts = [message.spec.prompt, message.spec.negative_prompt]
            audit_refusal(message.api_key_id, "job", UNSAFE_IMAGE, texts)
            await self.fail(record, message, "invalid", "the model's safety check flagged it")
            return
        except ModelFailed as exc:  # the model failed on this item: it counts as an attempt
            await self.retry(record, message, f"the image model failed: {exc.message}")
            return
        except (ModelError, UnknownContract):  # the model is away: not this item's failure
            await self.jobs.set_item(
                message.job_id,
                message.index,
                "queued",
                attempts=message.attempt,
                error="waiting for the image model to be available",
            )
            raise
        finally:
            metrics.JOBS_IN_FLIGHT.dec()
        if result is None:  # cancelled while it ran
            await self.finished_before(record, message)
            return
        written = await self.jobs.set_item(
            message.job_id, message.index, "succeeded", attempts=attempts, result=result
        )
        if written in (Written.WRITTEN, Written.JOB_FINISHED):
            metrics.JOBS.labels(record.topic, "succeeded").inc()
            await self.send_results(message)

    async def make(self, message: JobMessage) -> ImageResult | None:
        """The item's image, from the cache or made with its progress recorded step by
        step; None if the item was cancelled meanwhile (the model's work stopped)."""
        spec, refuse_flagged = message.spec, message.content_policy == "strict"
        cached = await self.generator.cached(spec, refuse_flagged=refuse_flagged)
        if cached is not None:
            return cached
        generation = self.generator.generation(
            spec,
            source="job",
            preview_every=self.settings.job_preview_every,
            refuse_flagged=refuse_flagged,
        )
        async with contextlib.aclosing(generation) as events:
            async for event in events:
                if isinstance(event, ImageResult):
                    return event
                name, data = progress_event(event)
                if not await self.jobs.progress(message.job_id, message.index, name, data):
                    return None
        raise AssertionError("a generation ends with its result or an exception")

    async def finished_before(self, record: Record, message: JobMessage) -> None:
        """An item that finished elsewhere (a redelivered duplicate, or cancelled by its
        client): its results message sent if it was not yet."""
        state = await self.jobs.item(message.job_id, message.index)
        cancelled = state is not None and state["status"] == "cancelled"
        metrics.JOBS.labels(record.topic, "cancelled" if cancelled else "duplicate").inc()
        if not await self.jobs.sent(message.job_id, message.index):
            await self.send_results(message)

    async def send_results(self, message: JobMessage) -> None:
        """The finished item on the results topic, then its `sent` mark."""
        state = await self.jobs.item(message.job_id, message.index)
        if state is None:
            return
        await self.queue.send(
            self.topics.results, message.key, results_message(message, state).encode()
        )
        await self.jobs.mark_sent(message.job_id, message.index)

    async def retry(self, record: Record, message: JobMessage, reason: str) -> None:
        """Back on the tier's retry topic with backoff, or failed once the attempts are spent."""
        attempt = message.attempt + 1
        if attempt >= self.settings.max_attempts:
            await self.fail(
                record, message, "exhausted", f"gave up after {attempt} attempts: {reason}"
            )
            return
        backoff = jittered(
            message.attempt, self.settings.retry_backoff_s, self.settings.retry_backoff_max_s
        )
        again = message.model_copy(update={"attempt": attempt, "not_before": time.time() + backoff})
        await self.queue.send(
            self.topics.retry(message.tier), again.key, again.model_dump_json().encode()
        )
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

    async def fail(self, record: Record, message: JobMessage, reason: str, detail: str) -> None:
        """Fail the item for good: its state, its results message, the dead-letter topic, and
        the charge given back unless the item itself was invalid."""
        written = await self.jobs.set_item(
            message.job_id, message.index, "failed", attempts=message.attempt + 1, error=detail
        )
        if written in (Written.WRITTEN, Written.JOB_FINISHED):
            if reason != "invalid":
                await self.services.limiter.refund_item(self.services.keys, message)
            await self.send_results(message)
            await self.dead_letter(record, reason, detail)
            metrics.JOBS.labels(record.topic, "failed").inc()

    async def dead_letter(self, record: Record, reason: str, detail: str) -> None:
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


async def main() -> None:
    """Run one worker, with its probes and metrics, until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings()
    worker = Worker(settings)
    probes = asyncio.create_task(serve_probes(worker.readiness, settings))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    try:
        await worker.run()
    finally:
        probes.cancel()
        await asyncio.gather(probes, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
