"""Schemathesis hooks for the schema test (loaded through SCHEMATHESIS_HOOKS).

An Idempotency-Key names one request: the same key with another body is refused with 422,
as the IETF idempotency-key draft requires. That is a rule between requests, which no
schema can state, so the fuzzer's generated keys are made unique per request here; the
refusal itself is tested in tests/test_gateway.py. Input images get the same treatment
(`map_body`).
"""

from __future__ import annotations

import io
import uuid
from typing import Any

import schemathesis
from PIL import Image


def _sketch() -> bytes:
    """A 64x64 grey PNG: what a multipart request's `image` part carries."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


SKETCH = _sketch()


@schemathesis.hook
def map_headers(ctx: Any, headers: dict[str, Any] | None) -> dict[str, Any] | None:
    """Give every generated Idempotency-Key a unique suffix (still printable ASCII)."""
    key = (headers or {}).get("Idempotency-Key")
    if headers is not None and isinstance(key, str) and key:
        headers["Idempotency-Key"] = f"{key[:200]}-{uuid.uuid4().hex}"
    return headers


@schemathesis.hook
def map_body(ctx: Any, body: Any) -> Any:
    """An input image must be a stored image (`init_image`) or an image's bytes (the
    multipart parts `image`, and `file` of uploads): a rule about stored state and file
    contents, which no schema states. Generated keys name no stored image and generated
    bytes are no image, so the keys are dropped (with the strength that needs them) and
    the bytes made a real PNG; refusing both is tested in tests/test_uploads.py."""
    if not isinstance(body, dict):
        return body
    if "file" in body:  # POST /v1/uploads
        body["file"] = SKETCH
        return body
    if "image" in body and isinstance(body.get("request"), dict):
        body["image"] = SKETCH
        body["request"].pop("init_image", None)
        return body
    for entry in [body, *body.get("images", []), *body.get("weapons", [])]:
        if isinstance(entry, dict) and "init_image" in entry:
            entry.pop("init_image")
            entry.pop("strength", None)
    return body
