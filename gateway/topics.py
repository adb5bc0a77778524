"""Kafka topic names (one source of truth) and their creation at start-up."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from gateway.settings import Settings

log = logging.getLogger(__name__)

TIERS = ("priority", "standard", "bulk")  # highest first


@dataclass(frozen=True)
class Topics:
    """The Kafka topic names under one prefix."""

    prefix: str

    def requests(self, tier: str) -> str:
        """The request topic of a tier."""
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}")
        return f"{self.prefix}{tier}"

    def retry(self, tier: str) -> str:
        """Items of a tier waiting for another attempt (read right after the tier's requests,
        so a priority item's retry never waits behind a bulk backlog)."""
        return f"{self.requests(tier)}.retry"

    @property
    def results(self) -> str:
        """One message per finished item."""
        return f"{self.prefix}results"

    @property
    def dead_letter(self) -> str:
        """Items that failed for good, with why."""
        return f"{self.prefix}dead-letter"

    @property
    def consumed(self) -> list[str]:
        """What workers read, highest priority first: each tier's requests, then its retries."""
        return [topic for t in TIERS for topic in (self.requests(t), self.retry(t))]

    @property
    def all(self) -> list[str]:
        """Every topic the forge uses."""
        return [*self.consumed, self.results, self.dead_letter]

    def rank(self, topic: str) -> int:
        """A consumed topic's priority (0 first); past the last for others."""
        return self.consumed.index(topic) if topic in self.consumed else len(self.consumed)


async def ensure_topics(settings: Settings) -> None:
    """Create every topic that is missing, with the configured partitions and replication."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in Topics(settings.topic_prefix).all if t not in existing]
        if missing:
            new = [
                NewTopic(t, settings.topic_partitions, settings.topic_replication) for t in missing
            ]
            with contextlib.suppress(TopicAlreadyExistsError):  # another process was first
                await admin.create_topics(new)
            log.info("created topics %s", missing)
    finally:
        await admin.close()
