"""Content-addressed image files: a directory (a gp3 volume in Kubernetes) or S3.

The key is the SHA-256 of the bytes plus the format's extension, so the same image is stored
once, a key names exactly one content forever (immutable caching is safe), and the ETag is
the hash. Writes are atomic: a reader sees a whole file or none.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import Any, Protocol

from gateway.settings import Settings

KEY = re.compile(r"^(?P<sha>[0-9a-f]{64})\.(?P<ext>png|webp)$")
MEDIA_TYPES = {"png": "image/png", "webp": "image/webp"}


class InvalidKey(ValueError):
    """A string that is not an asset key (so never a path)."""

    pass


def make_key(data: bytes, fmt: str) -> str:
    """The content key of `data`: its SHA-256 and the format's extension."""
    return f"{hashlib.sha256(data).hexdigest()}.{fmt}"


def parse_key(key: str) -> tuple[str, str]:
    """(sha256, extension), or InvalidKey for anything that is not a key (no path escapes)."""
    match = KEY.match(key)
    if match is None:
        raise InvalidKey(f"{key!r} is not an asset key")
    return match["sha"], match["ext"]


class AssetStore(Protocol):
    """Where images live: put returns the content key; get and exists take it."""

    async def put(self, data: bytes, fmt: str) -> str:
        """Store `data` (once) and return its key."""

    async def get(self, key: str) -> bytes | None:
        """The bytes under `key`, or None."""

    async def exists(self, key: str) -> bool:
        """Whether `key` is stored."""


class DirectoryStore:
    """Assets as files under a directory, fanned out by the key's first two hex digits."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The file of `key` (InvalidKey for anything else)."""
        sha, _ = parse_key(key)
        return self.root / sha[:2] / key

    def _write(self, key: str, data: bytes) -> None:
        target = self.path(key)
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = target.parent / f".{key}.{uuid.uuid4().hex}.tmp"
        with scratch.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(scratch, target)

    async def put(self, data: bytes, fmt: str) -> str:
        """Write the file atomically, once; return its key."""
        key = make_key(data, fmt)
        await asyncio.to_thread(self._write, key, data)
        return key

    async def get(self, key: str) -> bytes | None:
        """The file's bytes, or None."""
        path = self.path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None

    async def exists(self, key: str) -> bool:
        """Whether the file exists."""
        return self.path(key).is_file()


class S3Store:
    """Any S3-compatible service (AWS S3, MinIO); PUT is atomic there by design."""

    def __init__(self, bucket: str, prefix: str = "", endpoint: str | None = None) -> None:
        import boto3

        self.client: Any = boto3.client("s3", endpoint_url=endpoint)
        self.bucket, self.prefix = bucket, prefix

    def _name(self, key: str) -> str:
        parse_key(key)
        return self.prefix + key

    async def put(self, data: bytes, fmt: str) -> str:
        """PUT the object with immutable caching headers; return its key."""
        key = make_key(data, fmt)
        await asyncio.to_thread(
            self.client.put_object,
            Bucket=self.bucket,
            Key=self._name(key),
            Body=data,
            ContentType=MEDIA_TYPES[fmt],
            CacheControl="public, max-age=31536000, immutable",
        )
        return key

    async def get(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is no such key."""
        try:
            reply = await asyncio.to_thread(
                self.client.get_object, Bucket=self.bucket, Key=self._name(key)
            )
        except self.client.exceptions.NoSuchKey:
            return None
        return bytes(await asyncio.to_thread(reply["Body"].read))

    async def exists(self, key: str) -> bool:
        """Whether HEAD finds the object."""
        try:
            await asyncio.to_thread(
                self.client.head_object, Bucket=self.bucket, Key=self._name(key)
            )
        except self.client.exceptions.ClientError:
            return False
        return True


def asset_store(settings: Settings) -> AssetStore:
    """S3 when a bucket is set, else the directory (a volume in Kubernetes)."""
    if settings.asset_s3_bucket:
        return S3Store(
            settings.asset_s3_bucket, settings.asset_s3_prefix, settings.asset_s3_endpoint
        )
    return DirectoryStore(settings.asset_dir)
