"""`create_app(settings)`: the gateway's FastAPI application and the lifespan of its services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_fastapi_instrumentator import Instrumentator
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import job_routes, problems, web
from gateway.assets import asset_store
from gateway.cache import ResultCache
from gateway.deps import Services
from gateway.generation import Generator
from gateway.idempotency import Idempotency
from gateway.job_routes import add_weapon_job_route
from gateway.jobs import JobStore
from gateway.keys import KeyStore
from gateway.problems import Problem
from gateway.queue import JobQueue
from gateway.ratelimit import RateLimiter
from gateway.routes import add_weapon_route, check_dependencies, router
from gateway.settings import Settings
from gateway.triton_client import AsyncTriton
from gateway.weapons import WeaponTemplates

log = logging.getLogger(__name__)


class BodyLimit:
    """413 for a request body over the limit, declared or streamed (pure ASGI middleware)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = Problem(
            413, "Content Too Large", f"the request body is over {self.max_bytes} bytes"
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large.response(scope["path"])(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large
            return message

        return await self.app(scope, limited, send)


async def bootstrap_keys(keys: KeyStore, settings: Settings) -> None:
    """The dev key and the keys file, retried until Redis answers."""
    while True:
        try:
            if settings.dev_api_key:
                await keys.create(
                    "dev", ("generate", "admin"), "standard", secret=settings.dev_api_key
                )
            if settings.api_keys_file:
                await keys.load_file(settings.api_keys_file)
            return
        except RedisError as exc:
            log.warning("cannot load API keys yet (%r); retrying", exc)
            await asyncio.sleep(2)


async def watch_dependencies(services: Services) -> None:
    """Keep forge_dependency_up current between readiness probes (alerts read it)."""
    while True:
        await check_dependencies(services)
        await asyncio.sleep(services.settings.dependency_check_s)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    weapons = WeaponTemplates.load(settings.weapon_templates)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = Redis.from_url(settings.redis_url, socket_timeout=3, socket_connect_timeout=2)
        triton = AsyncTriton(
            settings.triton_grpc_url, settings.triton_timeout_s, settings.model_info_ttl_s
        )
        keys = KeyStore(redis)
        app.state.services = Services(
            settings=settings,
            redis=redis,
            triton=triton,
            keys=keys,
            limiter=RateLimiter(
                settings.redis_url,
                settings.rate_limit,
                settings.rate_limit_by_tier,
                settings.retry_after_s,
            ),
            idempotency=Idempotency(
                redis, settings.idempotency_ttl_s, int(settings.triton_timeout_s) + 60
            ),
            generator=Generator(
                triton,
                asset_store(settings),
                ResultCache(redis, settings.cache_ttl_s),
                settings.public_base_url,
                settings.retry_after_s,
            ),
            weapons=weapons,
            jobs=JobStore(redis, settings.job_ttl_s),
            queue=JobQueue(settings),
        )
        background = [
            asyncio.create_task(bootstrap_keys(keys, settings)),
            asyncio.create_task(watch_dependencies(app.state.services)),
        ]
        yield
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await app.state.services.queue.close()
        await triton.close()
        await redis.aclose()

    app = FastAPI(
        title="Crafterse Forge",
        version="1.0.0",
        description="Weapon images for game clients, made by Stable Diffusion on Triton.",
        lifespan=lifespan,
    )
    problems.install(app, settings.retry_after_s)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    Instrumentator(excluded_handlers=["/metrics"]).instrument(app).expose(
        app, endpoint="/metrics", include_in_schema=False
    )
    app.include_router(router)
    app.include_router(web.router)  # the forge page at / (not in the OpenAPI document)
    weapon_model = weapons.request_model()
    add_weapon_route(app.router, weapon_model)
    app.include_router(job_routes.router)
    add_weapon_job_route(app.router, weapon_model)
    return app
