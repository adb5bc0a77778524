"""API keys: stored hashed in Redis, checked in constant time, with scopes, a tier, an optional
expiry, and a webhook secret of their own.

A key is shown once, when it is made. Redis keeps `sha256(key)` under the first 16 hex
digits of that hash (the key id), so a lookup needs no scan and a leaked Redis dump leaks
no usable key. Keys from a mounted file (a Kubernetes Secret) hold only the hash too.

Each key has its own webhook secret (Standard Webhooks, `whsec_...`), made with the key and
shown once, which signs the callbacks of its jobs: one studio cannot forge another's. A
rotation makes a new secret and keeps the previous one valid for a while (both sign every
callback meanwhile, as Standard Webhooks allows), so receivers switch without a gap.
Webhook secrets must be readable to sign, so Redis holds them as they are: it requires a
password, and the admin API never shows them again.

A revoked key stays revoked: loading the keys file never undoes a revocation, and a key
that came from the file and is no longer in it is revoked at the next load.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from redis.asyncio import Redis

from gateway.content_policy import MODES, Mode

SCOPES = frozenset({"generate", "admin"})
TIERS = ("priority", "standard", "bulk")
PREFIX = "forge:apikey:"
USED = "forge:apikey-used:"  # last use, a key of its own (written at most once a minute)
USED_EVERY_S = 60.0
Source = Literal["api", "file", "dev"]


def digest(key: str) -> str:
    """SHA-256 of a key's secret, in hex: all Redis ever holds."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key_digest: str) -> str:
    """The id of a key: the first 16 hex digits of its digest."""
    return key_digest[:16]


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class KeysFileError(Exception):
    """The keys file cannot be read or is not a list of keys; the message says which."""


@dataclass(frozen=True)
class ApiKey:
    """A key's record: who, what it may do, its queue tier, whether revoked, its secrets."""

    id: str
    name: str
    sha256: str
    scopes: tuple[str, ...] = ("generate",)
    tier: str = "standard"
    revoked: bool = False
    source: Source = "api"
    created_at: float = 0.0
    expires_at: float | None = None
    webhook_secrets: tuple[str, ...] = ()  # the current one first, then the previous one
    previous_secret_until: float | None = None
    content_policy: Mode = "strict"  # what a match of the content policy does

    def __post_init__(self) -> None:
        unknown = set(self.scopes) - SCOPES
        if unknown:
            raise ValueError(f"unknown scopes {sorted(unknown)}; known: {sorted(SCOPES)}")
        if self.tier not in TIERS:
            raise ValueError(f"unknown tier {self.tier!r}; known: {', '.join(TIERS)}")
        if self.content_policy not in MODES:
            raise ValueError(
                f"unknown content policy mode {self.content_policy!r}; known: {', '.join(MODES)}"
            )

    def expired(self, now: float) -> bool:
        """Whether the key is past its expiry."""
        return self.expires_at is not None and now >= self.expires_at

    def signing_secrets(self, now: float) -> list[str]:
        """The secrets that sign its callbacks now: the current one, and the previous one
        until its rotation window closes."""
        current, *previous = self.webhook_secrets or ("",)
        keep = self.previous_secret_until is not None and now < self.previous_secret_until
        return [s for s in [current, *(previous if keep else [])] if s]

    def public(self) -> dict[str, object]:
        """The record without its hash or secrets, as the admin API shows it."""
        hidden = {"sha256", "webhook_secrets"}
        return {k: v for k, v in asdict(self).items() if k not in hidden}

    def dump(self) -> str:
        """The record as stored."""
        return json.dumps(asdict(self))

    @classmethod
    def load(cls, raw: bytes | str) -> ApiKey:
        """A stored record."""
        data = json.loads(raw)
        data["scopes"] = tuple(data["scopes"])
        data["webhook_secrets"] = tuple(data.get("webhook_secrets", ()))
        return cls(**data)


