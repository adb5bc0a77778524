"""A request's input image for image-to-image: stored as an upload (charged, checked,
fitted, kept by its content), sent as a file of its own or inside a multipart request.

An upload is checked, fitted to an allowed size and stored once by its content, as any
image the forge made (`gateway.input_images` says how); its key is what requests and jobs
name as `init_image`. An upload costs UPLOAD_UNITS of the key's rate limit, refused or not.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from gateway.keys import ApiKey
from gateway.problems import Problem
from gateway.schemas import Upload
from gateway.services import Services

UPLOAD_UNITS = 1  # an upload's charge: the least a generation costs
MULTIPART = "multipart/form-data"


async def store(svc: Services, key: ApiKey, data: bytes) -> tuple[Upload, dict[str, str]]:
    """Charge an upload, then check, fit and store it: the upload and the RateLimit headers."""
    charge = await svc.limiter.charge(key.id, key.tier, UPLOAD_UNITS)
    return await svc.generator.upload(data), charge.headers()


def is_multipart(request: Request) -> bool:
    """Whether the request's body is multipart/form-data."""
    return request.headers.get("content-type", "").startswith(MULTIPART)


async def multipart_body(request: Request, svc: Services, key: ApiKey) -> Any:
    """The JSON body of a multipart request (field `request`), its `init_image` the image
    sent as the file field `image`, stored as an upload."""
    async with request.form(max_files=1, max_fields=1) as form:
        text, file = form.get("request"), form.get("image")
        if not isinstance(text, str) or not isinstance(file, UploadFile):
            raise Problem(
                422,
                "Invalid request",
                "a multipart request sends its JSON body as the field `request` and the "
                "input image as the file field `image`",
            )
        data = await file.read()
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise Problem(422, "Invalid request", f"the field `request` is not JSON: {exc}") from exc
    if isinstance(body, dict):
        if "init_image" in body:
            raise Problem(
                422,
                "Invalid request",
                "send the input image as the file `image` or its key as init_image, not both",
            )
        upload, _ = await store(svc, key, data)
        body["init_image"] = upload.id
    return body
