"""The worker's HTTP port: `/healthz` (alive), `/readyz` (taking work), `/metrics`.

Served by uvicorn in the worker's own event loop, so `/healthz` answering means the loop
runs. `/readyz` is 503 while the worker does not take work (the image model unavailable,
Redis or the broker failing, not consuming yet), with the reason; Kubernetes shows it,
and nothing routes traffic to a worker, so not-ready never stops the work.
"""

from __future__ import annotations

from collections.abc import Callable

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.settings import Settings


def probe_app(readiness: Callable[[], dict[str, str]]) -> Starlette:
    """The probe routes; `readiness` gives each condition "ok" or why not."""

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> JSONResponse:
        checks = readiness()
        ok = all(v == "ok" for v in checks.values())
        body = {"status": "ok" if ok else "unavailable", "checks": checks}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
        ]
    )


async def serve_probes(readiness: Callable[[], dict[str, str]], settings: Settings) -> None:
    """Serve the probes on FORGE_HOST:FORGE_WORKER_METRICS_PORT until cancelled."""
    config = uvicorn.Config(
        probe_app(readiness),
        host=settings.host,
        port=settings.worker_metrics_port,
        log_level="warning",
        lifespan="off",
    )
    await uvicorn.Server(config).serve()
