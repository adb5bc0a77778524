"""Async jobs: submit (`POST /v1/jobs`, `POST /v1/weapons/jobs`: 202 + Location) and poll.

Submission bodies are shaped by the generation contract, like the sync ones; workers do the
generating.
"""

from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from gateway import metrics
from gateway.api.deps import GenerateKey, ImageJobBody, Parsed, ServicesDep, WeaponJobBody
from gateway.api.http import IdempotencyKey, problems
from gateway.bodies import contract_body
from gateway.callback_urls import UnsafeCallback
from gateway.idempotency import Claim
from gateway.jobs import JobMessage, new_job_id
from gateway.keys import ApiKey
from gateway.problems import Problem
from gateway.ratelimit import cost
from gateway.schemas import ImageSpec, JobOptions, JobStatus
from gateway.services import Services
from gateway.topics import TIERS, Topics

SUBMIT_ERRORS = problems(400, 401, 403, 404, 409, 413, 422, 429, 503)
router = APIRouter(tags=["jobs"])


def topic_for(key: ApiKey, asked: str | None, topics: Topics) -> tuple[str, str]:
    """The request topic: the key's tier, or a lower priority the request asks for."""
    tier = asked or key.tier
    if TIERS.index(tier) < TIERS.index(key.tier):
        raise Problem(403, "Forbidden", f"this API key may use priority {key.tier!r} or lower")
    return tier, topics.requests(tier)


async def submit(
    request: Request,
    svc: Services,
    key: ApiKey,
    parsed: Parsed,
    specs: list[ImageSpec],
    idempotency_key: str | None,
) -> Response:
    """Charge, record the job, and queue one message per image (seeds fixed now); with an
    Idempotency-Key, a retried submission gets the job of the first."""
    options = parsed.body
    assert isinstance(options, JobOptions)
    callback_url = getattr(options, "callback_url", None)
    if callback_url is not None:
        await check_callback(svc, key, callback_url)
    claim = svc.idempotency.claim(
        key.id, idempotency_key, request.url.path, options.model_dump(mode="json")
    )
    stored = await claim.begin()
    if stored is not None:
        status = await svc.jobs.status(str(stored["job_id"]))
        if status is None:
            raise Problem(404, "Not Found", f"job {stored['job_id']} of this key has expired")
        return accepted(status, {"Idempotent-Replayed": "true"})
    try:
        status, headers = await enqueue(svc, key, parsed, specs, options, claim)
    except BaseException:
        await claim.release()
        raise
    return accepted(status, headers)


async def check_callback(svc: Services, key: ApiKey, url: str) -> None:
    """422 if the callback would reach a non-public address, or the key cannot sign it."""
    assert svc.callbacks is not None  # the body has no callback_url where callbacks are off
    if not key.signing_secrets(time.time()):
        raise Problem(422, "No webhook secret", "this API key has no webhook secret to sign with")
    try:
        await svc.callbacks.check_resolved(url)
    except UnsafeCallback as exc:
        raise Problem(422, "Callback URL refused", str(exc)) from exc


def accepted(status: JobStatus, headers: dict[str, str]) -> Response:
    """202 with the job's status and its Location."""
    return JSONResponse(
        status.model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/v1/jobs/{status.id}", **headers},
    )


async def enqueue(
    svc: Services,
    key: ApiKey,
    parsed: Parsed,
    specs: list[ImageSpec],
    options: JobOptions,
    claim: Claim,
) -> tuple[JobStatus, dict[str, str]]:
    """Charge the job, record it (with its Idempotency-Key's result) and send its messages:
    the job as recorded and the RateLimit headers. If the messages cannot be sent, the job,
    the key's claim and the charge are all given back, and the client is told 503."""
    bodies = parsed.bodies
    tier, topic = topic_for(key, options.priority, Topics(svc.settings.topic_prefix))
    units = [cost(spec, bodies.contract) for spec in specs]
    charge = await svc.limiter.charge(key.id, key.tier, sum(units))
    job_id = new_job_id()
    now = time.time()
    messages = [
        JobMessage(
            job_id=job_id,
            index=index,
            api_key_id=key.id,
            # The seed is fixed now, so a redelivered item makes the very same image.
            spec=spec
            if spec.seed is not None
            else spec.model_copy(update={"seed": secrets.randbelow(bodies.contract.max_seed + 1)}),
            submitted_at=now,
            tier=tier,
            units=units[index],
        )
        for index, spec in enumerate(specs)
    ]
    status = await svc.jobs.create(
        job_id,
        key.id,
        messages,
        tier,
        getattr(options, "callback_url", None),
        within=lambda pipe: claim.record(pipe, {"job_id": job_id}),
    )
    try:
        for message in messages:
            await svc.queue.send(topic, message.key, message.model_dump_json().encode())
    except BaseException:
        # Not accepted: nothing lingers. Should Redis fail here too, the job stays recorded
        # and the sweeper sends it later: a retry with the same Idempotency-Key finds it.
        await svc.jobs.delete(job_id, within=claim.forget)
        await svc.limiter.refund(key.id, key.tier, sum(units))
        raise
    metrics.JOBS_SUBMITTED.labels(topic).inc(len(specs))
    return status, charge.headers()


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=JobStatus,
    responses=SUBMIT_ERRORS,
    openapi_extra=contract_body("ImageJobRequest"),
)
async def create_job(
    request: Request,
    svc: ServicesDep,
    key: GenerateKey,
    parsed: ImageJobBody,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Queue images; poll the Location, or get a signed callback when they are done."""
    specs = parsed.bodies.image_job_specs(parsed.body)
    return await submit(request, svc, key, parsed, specs, idempotency_key)


@router.post(
    "/v1/weapons/jobs",
    status_code=202,
    response_model=JobStatus,
    responses=SUBMIT_ERRORS,
    openapi_extra=contract_body("WeaponJobRequest"),
)
async def create_weapon_job(
    request: Request,
    svc: ServicesDep,
    key: GenerateKey,
    parsed: WeaponJobBody,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Queue weapons (e.g. variations: the same weapon with neighbouring seeds)."""
    specs = parsed.bodies.weapon_job_specs(parsed.body)
    return await submit(request, svc, key, parsed, specs, idempotency_key)


@router.get(
    "/v1/jobs/{job_id}",
    response_model=JobStatus,
    responses=problems(401, 403, 404, 503),
)
async def get_job(job_id: str, svc: ServicesDep, key: GenerateKey) -> JobStatus:
    """queued, running, succeeded (with asset URLs) or failed (with a reason)."""
    meta = await svc.jobs.meta(job_id)
    if meta is None or meta["api_key_id"] != key.id:  # other keys' jobs do not exist for you
        raise Problem(404, "Not Found", f"no job {job_id}")
    status = await svc.jobs.status(job_id)
    assert status is not None
    return status
