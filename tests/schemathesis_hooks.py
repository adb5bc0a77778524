"""Schemathesis hooks for the schema test (loaded through SCHEMATHESIS_HOOKS).

An Idempotency-Key names one request: the same key with another body is refused with 422,
as the IETF idempotency-key draft requires. That is a rule between requests, which no
schema can state, so the fuzzer's generated keys are made unique per request here; the
refusal itself is tested in tests/test_gateway.py.
"""

from __future__ import annotations

import uuid
from typing import Any

import schemathesis


@schemathesis.hook
def map_headers(ctx: Any, headers: dict[str, Any] | None) -> dict[str, Any] | None:
    """Give every generated Idempotency-Key a unique suffix (still printable ASCII)."""
    key = (headers or {}).get("Idempotency-Key")
    if headers is not None and isinstance(key, str) and key:
        headers["Idempotency-Key"] = f"{key[:200]}-{uuid.uuid4().hex}"
    return headers
