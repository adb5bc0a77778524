"""Request dependencies: the services, the caller's API key by scope, contract-shaped bodies."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.api.inputs import is_multipart, multipart_body
from gateway.bodies import RequestBodies
from gateway.keys import ApiKey
from gateway.problems import Problem
from gateway.services import Services


def services(request: Request) -> Services:
    """The services of the app handling `request` (opened by its lifespan)."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(services)]
bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`")


def unauthorized(detail: str) -> Problem:
    """401 with the Bearer challenge."""
    return Problem(401, "Unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


async def api_key(
    svc: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> ApiKey:
    """The live API key the request presents, or 401."""
    if credentials is None:
        raise unauthorized("send an API key as `Authorization: Bearer <key>`")
    key, why = await svc.keys.authenticate(credentials.credentials)
    if key is None:
        raise unauthorized(
            "the API key has expired" if why == "expired" else "the API key is unknown or revoked"
        )
    return key


def scoped(scope: str) -> Callable[..., Awaitable[ApiKey]]:
    """A dependency giving the request's API key if it has `scope`, else 403."""

    async def check(key: Annotated[ApiKey, Depends(api_key)]) -> ApiKey:
        if scope not in key.scopes:
            raise Problem(403, "Forbidden", f"this API key lacks the {scope!r} scope")
        return key

    return check


GenerateKey = Annotated[ApiKey, Depends(scoped("generate"))]
AdminKey = Annotated[ApiKey, Depends(scoped("admin"))]


@dataclass(frozen=True)
class Parsed:
    """A request body validated against the contract in force, with that contract's bodies."""

    bodies: RequestBodies
    body: Any


def contract_body(name: str, *, uploads: bool = False) -> Callable[..., Awaitable[Parsed]]:
    """A dependency giving the JSON body validated as the contract's class `name` (or 422);
    with `uploads`, a multipart body too (`gateway.api.inputs`: the JSON as `request`, the
    input image as `image`, stored and charged as an upload).

    503 with Retry-After while no contract was ever seen. The route documents the body with
    `openapi_extra=bodies.contract_body(name, uploads=...)`.
    """

    async def parse(request: Request, svc: ServicesDep, key: GenerateKey) -> Parsed:
        if uploads and is_multipart(request):
            return await validated(svc, name, await multipart_body(request, svc, key))
        try:
            data = await request.json()
        except ValueError as exc:
            raise RequestValidationError(
                [{"type": "json_invalid", "loc": ("body",), "msg": f"JSON decode error: {exc}"}]
            ) from exc
        return await validated(svc, name, data)

    return parse


# A body refused for its style is validated again against a contract read anew, at most
# this often: a style published since the last periodic read is served by the next request,
# and requests naming unknown styles cannot make the gateway ask Triton more often.
STYLE_RECHECK_S = 1.0


async def validated(svc: Services, name: str, data: Any) -> Parsed:
    """`data` as the contract's class `name`; a refusal that names a style is checked again
    against the contract read anew (see STYLE_RECHECK_S)."""
    bodies = svc.bodies.get()
    try:
        return Parsed(bodies, bodies.parse(name, data))
    except RequestValidationError as exc:
        names_a_style = any(e["loc"][-1:] == ("style",) for e in exc.errors())
        if not names_a_style or not await svc.contract.recheck(STYLE_RECHECK_S):
            raise
    bodies = svc.bodies.get()
    return Parsed(bodies, bodies.parse(name, data))


ImageBody = Annotated[Parsed, Depends(contract_body("ImageRequest", uploads=True))]
WeaponBody = Annotated[Parsed, Depends(contract_body("WeaponRequest", uploads=True))]
ImageJobBody = Annotated[Parsed, Depends(contract_body("ImageJobRequest"))]
WeaponJobBody = Annotated[Parsed, Depends(contract_body("WeaponJobRequest"))]
