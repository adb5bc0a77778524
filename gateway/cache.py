"""Result cache in Redis: the same model version and parameters, seed included, same asset."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

PREFIX = "forge:cache:"
log = logging.getLogger(__name__)


def cache_key(model_version: str, params: dict[str, Any]) -> str:
    """The Redis key of a result: a hash of the model version and the parameters."""
    canonical = json.dumps({"model_version": model_version, **params}, sort_keys=True)
    return PREFIX + hashlib.sha256(canonical.encode()).hexdigest()


class ResultCache:
    """Results by model version and parameters, with a TTL.

    An optimisation, never a dependency: while its Redis is away, a lookup is a miss and a
    store is skipped (logged), so generation goes on.
    """

    def __init__(self, redis: Redis, ttl_s: int) -> None:
        self.redis, self.ttl_s = redis, ttl_s

    async def get(self, model_version: str, params: dict[str, Any]) -> dict[str, Any] | None:
        """The stored result, or None (also when the cache is unavailable)."""
        try:
            raw = await self.redis.get(cache_key(model_version, params))
        except RedisError as exc:
            log.warning("result cache unavailable (%r): a miss", exc)
            return None
        return None if raw is None else dict(json.loads(raw))

    async def put(self, model_version: str, params: dict[str, Any], result: dict[str, Any]) -> None:
        """Remember a result for the cache TTL (skipped while the cache is unavailable)."""
        try:
            await self.redis.set(
                cache_key(model_version, params), json.dumps(result), ex=self.ttl_s
            )
        except RedisError as exc:
            log.warning("result cache unavailable (%r): not stored", exc)
