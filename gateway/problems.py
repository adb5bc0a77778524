"""Every error leaves the gateway as RFC 9457 problem details, mapped here and nowhere else."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.assets import StoreUnavailable
from gateway.contract import UnknownContract
from gateway.generation import UNSAFE_IMAGE, ImageFlagged
from gateway.input_images import InputImageError
from gateway.queue import QueueUnavailable
from gateway.triton_client import (
    ModelCancelled,
    ModelError,
    ModelFailed,
    ModelRejected,
    ModelUnavailable,
)

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
POLICY_PROBLEM = "/problems/content-policy"  # the problem type of content policy refusals


class Problem(Exception):
    """An error with an HTTP status, a short title and a detail for the client."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str = "",
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or title)
        self.status, self.title, self.detail = status, title, detail
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance: str) -> dict[str, Any]:
        """The problem details, `instance` being the request's path."""
        return {
            "type": "about:blank",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
            **self.extra,
        }

    def response(self, instance: str) -> JSONResponse:
        """The problem details response, `instance` being the request's path."""
        return JSONResponse(
            self.body(instance),
            status_code=self.status,
            headers=self.headers,
            media_type=PROBLEM_JSON,
        )


def policy_problem(categories: list[str], where: str = "") -> Problem:
    """422 for a request the content policy refuses: its categories, never the text."""
    what = "the image" if categories == [UNSAFE_IMAGE] else f"the text{where}"
    return Problem(
        422,
        "Content policy",
        f"{what} is not allowed by this studio's content policy "
        f"(category: {', '.join(categories)})",
        type=POLICY_PROBLEM,
        categories=categories,
    )


def unavailable(detail: str, retry_after_s: int) -> Problem:
    """503 with Retry-After: a dependency is away, the client should try again."""
    return Problem(503, "Service Unavailable", detail, headers={"Retry-After": str(retry_after_s)})


def from_model(exc: ModelError, retry_after_s: int) -> Problem:
    """The model's refusal is the client's fault (422); its absence 503; a failure 502."""
    if isinstance(exc, ModelRejected):
        return Problem(422, "Invalid generation parameters", exc.message)
    if isinstance(exc, ModelUnavailable):
        return unavailable(f"the image model is unavailable: {exc.message}", retry_after_s)
    if isinstance(exc, ModelCancelled):
        return Problem(499, "Client Closed Request", exc.message)
    assert isinstance(exc, ModelFailed)
    return Problem(502, "Image generation failed", exc.message)


# The errors `as_problem` maps to a client-facing status other than 500.
MAPPED = (
    Problem,
    ImageFlagged,
    InputImageError,
    ModelError,
    UnknownContract,
    StoreUnavailable,
    QueueUnavailable,
    RedisError,
)


def as_problem(exc: Exception, instance: str, retry_after_s: int) -> Problem:
    """Any error raised while serving `instance` (a path) as the problem the client sees:
    a dependency away is 503 with Retry-After, anything unforeseen 500 (and logged)."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, ImageFlagged):
        return policy_problem([UNSAFE_IMAGE])
    if isinstance(exc, InputImageError):
        return Problem(exc.status, exc.title, exc.detail)
    if isinstance(exc, ModelError):
        return from_model(exc, retry_after_s)
    if isinstance(exc, UnknownContract):
        return unavailable(str(exc), retry_after_s)
    if isinstance(exc, StoreUnavailable):
        log.warning("asset store unavailable on %s: %s", instance, exc)
        return unavailable("the asset store is unavailable", retry_after_s)
    if isinstance(exc, QueueUnavailable):
        return unavailable(f"the job queue is unavailable ({exc})", retry_after_s)
    if isinstance(exc, RedisError):
        log.warning("redis unavailable on %s: %r", instance, exc)
        return unavailable(f"state store unavailable ({type(exc).__name__})", retry_after_s)
    log.error("unhandled error on %s", instance, exc_info=exc)
    return Problem(500, "Internal Server Error", "an unexpected error; it was logged")


def install(app: FastAPI, retry_after_s: int) -> None:
    """Register the handlers that turn every error into problem details."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # A validator's own message, without pydantic's "Value error, " before it.
        errors = [
            {
                "loc": list(e["loc"]),
                "msg": e["msg"].removeprefix("Value error, "),
                "type": e["type"],
            }
            for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        return Problem(422, "Invalid request", detail, errors=errors).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405 and (allowed := _allowed_methods(request)):
            headers["Allow"] = ", ".join(allowed)  # every method of the path, not one route's
        problem = Problem(
            exc.status_code, _title(exc.status_code), str(exc.detail), headers=headers
        )
        return problem.response(request.url.path)

    async def _mapped(request: Request, exc: Exception) -> JSONResponse:
        return as_problem(exc, request.url.path, retry_after_s).response(request.url.path)

    # Each mapped class by name, so that Starlette answers it inside the middleware stack;
    # Exception itself (the 500s) is answered by its outermost middleware.
    for mapped in (*MAPPED, Exception):
        app.add_exception_handler(mapped, _mapped)


def _allowed_methods(request: Request) -> list[str]:
    """The methods the OpenAPI document gives the request's path (what clients are told)."""
    for template, operations in request.app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), request.url.path):
            return sorted(method.upper() for method in operations)
    return []


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
