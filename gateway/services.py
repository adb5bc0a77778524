"""The composition root: every service a gateway process holds, built in one place.

The API (`gateway.app`) and the Kafka worker (`gateway.worker`) both call `open_services`,
so they talk to Redis, Triton, the asset store and the broker the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from gateway.assets import asset_store
from gateway.bodies import CurrentBodies
from gateway.cache import ResultCache
from gateway.contract import ContractBook
from gateway.generation import Generator
from gateway.idempotency import Idempotency
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
    bodies: CurrentBodies
    keys: KeyStore
    limiter: RateLimiter
    idempotency: Idempotency
    generator: Generator
    weapons: WeaponTemplates
    jobs: JobStore
    queue: JobQueue

    async def close(self) -> None:
        """Close the connections (the producer first: it may flush)."""
        await self.queue.close()
        await self.triton.close()
        await self.redis.aclose()


def open_services(settings: Settings) -> Services:
    """Every service for `settings`.

    Nothing connects here: clients connect on first use, so a process starts while its
    dependencies are away and recovers when they come back.
    """
    redis = Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=3)
    triton = AsyncTriton(settings.triton_grpc_url, settings.triton_timeout_s)
    contract = ContractBook(triton, redis)
    weapons = WeaponTemplates.load(settings.weapon_templates)
    return Services(
        settings=settings,
        redis=redis,
        triton=triton,
        contract=contract,
        bodies=CurrentBodies(contract, weapons, settings.max_job_items),
        keys=KeyStore(redis),
        limiter=RateLimiter(
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
            ResultCache(redis, settings.cache_ttl_s),
            settings.public_base_url,
        ),
        weapons=weapons,
        jobs=JobStore(redis, settings.job_ttl_s),
        queue=JobQueue(settings),
    )
