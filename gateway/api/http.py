"""HTTP pieces the routes share: documented problem responses, ETags, Idempotency-Key."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Header

from gateway.idempotency import VALID_KEY
from gateway.problems import PROBLEM_JSON
from gateway.schemas import ProblemDetails

IMMUTABLE = "public, max-age=31536000, immutable"
EVENT_STREAM = "text/event-stream"


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries: problem details for each status."""
    schema = {"schema": ProblemDetails.model_json_schema()}
    return {
        s: {"description": "problem details", "content": {PROBLEM_JSON: schema}} for s in statuses
    }


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match names this ETag (a list of them, or `*`): answer 304."""
    if if_none_match is None:
        return False
    return any(tag.strip() in (etag, "*") for tag in if_none_match.split(","))


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=VALID_KEY.pattern,
        description="retry-safe POST: the same key and body give the same result",
    ),
]
IfNoneMatch = Annotated[str | None, Header()]
LastEventId = Annotated[
    str | None,
    Header(
        alias="Last-Event-ID",
        description=(
            "the id of the last event received: the stream resumes after it (a value that is "
            "not an event id of this API replays the stream from its start)"
        ),
    ),
]
