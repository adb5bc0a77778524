"""Asset stores: content keys, atomic directory writes, and S3 (a real moto S3 server)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.assets import DirectoryStore, InvalidKey, S3Store, parse_key
from launcher.process import free_port

PNG = b"\x89PNG\r\n\x1a\n" + b"forge" * 100


@pytest.mark.parametrize(
    "bad",
    ["../x.png", "a" * 64 + ".gif", "A" * 64 + ".png", "x.png", "a" * 64 + ".png/../../etc", ""],
)
def test_only_content_keys_are_keys(bad: str) -> None:
    with pytest.raises(InvalidKey):
        parse_key(bad)


def test_directory_store_is_content_addressed_and_leaves_no_partial_files(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    key = asyncio.run(store.put(PNG, "png"))
    assert key == hashlib.sha256(PNG).hexdigest() + ".png"
    assert asyncio.run(store.put(PNG, "png")) == key  # stored once
    assert asyncio.run(store.get(key)) == PNG
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [key]  # no temp files left
    assert asyncio.run(store.get("0" * 64 + ".png")) is None


def test_a_file_damaged_before_it_was_durable_is_missing_then_written_again(
    tmp_path: Path,
) -> None:
    """A crash between the rename and the background fsync can leave a truncated file."""

    async def scenario() -> None:
        store = DirectoryStore(tmp_path)
        key = await store.put(PNG, "png")
        await store.close()  # the flusher has fsynced the file and its folder
        store.path(key).write_bytes(PNG[:10])  # what the crash left behind
        assert await store.exists(key) is False
        assert await store.get(key) is None
        assert not store.path(key).exists()  # removed, not served
        assert await store.put(PNG, "png") == key
        assert await store.get(key) == PNG
        await store.close()

    asyncio.run(scenario())


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_s3_store(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    store = S3Store("forge-assets", "assets/", s3_endpoint)
    store.client.create_bucket(Bucket="forge-assets")
    key = asyncio.run(store.put(PNG, "png"))
    assert key == hashlib.sha256(PNG).hexdigest() + ".png"
    assert asyncio.run(store.exists(key)) and asyncio.run(store.get(key)) == PNG
    head = store.client.head_object(Bucket="forge-assets", Key=f"assets/{key}")
    assert head["ContentType"] == "image/png"
    assert head["CacheControl"] == "public, max-age=31536000, immutable"
    missing = "0" * 64 + ".png"
    assert asyncio.run(store.get(missing)) is None and not asyncio.run(store.exists(missing))
