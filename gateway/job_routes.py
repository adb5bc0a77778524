"""Async jobs over HTTP: submit (202 + Location) and poll. Workers do the generating."""

import secrets
import time
from typing import Annotated

from fastapi import APIRouter, Body, Response
from fastapi.responses import JSONResponse
from pydantic import Field, create_model

from gateway import metrics
from gateway.deps import GenerateKey, ServicesDep
from gateway.generation import Job
from gateway.jobs import JobMessage, new_job_id
from gateway.keys import ApiKey
from gateway.problems import Problem
from gateway.ratelimit import cost
from gateway.routes import problems
from gateway.schemas import SEED_MAX, ImageJobRequest, ImageOptions, JobOptions, JobStatus
from gateway.topics import TIERS, Topics

SUBMIT_ERRORS = problems(400, 401, 403, 413, 422, 429, 503)
router = APIRouter()


def topic_for(key: ApiKey, asked: str | None, topics: Topics) -> tuple[str, str]:
    """The request topic: the key's tier, or a lower priority the request asks for."""
    tier = asked or key.tier
    if TIERS.index(tier) < TIERS.index(key.tier):
        raise Problem(403, "Forbidden", f"this API key may use priority {key.tier!r} or lower")
    return tier, topics.requests(tier)


async def submit(svc: ServicesDep, key: ApiKey, jobs: list[Job], options: JobOptions) -> Response:
    settings = svc.settings
    if len(jobs) > settings.max_job_items:
        raise Problem(
            422,
            "Too many items",
            f"{len(jobs)} items; a job holds at most {settings.max_job_items}",
        )
    if options.callback_url and not settings.webhook_secret:
        raise Problem(422, "Callbacks are off", "this deployment has no webhook secret set")
    tier, topic = topic_for(key, options.priority, Topics(settings.topic_prefix))
    size = settings.assumed_size
    units = sum(
        cost(j.options.steps, j.options.width or size, j.options.height or size) for j in jobs
    )
    charge = await svc.limiter.charge(key.id, key.tier, units)
    job_id = new_job_id()
    now = time.time()
    await svc.jobs.create(job_id, key.id, len(jobs), tier, options.callback_url)
    try:
        for index, job in enumerate(jobs):
            # The seed is fixed now, so a redelivered item makes the very same image.
            seed = job.options.seed if job.options.seed is not None else secrets.randbelow(SEED_MAX)
            message = JobMessage(
                job_id=job_id,
                index=index,
                api_key_id=key.id,
                prompt=job.prompt,
                negative_prompt=job.negative_prompt,
                options=job.options.model_copy(update={"seed": seed}),
                submitted_at=now,
                topic=topic,
            )
            await svc.queue.send(topic, message.key, message.model_dump_json().encode())
    except BaseException:
        await svc.jobs.delete(job_id)  # not accepted: the client is told 503, nothing lingers
        raise
    metrics.JOBS_SUBMITTED.labels(topic).inc(len(jobs))
    status = await svc.jobs.status(job_id)
    assert status is not None
    return JSONResponse(
        status.model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/v1/jobs/{job_id}", **charge.headers()},
    )


@router.post(
    "/v1/jobs", status_code=202, response_model=JobStatus, tags=["jobs"], responses=SUBMIT_ERRORS
)
async def create_job(svc: ServicesDep, key: GenerateKey, body: ImageJobRequest) -> Response:
    """Queue images; poll the Location, or get a signed callback when they are done."""
    jobs = [Job(i.prompt, i.negative_prompt, i) for i in body.images]
    return await submit(svc, key, jobs, body)


class WeaponJobRequest(JobOptions):
    weapons: list[ImageOptions] = Field(min_length=1)


def add_weapon_job_route(app_router: APIRouter, weapon_model: type[ImageOptions]) -> None:
    model = create_model(
        "WeaponJobRequest",
        __base__=WeaponJobRequest,
        weapons=(list[weapon_model], Field(min_length=1)),  # type: ignore[valid-type]
    )

    async def create_weapon_job(
        svc: ServicesDep, key: GenerateKey, body: WeaponJobRequest
    ) -> Response:
        """Queue weapons (e.g. variations: the same weapon with neighbouring seeds)."""
        jobs = [Job(*svc.weapons.render(w), w) for w in body.weapons]
        return await submit(svc, key, jobs, body)

    # FastAPI reads the body's model from the annotation: the one built from the templates.
    create_weapon_job.__annotations__["body"] = Annotated[model, Body()]
    app_router.post(
        "/v1/weapons/jobs",
        status_code=202,
        response_model=JobStatus,
        tags=["jobs"],
        responses=SUBMIT_ERRORS,
    )(create_weapon_job)


@router.get(
    "/v1/jobs/{job_id}",
    response_model=JobStatus,
    tags=["jobs"],
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
