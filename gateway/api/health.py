"""Health: `/healthz` (alive) and `/readyz` (dependencies answer), and the dependency gauge."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from gateway import metrics
from gateway.api.deps import ServicesDep
from gateway.services import Services

router = APIRouter(tags=["health"])


@router.get("/healthz")
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


@router.get("/readyz", responses={503: {"description": "not ready"}})
async def readyz(svc: ServicesDep) -> JSONResponse:
    """Ready when Triton's model is ready and Redis answers."""
    checks = await check_dependencies(svc)
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
    )
