"""The Kafka producer shared by the gateway (submissions) and workers (retries, results)."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from gateway.settings import Settings
from gateway.topics import ensure_topics

log = logging.getLogger(__name__)


class QueueUnavailable(Exception):
    """The broker did not take a message; the text names the error."""


class JobQueue:
    """Started on first use (the gateway serves sync requests while Kafka is away)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def producer(self) -> AIOKafkaProducer:
        """The started producer (started, and the topics made, on first use)."""
        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(
                    bootstrap_servers=self.settings.kafka_bootstrap,
                    acks="all",
                    enable_idempotence=self.settings.kafka_idempotence,
                    request_timeout_ms=10_000,
                    linger_ms=5,
                )
                try:
                    await producer.start()
                    await ensure_topics(self.settings)
                except BaseException:
                    await producer.stop()
                    raise
                self._producer = producer
            return self._producer

    async def send(self, topic: str, key: bytes, value: bytes) -> None:
        """Send and wait for the broker's acknowledgement (acks=all), or QueueUnavailable.

        A failed send is tried once more after making the topics again: a broker that
        restarted without its data has none.
        """
        for attempt in range(2):
            try:
                producer = await self.producer()
                if attempt:
                    await ensure_topics(self.settings)
                await producer.send_and_wait(topic, value=value, key=key)
                return
            except (KafkaError, OSError) as exc:
                log.warning("kafka send to %s failed (%r)", topic, exc)
                error = exc
        raise QueueUnavailable(type(error).__name__) from error

    async def ready(self) -> bool:
        """Whether the broker answers now (a metadata round trip), starting the producer."""
        producer = await self.producer()
        return bool(await producer.client.force_metadata_update())

    async def close(self) -> None:
        """Flush and stop the producer, if it was started."""
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
