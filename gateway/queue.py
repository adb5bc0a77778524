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
        """Send and wait for the broker's acknowledgement (acks=all), or QueueUnavailable."""
        try:
            producer = await self.producer()
            await producer.send_and_wait(topic, value=value, key=key)
        except (KafkaError, OSError) as exc:
            log.warning("kafka send to %s failed: %r", topic, exc)
            raise QueueUnavailable(type(exc).__name__) from exc

    async def close(self) -> None:
        """Flush and stop the producer, if it was started."""
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
