"""Per-key rate limits in Redis, charged by cost, atomic under concurrency (`limits`).

One unit of cost is one guided denoising step at 512x512 (two UNet passes); an unguided
step (guidance_scale at or below the contract's `unguided_at_most`: one pass) is half a unit.
A request costs steps x passes x pixels / (2 x 512^2), rounded up, at least 1 (for
image-to-image, the steps it runs: int(steps x strength)); an input image's upload, 1. The
sliding-window counter runs as one Lua script in Redis, so N parallel requests against a
limit of K units let exactly K units through. If Redis is unreachable, generation fails
closed: 503 with Retry-After, never unlimited.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.asyncio import Redis

from gateway import metrics
from gateway.contract import GenerationContract
from gateway.jobs import JobMessage
from gateway.keys import KeyStore
from gateway.problems import Problem, unavailable
from gateway.schemas import ImageSpec

UNIT_PIXELS = 512 * 512
log = logging.getLogger(__name__)


def cost(spec: ImageSpec, contract: GenerationContract) -> int:
    """The units one image costs: its UNet passes and pixels, as the module docstring says."""
    passes = 1 if spec.guidance_scale <= contract.unguided_at_most else 2
    pixels = spec.width * spec.height
    return max(1, math.ceil(denoising_steps(spec) * passes * pixels / (2 * UNIT_PIXELS)))


def denoising_steps(spec: ImageSpec) -> int:
    """The steps the model runs: image-to-image starts part of the way, as diffusers does,
    and runs int(steps x strength) of them."""
    if spec.strength is None:
        return spec.steps
    return max(1, min(int(spec.steps * spec.strength), spec.steps))


@dataclass(frozen=True)
class Charge:
    """What a request took from its key's window, as RateLimit headers report it."""

    limit: int
    remaining: int
    reset_s: int
    window_s: int

    def headers(self) -> dict[str, str]:
        """IETF draft RateLimit header fields."""
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
            "RateLimit-Policy": f"{self.limit};w={self.window_s}",
        }


class RateLimiter:
    """Sliding-window limits per API key, in cost units, by the key's tier."""

    def __init__(
        self,
        redis: Redis,
        redis_url: str,
        default: str,
        by_tier: dict[str, str],
        retry_after_s: int,
    ) -> None:
        # The storage uses `redis`'s connections (and so its retries); the URL names the kind.
        # `connection_pool` is a documented option that the options' annotation leaves out.
        self.storage = RedisStorage(
            "async+" + redis_url,
            implementation="redispy",
            wrap_exceptions=True,
            key_prefix="forge:ratelimit",
            connection_pool=redis.connection_pool,  # type: ignore[arg-type]
        )
        self.limiter = SlidingWindowCounterRateLimiter(self.storage)
        self.default = parse(default)
        self.by_tier = {tier: parse(rule) for tier, rule in by_tier.items()}
        self.retry_after_s = retry_after_s

    def item(self, tier: str) -> RateLimitItem:
        """The limit of a tier (the default limit for a tier without its own)."""
        return self.by_tier.get(tier, self.default)

    async def refund(self, key_id: str, tier: str, units: int) -> None:
        """Give back `units` for work that failed on the server's side (best effort: a
        refund lost while Redis is away only leaves the charge in place)."""
        try:
            await self.limiter.hit(self.item(tier), key_id, cost=-units)
        except Exception as exc:  # limits wraps every storage error in StorageError
            log.warning("rate-limit refund of %d units for %s lost (%r)", units, key_id, exc)

    async def refund_item(self, keys: KeyStore, message: JobMessage) -> None:
        """Give a job item's charge back to the key that submitted it."""
        owner = await keys.get(message.api_key_id)
        if owner is not None and message.units:
            await self.refund(owner.id, owner.tier, message.units)

    async def charge(self, key_id: str, tier: str, units: int) -> Charge:
        """Take `units` from the key's window, or raise 429 (over) or 503 (Redis down)."""
        item = self.item(tier)
        try:
            allowed = await self.limiter.hit(item, key_id, cost=units)
            stats = await self.limiter.get_window_stats(item, key_id)
        except Exception as exc:  # limits wraps every storage error in StorageError
            raise unavailable(
                f"rate limiting is unavailable ({type(exc).__name__})", self.retry_after_s
            ) from exc
        reset_s = max(1, math.ceil(stats.reset_time - time.time()))
        charge = Charge(item.amount, stats.remaining, reset_s, item.get_expiry())
        if not allowed:
            metrics.RATE_LIMITED.labels(tier).inc()
            raise Problem(
                429,
                "Too Many Requests",
                f"this request costs {units} units; {stats.remaining} of {item.amount} are "
                f"left in the window of {item.get_expiry()} s",
                headers={"Retry-After": str(reset_s), **charge.headers()},
            )
        return charge
