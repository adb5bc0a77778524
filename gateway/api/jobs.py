"""Async jobs: submit (`POST /v1/jobs`, `POST /v1/weapons/jobs`: 202 + Location) and poll.

Submission bodies are shaped by the generation contract, like the sync ones; workers do the
generating.
"""

from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from gateway import metrics
from gateway.api.deps import GenerateKey, ImageJobBody, Parsed, ServicesDep, WeaponJobBody
from gateway.api.http import problems
from gateway.bodies import contract_body
from gateway.jobs import JobMessage, new_job_id
from gateway.keys import ApiKey
from gateway.problems import Problem
from gateway.ratelimit import cost
from gateway.schemas import ImageSpec, JobOptions, JobStatus
from gateway.services import Services
from gateway.topics import TIERS, Topics

SUBMIT_ERRORS = problems(400, 401, 403, 413, 422, 429, 503)
router = APIRouter(tags=["jobs"])


def topic_for(key: ApiKey, asked: str | None, topics: Topics) -> tuple[str, str]:
    """The request topic: the key's tier, or a lower priority the request asks for."""
    tier = asked or key.tier
    if TIERS.index(tier) < TIERS.index(key.tier):
        raise Problem(403, "Forbidden", f"this API key may use priority {key.tier!r} or lower")
    return tier, topics.requests(tier)


async def submit(svc: Services, key: ApiKey, parsed: Parsed, specs: list[ImageSpec]) -> Response:
    """Charge, record the job, and queue one message per image (seeds fixed now)."""
    settings, bodies, options = svc.settings, parsed.bodies, parsed.body
    assert isinstance(options, JobOptions)
    if options.callback_url and not settings.webhook_secret:
        raise Problem(422, "Callbacks are off", "this deployment has no webhook secret set")
    tier, topic = topic_for(key, options.priority, Topics(settings.topic_prefix))
    charge = await svc.limiter.charge(
        key.id, key.tier, sum(cost(spec, bodies.contract) for spec in specs)
    )
    job_id = new_job_id()
    now = time.time()
    await svc.jobs.create(job_id, key.id, len(specs), tier, options.callback_url)
    try:
        for index, spec in enumerate(specs):
            # The seed is fixed now, so a redelivered item makes the very same image.
            if spec.seed is None:
                spec = spec.model_copy(
                    update={"seed": secrets.randbelow(bodies.contract.max_seed + 1)}
                )
            message = JobMessage(
                job_id=job_id,
                index=index,
                api_key_id=key.id,
                spec=spec,
                submitted_at=now,
                topic=topic,
            )
            await svc.queue.send(topic, message.key, message.model_dump_json().encode())
    except BaseException:
        await svc.jobs.delete(job_id)  # not accepted: the client is told 503, nothing lingers
        raise
    metrics.JOBS_SUBMITTED.labels(topic).inc(len(specs))
    status = await svc.jobs.status(job_id)
    assert status is not None
    return JSONResponse(
        status.model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/v1/jobs/{job_id}", **charge.headers()},
    )


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=JobStatus,
    responses=SUBMIT_ERRORS,
    openapi_extra=contract_body("ImageJobRequest"),
)
async def create_job(svc: ServicesDep, key: GenerateKey, parsed: ImageJobBody) -> Response:
    """Queue images; poll the Location, or get a signed callback when they are done."""
    return await submit(svc, key, parsed, parsed.bodies.image_job_specs(parsed.body))


@router.post(
    "/v1/weapons/jobs",
    status_code=202,
    response_model=JobStatus,
    responses=SUBMIT_ERRORS,
    openapi_extra=contract_body("WeaponJobRequest"),
)
async def create_weapon_job(svc: ServicesDep, key: GenerateKey, parsed: WeaponJobBody) -> Response:
    """Queue weapons (e.g. variations: the same weapon with neighbouring seeds)."""
    return await submit(svc, key, parsed, parsed.bodies.weapon_job_specs(parsed.body))


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
