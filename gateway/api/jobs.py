"""Async jobs: submit (`POST /v1/jobs`, `POST /v1/weapons/jobs`: 202 + Location), poll,
watch (server-sent events) and cancel.

Submission bodies are shaped by the generation contract, like the sync ones; workers do the
generating.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent

from gateway import metrics
from gateway.api.deps import GenerateKey, ImageJobBody, Parsed, ServicesDep, WeaponJobBody
from gateway.api.http import EVENT_STREAM, IdempotencyKey, LastEventId, problems
from gateway.api.policy import covered, screen
from gateway.bodies import contract_body
from gateway.callback_urls import UnsafeCallback
from gateway.idempotency import Claim, claimed
from gateway.input_images import InputImageError
from gateway.jobs import TERMINAL, JobMessage, new_job_id
from gateway.keys import ApiKey
from gateway.problems import Problem
from gateway.ratelimit import cost
from gateway.schemas import ImageSpec, JobOptions, JobStatus
from gateway.services import Services
from gateway.topics import TIERS, Topics

EVENT_ID = re.compile(r"\d{1,20}-\d{1,20}")  # a Redis stream entry id
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
    items: list[BaseModel],
    specs: list[ImageSpec],
    idempotency_key: str | None,
) -> Response:
    """Screen the items' text, charge, record the job, and queue one message per image
    (seeds fixed now); with an Idempotency-Key, a retried submission gets the job of the
    first."""
    flags = screen(svc, key, request.url.path, items)
    specs = [covered(svc, key, spec) for spec in specs]
    specs = await sized(svc, items, specs)
    options = parsed.body
    assert isinstance(options, JobOptions)
    callback_url = getattr(options, "callback_url", None)
    if callback_url is not None:
        await check_callback(svc, key, callback_url)
    claim = svc.idempotency.claim(
        key.id, idempotency_key, request.url.path, claimed(options, specs)
    )
    stored = await claim.begin()
    if stored is not None:
        status = await svc.jobs.status(str(stored["job_id"]))
        if status is None:
            raise Problem(404, "Not Found", f"job {stored['job_id']} of this key has expired")
        return accepted(status, {"Idempotent-Replayed": "true"})
    try:
        status, headers = await enqueue(svc, key, parsed, specs, flags, options, claim)
    except BaseException:
        await claim.release()
        raise
    return accepted(status, headers)


async def sized(svc: Services, items: list[BaseModel], specs: list[ImageSpec]) -> list[ImageSpec]:
    """The items' specs sized by their init_images (`Generator.fitted`), each stored image
    read once however many items name it; a missing one is refused at submission, naming
    the first item that names it."""
    sources: dict[str, tuple[int, int]] = {}
    for index, spec in enumerate(specs):
        if spec.init_image is None or spec.init_image in sources:
            continue
        try:
            sources[spec.init_image] = await svc.generator.init_size(spec.init_image)
        except InputImageError as exc:
            raise InputImageError(exc.status, exc.title, f"item {index}: {exc.detail}") from exc
    return [
        spec
        if spec.init_image is None
        else svc.generator.fitted(spec, item.model_fields_set, sources[spec.init_image])
        for item, spec in zip(items, specs, strict=True)
    ]


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
    flags: list[list[str]],
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
            content_policy=key.content_policy,
        )
        for index, spec in enumerate(specs)
    ]
    status = await svc.jobs.create(
        job_id,
        key.id,
        messages,
        tier,
        getattr(options, "callback_url", None),
        flags,
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
    body = parsed.body
    specs = parsed.bodies.image_job_specs(body)
    return await submit(request, svc, key, parsed, body.images, specs, idempotency_key)


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
    body = parsed.body
    specs = parsed.bodies.weapon_job_specs(body)
    return await submit(request, svc, key, parsed, body.weapons, specs, idempotency_key)


async def owned(svc: Services, key: ApiKey, job_id: str) -> dict[str, Any]:
    """The job's meta; 404 if there is no such job of this key (other keys' jobs do not
    exist for it)."""
    meta = await svc.jobs.meta(job_id)
    if meta is None or meta["api_key_id"] != key.id:
        raise Problem(404, "Not Found", f"no job {job_id}")
    return meta


@router.get(
    "/v1/jobs/{job_id}",
    response_model=JobStatus,
    responses=problems(401, 403, 404, 503),
)
async def get_job(job_id: str, svc: ServicesDep, key: GenerateKey) -> JobStatus:
    """queued, running (each running item with its current step), succeeded (with asset
    URLs), failed (with a reason) or cancelled."""
    await owned(svc, key, job_id)
    status = await svc.jobs.status(job_id)
    assert status is not None
    return status


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=JobStatus,
    responses=problems(401, 403, 404, 409, 503),
)
async def cancel_job(job_id: str, svc: ServicesDep, key: GenerateKey) -> JobStatus:
    """Cancel the job: its queued items are not made and its running items stop at their
    next step; finished items keep their results. The job ends `cancelled` (its callback
    says so), and its queued items' charge is given back. Cancelling a cancelled job again
    changes nothing; a job that succeeded or failed cannot be cancelled (409)."""
    meta = await owned(svc, key, job_id)
    cancelled = await svc.jobs.cancel(job_id, meta)
    status = await svc.jobs.status(job_id)
    assert status is not None
    if not cancelled and status.status != "cancelled":
        raise Problem(409, "Conflict", f"job {job_id} has {status.status} already")
    queued = [index for index, was in cancelled.items() if was == "queued"]
    units = [m.units for m in [await svc.jobs.message(job_id, i) for i in queued] if m]
    if units:
        await svc.limiter.refund(key.id, key.tier, sum(units))
    for was in cancelled.values():
        metrics.JOB_ITEMS_CANCELLED.labels(was).inc()
    return status


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": (
                "server-sent events, each with an id: `item` when an item's state changes "
                "(`index` and the item's state), `progress` as running items advance "
                "(`index`, `step`, `total_steps`, `elapsed_ms`), `preview` every "
                "FORGE_JOB_PREVIEW_EVERY steps (the same and `width`, `height`, `image`: a "
                "small PNG data URL); once the job has finished, `status` (the job, as GET "
                "/v1/jobs/{id} answers) ends the stream. A reconnecting client sends "
                "Last-Event-ID and gets the events after it (of the newest "
                "FORGE_JOB_EVENTS_MAX kept)."
            ),
            "content": {EVENT_STREAM: {}},
        },
        **problems(401, 403, 404, 503),
    },
)
async def job_events(
    job_id: str, svc: ServicesDep, key: GenerateKey, last_event_id: LastEventId = None
) -> EventSourceResponse:
    """Watch a job: its items' states, steps and previews as they happen."""
    await owned(svc, key, job_id)
    after = last_event_id if last_event_id and EVENT_ID.fullmatch(last_event_id) else "0"
    return EventSourceResponse(follow(svc, job_id, after), ping=15)


async def follow(svc: Services, job_id: str, after: str) -> AsyncIterator[ServerSentEvent]:
    """The job's events after the id `after`, as they are written, then its status once it
    has finished (or nothing more, if it expired meanwhile). Each state write adds its
    event in the same atomic step, so the events read after seeing the job finished
    include every one it had."""
    while True:
        status = await svc.jobs.status(job_id)
        if status is None:
            return
        finished = status.status in TERMINAL
        events = await svc.jobs.events(job_id, after, None if finished else 2000)
        for event_id, name, data in events:
            yield ServerSentEvent(id=event_id, event=name, data=data)
            after = event_id
        if finished and not events:
            yield ServerSentEvent(event="status", data=status.model_dump_json())
            return
