"""Idempotency-Key for POST (IETF draft-ietf-httpapi-idempotency-key-header).

Scoped to the API key. The first request with a key claims it (SET NX) with the request's
fingerprint; a repeat with the same body gets the stored result without a second generation,
one with another body gets 422, one while the first is still running gets 409. A failed
request releases its key so that the client can retry. A job submission records its result
in the same Redis transaction that records the job (`Claim.record`), so a key never stays
claimed for a job that exists.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pydantic import BaseModel
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from gateway.problems import Problem
from gateway.schemas import ImageSpec

PREFIX = "forge:idem:"
VALID_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def fingerprint(path: str, body: dict[str, Any]) -> str:
    """A hash of the route and the validated body: what a replay must match."""
    return hashlib.sha256(json.dumps([path, body], sort_keys=True).encode()).hexdigest()


def claimed(body: BaseModel, specs: list[ImageSpec]) -> dict[str, Any]:
    """What a replay must match: the validated body and, where its images name studio
    styles, their content versions (a style republished under its name is another request)."""
    data = body.model_dump(mode="json")
    versions = [spec.style_version for spec in specs]
    return data | {"style_versions": versions} if any(versions) else data


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
                "this Idempotency-Key was used with a different request (its body, or the "
                "content version of a style it names)",
            )
        if stored["state"] == "in_flight":
            raise Problem(
                409,
                "Conflict",
                "a request with this Idempotency-Key is in progress",
                headers={"Retry-After": "1"},
            )
        return dict(stored["result"])

    def record(
        self, pipe: Redis | Pipeline, api_key_id: str, key: str, print_: str, result: dict[str, Any]
    ) -> Any:
        """Store the result under the key, for replays until the TTL (on `pipe`: in its step)."""
        value = json.dumps({"fingerprint": print_, "state": "done", "result": result})
        return pipe.set(self._name(api_key_id, key), value, ex=self.ttl_s)

    def forget(self, pipe: Redis | Pipeline, api_key_id: str, key: str) -> Any:
        """Give the key up after a failure, so that the client can retry."""
        return pipe.delete(self._name(api_key_id, key))

    def claim(self, api_key_id: str, key: str | None, path: str, body: dict[str, Any]) -> Claim:
        """The hold of one request (route `path`, validated `body`) on its key, if it has one."""
        return Claim(self, api_key_id, key, fingerprint(path, body))


class Claim:
    """One request's hold on its Idempotency-Key; every method is a no-op without a key."""

    def __init__(self, store: Idempotency, api_key_id: str, key: str | None, print_: str) -> None:
        self.store, self.api_key_id, self.key, self.print_ = store, api_key_id, key, print_

    async def begin(self) -> dict[str, Any] | None:
        """The stored result of the same request made before, or None (go ahead)."""
        if self.key is None:
            return None
        return await self.store.begin(self.api_key_id, self.key, self.print_)

    async def complete(self, result: dict[str, Any]) -> None:
        """Keep `result` for replays."""
        if self.key is not None:
            await self.store.record(
                self.store.redis, self.api_key_id, self.key, self.print_, result
            )

    def record(self, pipe: Pipeline, result: dict[str, Any]) -> None:
        """Keep `result` for replays, as part of the transaction `pipe`."""
        if self.key is not None:
            self.store.record(pipe, self.api_key_id, self.key, self.print_, result)

    async def release(self) -> None:
        """The request failed: the client may retry with the same key."""
        if self.key is not None:
            await self.store.forget(self.store.redis, self.api_key_id, self.key)

    def forget(self, pipe: Pipeline) -> None:
        """The request failed: release the key as part of the transaction `pipe`."""
        if self.key is not None:
            self.store.forget(pipe, self.api_key_id, self.key)
