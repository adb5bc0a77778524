"""Idempotency-Key for POST (IETF draft-ietf-httpapi-idempotency-key-header).

Scoped to the API key. The first request with a key claims it (SET NX) with the request's
fingerprint; a repeat with the same body gets the stored result without a second generation,
one with another body gets 422, one while the first is still running gets 409. A failed
request releases its key so that the client can retry.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from redis.asyncio import Redis

from gateway.problems import Problem

PREFIX = "forge:idem:"
VALID_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def fingerprint(path: str, body: dict[str, Any]) -> str:
    """A hash of the route and the validated body: what a replay must match."""
    return hashlib.sha256(json.dumps([path, body], sort_keys=True).encode()).hexdigest()


class Idempotency:
    """Idempotency-Key records in Redis, per API key."""

    def __init__(self, redis: Redis, ttl_s: int, in_flight_ttl_s: int) -> None:
        self.redis, self.ttl_s, self.in_flight_ttl_s = redis, ttl_s, in_flight_ttl_s

    @staticmethod
    def _name(api_key_id: str, key: str) -> str:
        if not VALID_KEY.match(key):
            raise Problem(
                400, "Bad Request", "Idempotency-Key must be 1 to 255 printable ASCII characters"
            )
        return f"{PREFIX}{api_key_id}:{key}"

    async def begin(self, api_key_id: str, key: str, print_: str) -> dict[str, Any] | None:
        """None if this request now owns the key; the stored result if it already ran."""
        name = self._name(api_key_id, key)
        claim = json.dumps({"fingerprint": print_, "state": "in_flight"})
        if await self.redis.set(name, claim, nx=True, ex=self.in_flight_ttl_s):
            return None
        raw = await self.redis.get(name)
        if raw is None:  # expired between the two calls: claim it again
            return await self.begin(api_key_id, key, print_)
        stored = json.loads(raw)
        if stored["fingerprint"] != print_:
            raise Problem(
                422,
                "Idempotency-Key reused",
                "this Idempotency-Key was used with a different request body",
            )
        if stored["state"] == "in_flight":
            raise Problem(
                409,
                "Conflict",
                "a request with this Idempotency-Key is in progress",
                headers={"Retry-After": "1"},
            )
        return dict(stored["result"])

    async def complete(
        self, api_key_id: str, key: str, print_: str, result: dict[str, Any]
    ) -> None:
        """Store the result under the key, for replays until the TTL."""
        value = json.dumps({"fingerprint": print_, "state": "done", "result": result})
        await self.redis.set(self._name(api_key_id, key), value, ex=self.ttl_s)

    async def release(self, api_key_id: str, key: str) -> None:
        """Give the key up after a failure, so that the client can retry."""
        await self.redis.delete(self._name(api_key_id, key))
