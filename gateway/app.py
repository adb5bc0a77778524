"""`create_app(settings)`: the gateway's FastAPI application and the lifespan of its services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_fastapi_instrumentator import Instrumentator
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import metrics, problems
from gateway.api import assets, health, images, jobs, keys, page, styles, uploads
from gateway.bodies import RequestBodies, document
from gateway.contract import UnknownContract
from gateway.keys import KeysFileError, dev_key
from gateway.problems import Problem
from gateway.services import Services, open_services
from gateway.settings import Settings

log = logging.getLogger(__name__)


class BodyLimit:
    """413 for a request body over the limit, declared or streamed (pure ASGI middleware).
    A multipart body (an input image with its request) may be `upload_bytes` larger."""

    def __init__(self, app: ASGIApp, max_bytes: int, upload_bytes: int) -> None:
        self.app, self.max_bytes, self.upload_bytes = app, max_bytes, upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse a declared or streamed body over the limit; pass everything else on."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        multipart = headers.get(b"content-type", b"").startswith(b"multipart/form-data")
        limit = self.max_bytes + (self.upload_bytes if multipart else 0)
        too_large = Problem(413, "Content Too Large", f"the request body is over {limit} bytes")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await too_large.response(scope["path"])(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large
            return message

        return await self.app(scope, limited, send)


async def bootstrap_keys(svc: Services) -> None:
    """The dev key and the keys file, retried until Redis answers and the file loads.

    Until then `/readyz` says why not (a keys file that cannot be read is an error in the
    log and in the readiness check, never a silent 401 for everyone).
    """
    settings = svc.settings
    while True:
        try:
            if settings.dev_api_key:
                await svc.keys.ensure(
                    dev_key(
                        settings.dev_api_key,
                        settings.dev_webhook_secret,
                        settings.dev_key_content_policy,
                    )
                )
            if settings.api_keys_file:
                count = await svc.keys.load_file(settings.api_keys_file)
                log.info("loaded %d API keys from %s", count, settings.api_keys_file)
            svc.keys.problem = None
            return
        except RedisError as exc:
            svc.keys.problem = f"Redis unavailable ({type(exc).__name__})"
            log.warning("cannot load API keys yet (%r); retrying", exc)
        except KeysFileError as exc:
            svc.keys.problem = str(exc)
            log.error("%s; fix the file (retrying every 10 s)", exc)
        await asyncio.sleep(10 if svc.keys.problem and "file" in svc.keys.problem else 2)


async def watch_dependencies(svc: Services) -> None:
    """Keep forge_dependency_up current between readiness probes (alerts read it)."""
    while True:
        await health.check_dependencies(svc)
        await asyncio.sleep(svc.settings.dependency_check_s)


def contract_openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """`app.openapi`: FastAPI's document, its request bodies those of the contract in force.

    Made again when the contract changes (another model version, other rules).
    """
    made_for: list[str | None] = [None]

    def openapi() -> dict[str, Any]:
        try:
            bodies: RequestBodies | None = app.state.services.bodies.get()
        except (AttributeError, UnknownContract):  # before the lifespan, or never seen
            bodies = None
        fingerprint = bodies.contract.fingerprint if bodies else None
        if app.openapi_schema is None or made_for[0] != fingerprint:
            app.openapi_schema = None
            document(FastAPI.openapi(app), bodies)  # fills app.openapi_schema
            made_for[0] = fingerprint
        return FastAPI.openapi(app)  # the document kept in app.openapi_schema

    return openapi


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway for `settings` (default: FORGE_ environment variables)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = app.state.services = open_services(settings)
        metrics.start_gateway_series()
        await svc.contract.load()  # before serving: the first request has its rules
        background = [
            asyncio.create_task(svc.contract.watch(settings.contract_refresh_s)),
            asyncio.create_task(bootstrap_keys(svc)),
            asyncio.create_task(watch_dependencies(svc)),
        ]
        yield
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await svc.close()

    app = FastAPI(
        title="Crafterse Forge",
        version="1.0.0",
        description="Weapon images for game clients, made by Stable Diffusion on Triton.",
        lifespan=lifespan,
    )
    problems.install(app, settings.retry_after_s)
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, upload_bytes=settings.upload_max_bytes
    )
    Instrumentator(excluded_handlers=["/metrics"]).instrument(app).expose(
        app, endpoint="/metrics", include_in_schema=False
    )
    routers = (images.router, styles.router, uploads.router, jobs.router, assets.router)
    for router in (*routers, keys.router, health.router):
        app.include_router(router)
    app.include_router(page.router)  # the forge page at / (not in the OpenAPI document)
    app.openapi = contract_openapi(app)  # type: ignore[method-assign]
    return app
