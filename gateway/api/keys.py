"""`/v1/admin/keys`: list, create and revoke API keys (scope `admin`)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from gateway.api.deps import AdminKey, ServicesDep
from gateway.api.http import problems
from gateway.problems import Problem
from gateway.schemas import CreatedKey, KeyInfo, KeyRequest

router = APIRouter(tags=["admin"])


@router.get("/v1/admin/keys", response_model=list[KeyInfo], responses=problems(401, 403, 503))
async def list_keys(svc: ServicesDep, _: AdminKey) -> list[dict[str, object]]:
    """Every key, without its hash or secret."""
    return [k.public() for k in await svc.keys.list()]


@router.post(
    "/v1/admin/keys",
    response_model=CreatedKey,
    status_code=201,
    responses=problems(400, 401, 403, 413, 422, 503),
)
async def create_key(svc: ServicesDep, _: AdminKey, body: KeyRequest) -> dict[str, object]:
    """A new key; its secret is in this response only."""
    secret, record = await svc.keys.create(body.name, tuple(body.scopes), body.tier)
    return {**record.public(), "key": secret}


@router.delete("/v1/admin/keys/{key_id}", status_code=204, responses=problems(401, 403, 404, 503))
async def revoke_key(key_id: str, svc: ServicesDep, _: AdminKey) -> Response:
    """Revoke a key by its id: it is refused from now on."""
    if not await svc.keys.revoke(key_id):
        raise Problem(404, "Not Found", f"no API key {key_id}")
    return Response(status_code=204)
