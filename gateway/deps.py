"""The services one gateway process holds, and the request dependencies that reach them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis

from gateway.generation import Generator
from gateway.idempotency import Idempotency
from gateway.jobs import JobStore
from gateway.keys import ApiKey, KeyStore
from gateway.problems import Problem
from gateway.queue import JobQueue
from gateway.ratelimit import RateLimiter
from gateway.settings import Settings
from gateway.triton_client import AsyncTriton
from gateway.weapons import WeaponTemplates


@dataclass
class Services:
    settings: Settings
    redis: Redis
    triton: AsyncTriton
    keys: KeyStore
    limiter: RateLimiter
    idempotency: Idempotency
    generator: Generator
    weapons: WeaponTemplates
    jobs: JobStore
    queue: JobQueue


def services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(services)]
bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`")


def unauthorized(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


async def api_key(
    svc: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> ApiKey:
    if credentials is None:
        raise unauthorized("send an API key as `Authorization: Bearer <key>`")
    key = await svc.keys.authenticate(credentials.credentials)
    if key is None:
        raise unauthorized("the API key is unknown or revoked")
    return key


def scoped(scope: str) -> Callable[..., Awaitable[ApiKey]]:
    async def check(key: Annotated[ApiKey, Depends(api_key)]) -> ApiKey:
        if scope not in key.scopes:
            raise Problem(403, "Forbidden", f"this API key lacks the {scope!r} scope")
        return key

    return check


GenerateKey = Annotated[ApiKey, Depends(scoped("generate"))]
AdminKey = Annotated[ApiKey, Depends(scoped("admin"))]
