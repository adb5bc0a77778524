"""HTTP routes: sync generation, weapons, assets, keys, health."""

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body, Header, Request, Response
from fastapi.responses import JSONResponse

from gateway import metrics
from gateway.assets import MEDIA_TYPES, InvalidKey, parse_key
from gateway.deps import AdminKey, GenerateKey, Services, ServicesDep
from gateway.generation import Job
from gateway.idempotency import VALID_KEY as VALID_IDEMPOTENCY_KEY
from gateway.idempotency import fingerprint
from gateway.keys import ApiKey
from gateway.problems import PROBLEM_JSON, Problem
from gateway.ratelimit import Charge, cost
from gateway.schemas import (
    CreatedKey,
    ImageOptions,
    ImageRequest,
    ImageResult,
    KeyInfo,
    KeyRequest,
    ProblemDetails,
)

IMMUTABLE = "public, max-age=31536000, immutable"


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    schema = {"schema": ProblemDetails.model_json_schema()}
    return {
        s: {"description": "problem details", "content": {PROBLEM_JSON: schema}} for s in statuses
    }


GENERATION_ERRORS = problems(400, 401, 403, 409, 413, 422, 429, 499, 502, 503)
IMAGE_CONTENT = {
    "description": "the result, or the image itself with `Accept: image/png` or `image/webp`",
    "content": {"image/png": {}, "image/webp": {}},
}

router = APIRouter()
T = TypeVar("T")


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


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match names this ETag (a list of them, or `*`): answer 304."""
    if if_none_match is None:
        return False
    return any(tag.strip() in (etag, "*") for tag in if_none_match.split(","))


def wants_image(request: Request, fmt: str) -> bool:
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
    request: Request, svc: ServicesDep, result: ImageResult, headers: dict[str, str]
) -> Response:
    headers = {**headers, "X-Cache": "hit" if result.cached else "miss", "X-Seed": str(result.seed)}
    if wants_image(request, result.format):
        data = await svc.generator.assets.get(result.id)
        if data is None:
            raise Problem(
                503,
                "Service Unavailable",
                "the asset store lost this image",
                headers={"Retry-After": str(svc.settings.retry_after_s)},
            )
        return Response(
            data,
            media_type=MEDIA_TYPES[result.format],
            headers={**headers, "ETag": f'"{result.id}"', "Content-Location": result.asset_url},
        )
    return JSONResponse(result.model_dump(mode="json"), headers=headers)


async def run_sync(
    request: Request,
    svc: ServicesDep,
    key: ApiKey,
    job: Job,
    body: dict[str, Any],
    idempotency_key: str | None,
) -> Response:
    """Idempotency, cache, rate limit, generation, in that order; one result per request."""
    print_ = fingerprint(request.url.path, body)
    if idempotency_key is not None:
        stored = await svc.idempotency.begin(key.id, idempotency_key, print_)
        if stored is not None:
            return await render(
                request, svc, ImageResult(**stored), {"Idempotent-Replayed": "true"}
            )
    try:
        result = await svc.generator.cached(job)
        o = job.options
        size = svc.settings.assumed_size
        units = 1 if result else cost(o.steps, o.width or size, o.height or size)
        charge: Charge = await svc.limiter.charge(key.id, key.tier, units)
        if result is None:
            result = await cancel_on_disconnect(request, svc.generator.generate(job, source="sync"))
    except BaseException:
        if idempotency_key is not None:
            await svc.idempotency.release(key.id, idempotency_key)
        raise
    if idempotency_key is not None:
        await svc.idempotency.complete(
            key.id, idempotency_key, print_, result.model_dump(mode="json")
        )
    return await render(request, svc, result, charge.headers())


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=VALID_IDEMPOTENCY_KEY.pattern,
        description="retry-safe POST: the same key and body give the same result",
    ),
]


@router.post(
    "/v1/images",
    response_model=ImageResult,
    tags=["generate"],
    responses={200: IMAGE_CONTENT, **GENERATION_ERRORS},
)
async def create_image(
    request: Request,
    svc: ServicesDep,
    key: GenerateKey,
    body: ImageRequest,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Generate one image and wait for it (sync). Same seed and parameters: same image."""
    job = Job(body.prompt, body.negative_prompt, body)
    return await run_sync(request, svc, key, job, body.model_dump(mode="json"), idempotency_key)


def add_weapon_route(app_router: APIRouter, weapon_model: type[ImageOptions]) -> None:
    """POST /v1/weapons, whose body enumerates the choices of the studio's template file."""

    async def create_weapon(
        request: Request,
        svc: ServicesDep,
        key: GenerateKey,
        body: ImageOptions,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        """A weapon from game terms; the server's templates write the prompt."""
        prompt, negative = svc.weapons.render(body)
        job = Job(prompt, negative, body)
        return await run_sync(request, svc, key, job, body.model_dump(mode="json"), idempotency_key)

    # FastAPI reads the body's model from the annotation: the one built from the templates.
    create_weapon.__annotations__["body"] = Annotated[weapon_model, Body()]
    app_router.post(
        "/v1/weapons",
        response_model=ImageResult,
        tags=["generate"],
        responses={200: IMAGE_CONTENT, **GENERATION_ERRORS},
    )(create_weapon)


@router.get(
    "/assets/{key}",
    tags=["assets"],
    responses={
        200: {"content": {"image/png": {}, "image/webp": {}}},
        304: {"description": "not modified"},
        **problems(404),
    },
)
async def get_asset(
    key: str, svc: ServicesDep, if_none_match: Annotated[str | None, Header()] = None
) -> Response:
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


@router.get(
    "/v1/admin/keys",
    response_model=list[KeyInfo],
    tags=["admin"],
    responses=problems(401, 403, 503),
)
async def list_keys(svc: ServicesDep, _: AdminKey) -> list[dict[str, object]]:
    return [k.public() for k in await svc.keys.list()]


@router.post(
    "/v1/admin/keys",
    response_model=CreatedKey,
    status_code=201,
    tags=["admin"],
    responses=problems(400, 401, 403, 413, 422, 503),
)
async def create_key(svc: ServicesDep, _: AdminKey, body: KeyRequest) -> dict[str, object]:
    secret, record = await svc.keys.create(body.name, tuple(body.scopes), body.tier)
    return {**record.public(), "key": secret}


@router.delete(
    "/v1/admin/keys/{key_id}",
    status_code=204,
    tags=["admin"],
    responses=problems(401, 403, 404, 503),
)
async def revoke_key(key_id: str, svc: ServicesDep, _: AdminKey) -> Response:
    if not await svc.keys.revoke(key_id):
        raise Problem(404, "Not Found", f"no API key {key_id}")
    return Response(status_code=204)


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


async def check_dependencies(svc: Services) -> dict[str, str]:
    """ "ok" or the reason, for Triton's model and Redis; also the forge_dependency_up gauge."""
    checks: dict[str, str] = {}
    for name, probe in (("triton", svc.triton.ready()), ("redis", svc.redis.ping())):
        try:
            checks[name] = "ok" if await asyncio.wait_for(probe, 3.0) else "not ready"
        except Exception as exc:  # any failure to answer is "not ready", with its reason
            checks[name] = f"error: {type(exc).__name__}"
        metrics.DEPENDENCY_UP.labels(name).set(checks[name] == "ok")
    return checks


@router.get("/readyz", tags=["health"], responses={503: {"description": "not ready"}})
async def readyz(svc: ServicesDep) -> JSONResponse:
    """Ready when Triton's model is ready and Redis answers."""
    checks = await check_dependencies(svc)
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
    )
