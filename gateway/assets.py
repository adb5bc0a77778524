"""Content-addressed image files: a directory (a gp3 volume in Kubernetes) or S3.

The key is the SHA-256 of the bytes plus the format's extension, so the same image is stored
once, a key names exactly one content forever (immutable caching is safe), and the ETag is
the hash. Writes are atomic: a reader sees a whole file or none.

The directory store makes writes durable off the request's path: a file is written and
renamed into place (visible at once), and a flusher thread fsyncs new files and their
folders right after, in batches. A crash before that can lose or truncate a file; readers
compare every file with its key (the content's hash) and treat a mismatch as missing, so an
image is made again rather than served broken.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import queue
import re
import threading
import uuid
from pathlib import Path
from typing import Any, Protocol

from gateway.settings import Settings

log = logging.getLogger(__name__)

KEY = re.compile(r"^([0-9a-f]{64})\.(png|webp)$")  # no named groups: OpenAPI states it
MEDIA_TYPES = {"png": "image/png", "webp": "image/webp"}


class InvalidKey(ValueError):
    """A string that is not an asset key (so never a path)."""


class StoreUnavailable(Exception):
    """The store did not answer or failed (not: the asset is missing); try again later."""


def make_key(data: bytes, fmt: str) -> str:
    """The content key of `data`: its SHA-256 and the format's extension."""
    return f"{hashlib.sha256(data).hexdigest()}.{fmt}"


def parse_key(key: str) -> tuple[str, str]:
    """(sha256, extension), or InvalidKey for anything that is not a key (no path escapes)."""
    match = KEY.match(key)
    if match is None:
        raise InvalidKey(f"{key!r} is not an asset key")
    return match[1], match[2]


class AssetStore(Protocol):
    """Where images live: put returns the content key; get and exists take it."""

    async def put(self, data: bytes, fmt: str) -> str:
        """Store `data` (once) and return its key."""

    async def get(self, key: str) -> bytes | None:
        """The bytes under `key`, or None."""

    async def exists(self, key: str) -> bool:
        """Whether `key` is stored."""

    async def close(self) -> None:
        """Make every write so far durable and release the store."""


class Flusher:
    """fsyncs files and their folders on a thread of its own, in batches, in write order."""

    def __init__(self) -> None:
        self._pending: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, path: Path) -> None:
        """Make `path` (and its folder entry) durable soon."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="asset-fsync", daemon=True)
                self._thread.start()
        self._pending.put(path)

    def close(self) -> None:
        """Flush what is pending and stop the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._pending.put(None)
            thread.join()

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._pending.get()]
            while not self._pending.empty():
                batch.append(self._pending.get())
            stop = None in batch
            paths = [p for p in batch if p is not None]
            for target in [*paths, *{p.parent for p in paths}]:
                try:
                    fd = os.open(target, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                except OSError as exc:  # a full or failing disk: say so, keep the server up
                    log.error("cannot make %s durable: %r", target, exc)


class DirectoryStore:
    """Assets as files under a directory, fanned out by the key's first two hex digits."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.flusher = Flusher()

    def path(self, key: str) -> Path:
        """The file of `key` (InvalidKey for anything else)."""
        sha, _ = parse_key(key)
        return self.root / sha[:2] / key

    def _read(self, key: str) -> bytes | None:
        """The file's bytes if they are the content the key names; a damaged file is removed."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() != parse_key(key)[0]:
            log.warning("asset %s does not match its key (a write lost in a crash?): removed", key)
            path.unlink(missing_ok=True)
            return None
        return data

    def _write(self, key: str, data: bytes) -> None:
        target = self.path(key)
        if self._read(key) is not None:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = target.parent / f".{key}.{uuid.uuid4().hex}.tmp"
        scratch.write_bytes(data)
        os.replace(scratch, target)
        self.flusher.add(target)

    async def put(self, data: bytes, fmt: str) -> str:
        """Write the file atomically, once (durable shortly after); return its key."""
        key = make_key(data, fmt)
        try:
            await asyncio.to_thread(self._write, key, data)
        except OSError as exc:  # a full or failing volume
            raise StoreUnavailable(f"cannot write {key}: {exc}") from exc
        return key

    async def get(self, key: str) -> bytes | None:
        """The file's bytes, or None (no file, or one that does not match its key)."""
        return await asyncio.to_thread(self._read, key)

    async def exists(self, key: str) -> bool:
        """Whether a file matching the key is there."""
        return await asyncio.to_thread(self._read, key) is not None

    async def close(self) -> None:
        """Wait for the pending fsyncs."""
        await asyncio.to_thread(self.flusher.close)


class S3Store:
    """Any S3-compatible service (AWS S3, MinIO); PUT is atomic there by design.

    A missing object is None/False, also when S3 answers AccessDenied (what it says for a
    missing key to a role without ListBucket); S3 unreachable or failing is StoreUnavailable.
    """

    MISSING = frozenset({"NoSuchKey", "NotFound", "404", "AccessDenied", "403"})

    def __init__(self, bucket: str, prefix: str = "", endpoint: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        config = Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 2})
        self.client: Any = boto3.client("s3", endpoint_url=endpoint, config=config)
        self.bucket, self.prefix = bucket, prefix

    def _name(self, key: str) -> str:
        parse_key(key)
        return self.prefix + key

    async def _call(self, method: str, *, missing_ok: bool, **kwargs: Any) -> Any:
        """The client call in a thread; None for a missing object if `missing_ok`."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await asyncio.to_thread(getattr(self.client, method), **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if missing_ok and code in self.MISSING:
                return None
            raise StoreUnavailable(f"S3 {method}: {code or exc}") from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(f"S3 {method}: {exc}") from exc

    async def put(self, data: bytes, fmt: str) -> str:
        """PUT the object with immutable caching headers; return its key."""
        key = make_key(data, fmt)
        await self._call(
            "put_object",
            missing_ok=False,
            Bucket=self.bucket,
            Key=self._name(key),
            Body=data,
            ContentType=MEDIA_TYPES[fmt],
            CacheControl="public, max-age=31536000, immutable",
        )
        return key

    async def get(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is no such key."""
        reply = await self._call(
            "get_object", missing_ok=True, Bucket=self.bucket, Key=self._name(key)
        )
        if reply is None:
            return None
        return bytes(await asyncio.to_thread(reply["Body"].read))

    async def exists(self, key: str) -> bool:
        """Whether HEAD finds the object."""
        reply = await self._call(
            "head_object", missing_ok=True, Bucket=self.bucket, Key=self._name(key)
        )
        return reply is not None

    async def close(self) -> None:
        """Nothing to flush: an S3 PUT is durable when it returns."""


def asset_store(settings: Settings) -> AssetStore:
    """S3 when a bucket is set, else the directory (a volume in Kubernetes)."""
    if settings.asset_s3_bucket:
        return S3Store(
            settings.asset_s3_bucket, settings.asset_s3_prefix, settings.asset_s3_endpoint
        )
    return DirectoryStore(settings.asset_dir)
