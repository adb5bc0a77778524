"""`GET /assets/{key}`: content-addressed images, immutable, with ETags."""

from __future__ import annotations

from fastapi import APIRouter, Response

from gateway.api.deps import ServicesDep
from gateway.api.http import IMMUTABLE, IfNoneMatch, etag_matches, problems
from gateway.assets import MEDIA_TYPES, InvalidKey, parse_key
from gateway.problems import Problem

router = APIRouter(tags=["assets"])


@router.get(
    "/assets/{key}",
    responses={
        200: {"content": {"image/png": {}, "image/webp": {}}},
        304: {"description": "not modified"},
        **problems(404),
    },
)
async def get_asset(key: str, svc: ServicesDep, if_none_match: IfNoneMatch = None) -> Response:
    """An image by its content key: immutable, so caches and CDNs may keep it forever."""
    try:
        _, ext = parse_key(key)
    except InvalidKey as exc:
        raise Problem(404, "Not Found", str(exc)) from exc
    etag = f'"{key}"'
    headers = {"ETag": etag, "Cache-Control": IMMUTABLE}
    if etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    data = await svc.generator.assets.get(key)
    if data is None:
        raise Problem(404, "Not Found", f"no asset {key}")
    return Response(data, media_type=MEDIA_TYPES[ext], headers=headers)