@dataclass
class KeyStore:
    """API keys in Redis, by id."""

    redis: Redis
    problem: str | None = "not loaded yet"  # why the configured keys are not in place, if so
    _used_written: dict[str, float] = field(default_factory=dict)

    async def save(self, key: ApiKey) -> None:
        """Write a key's record."""
        await self.redis.set(PREFIX + key.id, key.dump())

    async def create(
        self,
        name: str,
        scopes: tuple[str, ...] = ("generate",),
        tier: str = "standard",
        *,
        expires_at: float | None = None,
        content_policy: Mode = "strict",
    ) -> tuple[str, ApiKey]:
        """A new key with a new webhook secret: the key's secret and its record."""
        secret = f"fk_{secrets.token_urlsafe(32)}"
        h = digest(secret)
        record = ApiKey(
            id=key_id(h),
            name=name,
            sha256=h,
            scopes=tuple(scopes),
            tier=tier,
            created_at=time.time(),
            expires_at=expires_at,
            webhook_secrets=(new_webhook_secret(),),
            content_policy=content_policy,
        )
        await self.save(record)
        return secret, record

    async def ensure(self, record: ApiKey) -> ApiKey:
        """Store a key that comes from configuration (the dev key, the keys file), keeping
        what Redis knows of it already: its revocation, its creation time, its secrets."""
        stored = await self.get(record.id)
        if stored is not None:
            record = replace(
                record,
                revoked=stored.revoked or record.revoked,
                created_at=stored.created_at,
                webhook_secrets=record.webhook_secrets or stored.webhook_secrets,
                previous_secret_until=stored.previous_secret_until,
            )
        elif not record.webhook_secrets:
            record = replace(record, webhook_secrets=(new_webhook_secret(),))
        await self.save(record)
        return record

    async def get(self, id_: str) -> ApiKey | None:
        """The record of a key id, or None."""
        raw = await self.redis.get(PREFIX + id_)
        return None if raw is None else ApiKey.load(raw)

    async def authenticate(self, secret: str) -> tuple[ApiKey | None, str]:
        """The live key for this secret, or None and why not ("unknown", "revoked",
        "expired")."""
        h = digest(secret)
        record = await self.get(key_id(h))
        if record is None or not hmac.compare_digest(record.sha256, h):
            return None, "unknown"
        now = time.time()
        if record.revoked:
            return None, "revoked"
        if record.expired(now):
            return None, "expired"
        if now - self._used_written.get(record.id, 0.0) > USED_EVERY_S:
            self._used_written[record.id] = now
            await self.redis.set(USED + record.id, now)
        return record, ""

    async def revoke(self, id_: str) -> bool:
        """Mark a key revoked; False if there is no such key."""
        record = await self.get(id_)
        if record is None:
            return False
        await self.save(replace(record, revoked=True))
        return True

    async def rotate_webhook_secret(self, id_: str, keep_previous_s: float) -> str | None:
        """A new webhook secret for the key (None: no such key); the current one keeps
        signing, beside the new one, for `keep_previous_s` seconds."""
        record = await self.get(id_)
        if record is None:
            return None
        secret = new_webhook_secret()
        await self.save(
            replace(
                record,
                webhook_secrets=(secret, *record.webhook_secrets[:1]),
                previous_secret_until=time.time() + keep_previous_s,
            )
        )
        return secret

    async def list(self) -> list[dict[str, object]]:
        """Every key's public record with its last use, by name."""
        found = []
        async for name in self.redis.scan_iter(match=PREFIX + "*"):
            record = await self.get(name.decode().removeprefix(PREFIX))
            if record is not None:
                used = await self.redis.get(USED + record.id)
                found.append({**record.public(), "last_used_at": float(used) if used else None})
        return sorted(found, key=lambda k: str(k["name"]))

    async def load_file(self, path: Path) -> int:
        """Sync the keys of a YAML file (a list of {name, sha256, scopes, tier, expires_at,
        webhook_secret, content_policy}): add and update them, keep revocations, and revoke
        the keys that came from the file and are no longer in it. How many the file holds."""
        try:
            entries = yaml.safe_load(path.read_text()) or []
            records = [file_key(entry) for entry in entries]
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
            raise KeysFileError(f"cannot load the API keys file {path}: {exc!r}") from exc
        for record in records:
            await self.ensure(record)
        listed = {record.id for record in records}
        async for name in self.redis.scan_iter(match=PREFIX + "*"):
            stored = await self.get(name.decode().removeprefix(PREFIX))
            if (
                stored
                and stored.source == "file"
                and stored.id not in listed
                and not stored.revoked
            ):
                await self.save(replace(stored, revoked=True))
        return len(records)


def file_key(entry: dict[str, Any]) -> ApiKey:
    """The record of one keys-file entry (KeyError or ValueError if malformed)."""
    h = str(entry["sha256"])
    secret = entry.get("webhook_secret")
    return ApiKey(
        id=key_id(h),
        name=str(entry["name"]),
        sha256=h,
        scopes=tuple(entry.get("scopes", ["generate"])),
        tier=entry.get("tier", "standard"),
        source="file",
        created_at=time.time(),
        expires_at=entry.get("expires_at"),
        webhook_secrets=(str(secret),) if secret else (),
        content_policy=entry.get("content_policy", "strict"),
    )


def dev_key(secret: str, webhook_secret: str | None, content_policy: Mode) -> ApiKey:
    """The development key of `FORGE_DEV_API_KEY` (every scope)."""
    h = digest(secret)
    return ApiKey(
        id=key_id(h),
        name="dev",
        sha256=h,
        scopes=("generate", "admin"),
        source="dev",
        created_at=time.time(),
        webhook_secrets=(webhook_secret,) if webhook_secret else (),
        content_policy=content_policy,
    )
