"""Sync generation: `POST /v1/images` and `POST /v1/weapons`, bodies shaped by the contract."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent

from gateway import metrics
from gateway.api.deps import GenerateKey, ImageBody, Parsed, ServicesDep, WeaponBody
from gateway.api.http import EVENT_STREAM, IdempotencyKey, problems
from gateway.api.policy import covered, screen, strict
from gateway.assets import MEDIA_TYPES
from gateway.bodies import contract_body
from gateway.content_policy import audit_refusal
from gateway.generation import UNSAFE_IMAGE, ImageFlagged, progress_event
from gateway.idempotency import Claim, claimed
from gateway.input_images import InputImageError
from gateway.keys import ApiKey
from gateway.problems import Problem, as_problem, unavailable
from gateway.ratelimit import cost
from gateway.schemas import ImageResult, ImageSpec
from gateway.services import Services
from gateway.triton_client import ModelRejected, Progress

GENERATION_ERRORS = problems(400, 401, 403, 406, 409, 413, 415, 422, 429, 499, 502, 503)
IMAGE_CONTENT = {
    "description": (
        "the result, or the image itself with `Accept: image/png` or `image/webp`; with "
        "`Accept: text/event-stream`, server-sent events: `progress` after denoising steps "
        "(`step`, `total_steps`, `elapsed_ms`; the first, the last, and at most every "
        "FORGE_STREAM_PROGRESS_INTERVAL_S between), `preview` every `preview_every` steps "
        "(the same and `image`, a small PNG data URL), then `result` (this body) or `error` "
        "(problem details). A cached or replayed result is one `result` event."
    ),
    "content": {"image/png": {}, "image/webp": {}, EVENT_STREAM: {}},
}
PreviewEvery = Annotated[
    int,
    Query(
        ge=0,
        le=1000,
        description="with Accept: text/event-stream, a preview every this many steps (0: none)",
    ),
]
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


def wants_events(request: Request) -> bool:
    """Whether the client asked for server-sent events."""
    return EVENT_STREAM in request.headers.get("accept", "")


def sse(event: str, data: dict[str, Any] | ImageResult) -> ServerSentEvent:
    """One server-sent event with a JSON payload."""
    payload = data.model_dump_json() if isinstance(data, ImageResult) else json.dumps(data)
    return ServerSentEvent(event=event, data=payload)


async def render(
    request: Request, svc: Services, result: ImageResult, headers: dict[str, str]
) -> Response:
    """The result as JSON, as the image bytes when the client accepts them, or as one
    `result` event when it asked for events."""
    headers = {**headers, "X-Cache": "hit" if result.cached else "miss", "X-Seed": str(result.seed)}
    if wants_events(request):
        event = sse("result", result)
        return EventSourceResponse(iter([event]), headers=headers)
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
    preview_every: int,
    flags: list[str],
) -> Response:
    """Idempotency, cache, rate limit, generation, in that order; one result per request,
    with the content policy's `flags`. Streamed (Accept: text/event-stream), the generation
    runs as the events are sent."""
    claim = svc.idempotency.claim(
        key.id, idempotency_key, request.url.path, claimed(parsed.body, [spec])
    )
    stored = await claim.begin()
    if stored is not None:
        return await render(request, svc, ImageResult(**stored), {"Idempotent-Replayed": "true"})
    try:
        result = await svc.generator.cached(spec, refuse_flagged=strict(key))
        units = 1 if result else cost(spec, parsed.bodies.contract)
        charge = await svc.limiter.charge(key.id, key.tier, units)
        if result is None and wants_events(request):
            events = stream(request, svc, key, spec, units, claim, preview_every, flags)
            return EventSourceResponse(
                events, headers={**charge.headers(), "X-Cache": "miss"}, ping=15
            )
        if result is None:
            result = await generate_or_refund(request, svc, key, spec, units)
    except BaseException as exc:
        await claim.release()
        audit_flagged(request, key, spec, exc)
        raise
    result = flagged(result, flags)
    await keep_for_replays(claim, result)
    return await render(request, svc, result, charge.headers())


def flagged(result: ImageResult, flags: list[str]) -> ImageResult:
    """The result with the content policy's categories its request's text fell in."""
    return result.model_copy(update={"content_flags": flags}) if flags else result


async def keep_for_replays(claim: Claim, result: ImageResult) -> None:
    """Store the result for Idempotency-Key replays; a Redis failure here is logged: the
    image is made and stored, so the client gets it all the same."""
    try:
        await claim.complete(result.model_dump(mode="json"))
    except RedisError:
        log.warning("could not keep the result for Idempotency-Key replays", exc_info=True)


def clients_doing(exc: Exception) -> bool:
    """Whether a failed generation is the client's doing (an invalid request), which keeps
    its charge; anything else failed on the server's side. A client that went away
    (cancellation, not an Exception) keeps its charge too."""
    return isinstance(exc, ModelRejected | Problem | ImageFlagged | InputImageError)


def audit_flagged(request: Request, key: ApiKey, spec: ImageSpec, exc: BaseException) -> None:
    """The audit line of a flagged image refused to a strict key, if `exc` is that."""
    if isinstance(exc, ImageFlagged):
        audit_refusal(key.id, request.url.path, UNSAFE_IMAGE, [spec.prompt, spec.negative_prompt])


async def generate_or_refund(
    request: Request, svc: Services, key: ApiKey, spec: ImageSpec, units: int
) -> ImageResult:
    """Generate (cancelled if the client leaves); a failure on the server's side (the model
    failed or is away, a store failed) gives the charge back."""
    try:
        generation = svc.generator.generate(spec, source="sync", refuse_flagged=strict(key))
        return await cancel_on_disconnect(request, generation)
    except Exception as exc:
        if not clients_doing(exc):
            await svc.limiter.refund(key.id, key.tier, units)
        raise


async def stream(
    request: Request,
    svc: Services,
    key: ApiKey,
    spec: ImageSpec,
    units: int,
    claim: Claim,
    preview_every: int,
    flags: list[str],
) -> AsyncIterator[ServerSentEvent]:
    """The events of one streamed generation: progress and previews, then `result` or
    `error`. A client that disconnects cancels the model's work (it stops before its next
    step); a failure on the server's side gives the charge back, as the JSON form does."""
    started = time.perf_counter()
    previewed = False
    metrics.OPEN_STREAMS.inc()
    try:
        async with aclosing(
            svc.generator.generation(
                spec, source="sync", preview_every=preview_every, refuse_flagged=strict(key)
            )
        ) as generation:
            async for event in generation:
                if isinstance(event, Progress):
                    if event.preview is not None and not previewed:
                        metrics.FIRST_PREVIEW_SECONDS.observe(time.perf_counter() - started)
                        previewed = True
                    yield sse(*progress_event(event))
                    continue
                result = flagged(event, flags)
                await keep_for_replays(claim, result)
                yield sse("result", result)
    except asyncio.CancelledError:
        metrics.STREAMS_CANCELLED.inc()
        await asyncio.shield(claim.release())
        raise
    except Exception as exc:
        await claim.release()
        if not clients_doing(exc):
            await svc.limiter.refund(key.id, key.tier, units)
        audit_flagged(request, key, spec, exc)
        problem = as_problem(exc, request.url.path, svc.settings.retry_after_s)
        yield sse("error", problem.body(request.url.path))
    finally:
        metrics.OPEN_STREAMS.dec()


