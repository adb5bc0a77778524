"""Sync generation: `POST /v1/images` and `POST /v1/weapons`, bodies shaped by the contract."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from gateway.api.deps import GenerateKey, ImageBody, Parsed, ServicesDep, WeaponBody
from gateway.api.http import IdempotencyKey, problems
from gateway.assets import MEDIA_TYPES
from gateway.bodies import contract_body
from gateway.keys import ApiKey
from gateway.problems import Problem, unavailable
from gateway.ratelimit import cost
from gateway.schemas import ImageResult, ImageSpec
from gateway.services import Services
from gateway.triton_client import ModelRejected

GENERATION_ERRORS = problems(400, 401, 403, 406, 409, 413, 422, 429, 499, 502, 503)
IMAGE_CONTENT = {
    "description": "the result, or the image itself with `Accept: image/png` or `image/webp`",
    "content": {"image/png": {}, "image/webp": {}},
}
T = TypeVar("T")
log = logging.getLogger(__name__)
router = APIRouter(tags=["generate"])


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it (and so its Triton request) if the client goes away."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not task.done():
            if await request.is_disconnected():
                task.cancel()
                return
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if task.cancelled() and watcher.done():
            raise Problem(499, "Client Closed Request", "the client disconnected") from None
        raise
    finally:
        watcher.cancel()


def wants_image(request: Request, fmt: str) -> bool:
    """Whether the client asked for the image bytes; 406 if for the other format."""
    accept = request.headers.get("accept", "")
    if not any(t in accept for t in ("image/png", "image/webp", "image/*")):
        return False
    if MEDIA_TYPES[fmt] in accept or "image/*" in accept:
        return True
    raise Problem(
        406,
        "Not Acceptable",
        f"this request makes a {fmt} image; send Accept: "
        f"{MEDIA_TYPES[fmt]} or ask for format {'png' if fmt == 'webp' else 'webp'}",
    )


async def render(
    request: Request, svc: Services, result: ImageResult, headers: dict[str, str]
) -> Response:
    """The result as JSON, or as the image bytes when the client accepts them."""
    headers = {**headers, "X-Cache": "hit" if result.cached else "miss", "X-Seed": str(result.seed)}
    if wants_image(request, result.format):
        data = await svc.generator.assets.get(result.id)
        if data is None:
            raise unavailable("the asset store lost this image", svc.settings.retry_after_s)
        return Response(
            data,
            media_type=MEDIA_TYPES[result.format],
            headers={**headers, "ETag": f'"{result.id}"', "Content-Location": result.asset_url},
        )
    return JSONResponse(result.model_dump(mode="json"), headers=headers)


async def run_sync(
    request: Request,
    svc: Services,
    key: ApiKey,
    parsed: Parsed,
    spec: ImageSpec,
    idempotency_key: str | None,
) -> Response:
    """Idempotency, cache, rate limit, generation, in that order; one result per request."""
    claim = svc.idempotency.claim(
        key.id, idempotency_key, request.url.path, parsed.body.model_dump(mode="json")
    )
    stored = await claim.begin()
    if stored is not None:
        return await render(request, svc, ImageResult(**stored), {"Idempotent-Replayed": "true"})
    try:
        result = await svc.generator.cached(spec)
        units = 1 if result else cost(spec, parsed.bodies.contract)
        charge = await svc.limiter.charge(key.id, key.tier, units)
        if result is None:
            result = await generate_or_refund(request, svc, key, spec, units)
    except BaseException:
        await claim.release()
        raise
    try:
        await claim.complete(result.model_dump(mode="json"))
    except RedisError:  # the image is made and stored: the client gets it all the same
        log.warning("could not keep the result for Idempotency-Key replays", exc_info=True)
    return await render(request, svc, result, charge.headers())


async def generate_or_refund(
    request: Request, svc: Services, key: ApiKey, spec: ImageSpec, units: int
) -> ImageResult:
    """Generate (cancelled if the client leaves); a failure on the server's side (the model
    failed or is away, a store failed) gives the charge back."""
    try:
        return await cancel_on_disconnect(request, svc.generator.generate(spec, source="sync"))
    except (ModelRejected, Problem, asyncio.CancelledError):
        raise  # the client's doing: an invalid request, or it went away
    except Exception:
        await svc.limiter.refund(key.id, key.tier, units)
        raise


DOCUMENTED: dict[str, Any] = {
    "response_model": ImageResult,
    "responses": {200: IMAGE_CONTENT, **GENERATION_ERRORS},
}


@router.post("/v1/images", openapi_extra=contract_body("ImageRequest"), **DOCUMENTED)
async def create_image(
    request: Request,
    svc: ServicesDep,
    key: GenerateKey,
    parsed: ImageBody,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Generate one image and wait for it (sync). Same seed and parameters: same image."""
    spec = parsed.bodies.image_spec(parsed.body)
    return await run_sync(request, svc, key, parsed, spec, idempotency_key)


@router.post("/v1/weapons", openapi_extra=contract_body("WeaponRequest"), **DOCUMENTED)
async def create_weapon(
    request: Request,
    svc: ServicesDep,
    key: GenerateKey,
    parsed: WeaponBody,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """A weapon from game terms; the server's templates write the prompt."""
    spec = parsed.bodies.weapon_spec(parsed.body)
    return await run_sync(request, svc, key, parsed, spec, idempotency_key)
