"""API keys: stored hashed in Redis, checked in constant time, with scopes and a tier.

A key is shown once, when it is made. Redis keeps `sha256(key)` under the first 16 hex
digits of that hash (the key id), so a lookup needs no scan and a leaked Redis dump leaks
no usable key. Keys from a mounted file (a Kubernetes Secret) hold only the hash too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from redis.asyncio import Redis

SCOPES = frozenset({"generate", "admin"})
TIERS = ("priority", "standard", "bulk")
PREFIX = "forge:apikey:"


def digest(key: str) -> str:
    """SHA-256 of a key's secret, in hex: all Redis ever holds."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key_digest: str) -> str:
    """The id of a key: the first 16 hex digits of its digest."""
    return key_digest[:16]


@dataclass(frozen=True)
class ApiKey:
    """A key's record: who, what it may do, its queue tier, whether revoked."""

    id: str
    name: str
    sha256: str
    scopes: tuple[str, ...] = ("generate",)
    tier: str = "standard"
    revoked: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.scopes) - SCOPES
        if unknown:
            raise ValueError(f"unknown scopes {sorted(unknown)}; known: {sorted(SCOPES)}")
        if self.tier not in TIERS:
            raise ValueError(f"unknown tier {self.tier!r}; known: {', '.join(TIERS)}")

    def public(self) -> dict[str, object]:
        """The record without its hash, as the admin API shows it."""
        return {k: v for k, v in asdict(self).items() if k != "sha256"}


@dataclass
class KeyStore:
    """API keys in Redis, by id."""

    redis: Redis
    _cache: dict[str, ApiKey] = field(default_factory=dict)

    async def save(self, key: ApiKey) -> None:
        """Write a key's record."""
        await self.redis.set(PREFIX + key.id, json.dumps(asdict(key)))

    async def create(
        self,
        name: str,
        scopes: tuple[str, ...] = ("generate",),
        tier: str = "standard",
        secret: str | None = None,
    ) -> tuple[str, ApiKey]:
        """A new key (or one with the given secret value): the secret and its record."""
        secret = secret or f"fk_{secrets.token_urlsafe(32)}"
        h = digest(secret)
        record = ApiKey(id=key_id(h), name=name, sha256=h, scopes=tuple(scopes), tier=tier)
        await self.save(record)
        return secret, record

    async def get(self, id_: str) -> ApiKey | None:
        """The record of a key id, or None."""
        raw = await self.redis.get(PREFIX + id_)
        if raw is None:
            return None
        data = json.loads(raw)
        data["scopes"] = tuple(data["scopes"])
        return ApiKey(**data)

    async def authenticate(self, secret: str) -> ApiKey | None:
        """The live key for this secret, or None (unknown or revoked)."""
        h = digest(secret)
        record = await self.get(key_id(h))
        if record is None or not hmac.compare_digest(record.sha256, h) or record.revoked:
            return None
        return record

    async def revoke(self, id_: str) -> bool:
        """Mark a key revoked; False if there is no such key."""
        record = await self.get(id_)
        if record is None:
            return False
        await self.save(ApiKey(**{**asdict(record), "revoked": True}))
        return True

    async def list(self) -> list[ApiKey]:
        """Every key, by name."""
        keys = []
        async for name in self.redis.scan_iter(match=PREFIX + "*"):
            record = await self.get(name.decode().removeprefix(PREFIX))
            if record is not None:
                keys.append(record)
        return sorted(keys, key=lambda k: k.name)

    async def load_file(self, path: Path) -> int:
        """Keys from YAML: a list of {name, sha256, scopes, tier}; returns how many."""
        entries = yaml.safe_load(path.read_text()) or []
        for entry in entries:
            h = entry["sha256"]
            await self.save(
                ApiKey(
                    id=key_id(h),
                    name=entry["name"],
                    sha256=h,
                    scopes=tuple(entry.get("scopes", ["generate"])),
                    tier=entry.get("tier", "standard"),
                )
            )
        return len(entries)
