"""The composition root: every service a gateway process holds, built in one place.

The API (`gateway.app`) and the Kafka worker (`gateway.worker`) both call `open_services`,
so they talk to Redis, Triton, the asset store and the broker the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.assets import asset_store
from gateway.bodies import CurrentBodies
from gateway.cache import ResultCache
from gateway.callback_urls import CallbackRules
from gateway.content_policy import PolicyFile
from gateway.contract import ContractBook
from gateway.generation import Generator
from gateway.idempotency import Idempotency
from gateway.input_images import Limits
from gateway.jobs import JobStore
from gateway.keys import KeyStore
from gateway.queue import JobQueue
from gateway.ratelimit import RateLimiter
from gateway.settings import Settings
from gateway.triton_client import AsyncTriton
from gateway.weapons import WeaponTemplates


@dataclass
class Services:
    """What request handlers and the worker use; made by `open_services`."""

    settings: Settings
    redis: Redis
    triton: AsyncTriton
    contract: ContractBook
    callbacks: CallbackRules | None  # None: callbacks are off
    bodies: CurrentBodies
    keys: KeyStore
    limiter: RateLimiter
    idempotency: Idempotency
    generator: Generator
    weapons: WeaponTemplates
    policy: PolicyFile
    jobs: JobStore
    queue: JobQueue

    async def close(self) -> None:
        """Close the connections (the producer first: it may flush) and flush the assets."""
        await self.queue.close()
        await self.generator.assets.close()
        await self.triton.close()
        if self.generator.cache.redis is not self.redis:
            await self.generator.cache.redis.aclose()
        await self.redis.aclose()


def redis_client(url: str) -> Redis:
    """A Redis client that tries a command again, on a fresh connection, when its connection
    broke (Redis restarted or failed over): a pooled connection that went stale costs a
    retry, not a 503. Timeouts are not retried: the command may have run."""
    return Redis.from_url(
        url,
        socket_timeout=5,
        socket_connect_timeout=3,
        health_check_interval=30,
        retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[RedisConnectionError],
    )


def open_services(settings: Settings) -> Services:
    """Every service for `settings`.

    Nothing connects here: clients connect on first use, so a process starts while its
    dependencies are away and recovers when they come back.
    """
    redis = redis_client(settings.redis_url)
    cache_redis = redis_client(settings.cache_redis_url) if settings.cache_redis_url else redis
    triton = AsyncTriton(
        settings.triton_grpc_url, settings.triton_timeout_s, settings.stream_progress_interval_s
    )
    contract = ContractBook(triton, redis)
    weapons = WeaponTemplates.load(settings.weapon_templates)
    callbacks = CallbackRules.from_settings(settings) if settings.callbacks else None
    return Services(
        settings=settings,
        redis=redis,
        triton=triton,
        contract=contract,
        callbacks=callbacks,
        bodies=CurrentBodies(contract, weapons, settings.max_job_items, callbacks),
        keys=KeyStore(redis),
        limiter=RateLimiter(
            redis,
            settings.redis_url,
            settings.rate_limit,
            settings.rate_limit_by_tier,
            settings.retry_after_s,
        ),
        idempotency=Idempotency(
            redis, settings.idempotency_ttl_s, int(settings.triton_timeout_s) + 60
        ),
        generator=Generator(
            triton,
            contract,
            asset_store(settings),
            ResultCache(cache_redis, settings.cache_ttl_s),
            settings.public_base_url,
            Limits(settings.upload_max_bytes, settings.upload_max_pixels),
        ),
        weapons=weapons,
        policy=PolicyFile(settings.content_policy),
        jobs=JobStore(
            redis,
            settings.job_ttl_s,
            settings.topic_prefix,
            settings.job_events_max,
            settings.job_events_ttl_s,
        ),
        queue=JobQueue(settings),
    )
