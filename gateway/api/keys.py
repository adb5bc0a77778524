"""`/v1/admin/keys`: list, create and revoke API keys, rotate their webhook secrets
(scope `admin`)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Response

from gateway.api.deps import AdminKey, ServicesDep
from gateway.api.http import problems
from gateway.problems import Problem
from gateway.schemas import CreatedKey, KeyInfo, KeyRequest, RotatedSecret

router = APIRouter(tags=["admin"])


@router.get("/v1/admin/keys", response_model=list[KeyInfo], responses=problems(401, 403, 503))
async def list_keys(svc: ServicesDep, _: AdminKey) -> list[dict[str, object]]:
    """Every key, without its hash or secrets, with when it was last used."""
    return await svc.keys.list()


@router.post(
    "/v1/admin/keys",
    response_model=CreatedKey,
    status_code=201,
    responses=problems(400, 401, 403, 413, 422, 503),
)
async def create_key(svc: ServicesDep, _: AdminKey, body: KeyRequest) -> dict[str, object]:
    """A new key; its secret and its webhook secret are in this response only."""
    expires_at = time.time() + body.expires_in_days * 86_400 if body.expires_in_days else None
    secret, record = await svc.keys.create(
        body.name,
        tuple(body.scopes),
        body.tier,
        expires_at=expires_at,
        content_policy=body.content_policy,
    )
    return {**record.public(), "key": secret, "webhook_secret": record.webhook_secrets[0]}


@router.delete("/v1/admin/keys/{key_id}", status_code=204, responses=problems(401, 403, 404, 503))
async def revoke_key(key_id: str, svc: ServicesDep, _: AdminKey) -> Response:
    """Revoke a key by its id: it is refused from now on."""
    if not await svc.keys.revoke(key_id):
        raise Problem(404, "Not Found", f"no API key {key_id}")
    return Response(status_code=204)


@router.post(
    "/v1/admin/keys/{key_id}/webhook-secret",
    response_model=RotatedSecret,
    responses=problems(401, 403, 404, 503),
)
async def rotate_webhook_secret(key_id: str, svc: ServicesDep, _: AdminKey) -> RotatedSecret:
    """A new webhook secret for the key; the previous one keeps signing for a while
    (`FORGE_WEBHOOK_SECRET_OVERLAP_S`), so receivers can switch without a gap."""
    overlap = svc.settings.webhook_secret_overlap_s
    secret = await svc.keys.rotate_webhook_secret(key_id, overlap)
    if secret is None:
        raise Problem(404, "Not Found", f"no API key {key_id}")
    return RotatedSecret(webhook_secret=secret, previous_valid_until=time.time() + overlap)
