"""Health: `/healthz` (alive), `/readyz` (can accept work), and the dependency gauge.

Ready means the gateway can take work: Redis (keys, limits, job state) and the broker (job
submissions) answer, and the configured API keys are in place (the dev key, the keys
file). Triton is checked and reported too, but does not make the gateway unready: without
it, sync generation answers 503 with Retry-After while jobs are still accepted (they wait
in the queue), and job status and assets are still served, so a load balancer keeps every
gateway in service through a Triton outage.
"""

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


READINESS = ("redis", "broker", "keys")  # what /readyz requires; "triton" is reported only


async def check_dependencies(svc: Services) -> dict[str, str]:
    """ "ok" or the reason, for Triton's model, Redis and the broker; also the
    forge_dependency_up gauge."""
    checks: dict[str, str] = {}
    probes = (
        ("triton", svc.triton.ready()),
        ("redis", svc.redis.ping()),
        ("broker", svc.queue.ready()),
    )
    for name, probe in probes:
        try:
            checks[name] = "ok" if await asyncio.wait_for(probe, 3.0) else "not ready"
        except Exception as exc:  # any failure to answer is "not ready", with its reason
            checks[name] = f"error: {type(exc).__name__}"
        metrics.DEPENDENCY_UP.labels(name).set(checks[name] == "ok")
    checks["keys"] = "ok" if svc.keys.problem is None else f"error: {svc.keys.problem}"
    return checks


@router.get("/readyz", responses={503: {"description": "not ready"}})
async def readyz(svc: ServicesDep) -> JSONResponse:
    """Ready when the gateway can accept work: Redis and the broker answer (Triton is
    reported, not required)."""
    checks = await check_dependencies(svc)
    ok = all(checks[name] == "ok" for name in READINESS)
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
    )