DOCUMENTED: dict[str, Any] = {
    "response_model": ImageResult,
    "responses": {200: IMAGE_CONTENT, **GENERATION_ERRORS},
}


@router.post("/v1/images", openapi_extra=contract_body("ImageRequest", uploads=True), **DOCUMENTED)
async def create_image(
    request: Request,
    svc: ServicesDep,
    key: GenerateKey,
    parsed: ImageBody,
    idempotency_key: IdempotencyKey = None,
    preview_every: PreviewEvery = 0,
) -> Response:
    """Generate one image and wait for it (sync), or watch it made (server-sent events).
    Same seed and parameters: same image. Image-to-image: `init_image` names a stored image,
    or a multipart body sends the JSON as the part `request` and the image as `image`."""
    (flags,) = screen(svc, key, request.url.path, [parsed.body])
    spec = covered(svc, key, parsed.bodies.image_spec(parsed.body))
    spec = await svc.generator.sized(spec, parsed.body.model_fields_set)
    return await run_sync(request, svc, key, parsed, spec, idempotency_key, preview_every, flags)


@router.post(
    "/v1/weapons", openapi_extra=contract_body("WeaponRequest", uploads=True), **DOCUMENTED
)
async def create_weapon(
    request: Request,
    svc: ServicesDep,
    key: GenerateKey,
    parsed: WeaponBody,
    idempotency_key: IdempotencyKey = None,
    preview_every: PreviewEvery = 0,
) -> Response:
    """A weapon from game terms; the server's templates write the prompt. Streams like
    /v1/images."""
    (flags,) = screen(svc, key, request.url.path, [parsed.body])
    spec = covered(svc, key, parsed.bodies.weapon_spec(parsed.body))
    spec = await svc.generator.sized(spec, parsed.body.model_fields_set)
    return await run_sync(request, svc, key, parsed, spec, idempotency_key, preview_every, flags)
