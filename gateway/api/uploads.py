"""`POST /v1/uploads`: input images for image-to-image, stored once by their content."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, UploadFile
from fastapi.responses import JSONResponse

from gateway.api.deps import GenerateKey, ServicesDep
from gateway.api.http import problems
from gateway.api.inputs import store
from gateway.schemas import Upload

router = APIRouter(tags=["generate"])


@router.post(
    "/v1/uploads",
    status_code=201,
    response_model=Upload,
    responses=problems(400, 401, 403, 413, 415, 422, 429, 503),
)
async def upload_image(
    svc: ServicesDep,
    key: GenerateKey,
    file: Annotated[UploadFile, File(description="a PNG, JPEG or WebP image")],
) -> JSONResponse:
    """Store an input image for image-to-image; its `id` is the `init_image` of requests
    and jobs. Fitted to the size the model's rules give it: its aspect ratio at the area of
    the model's default size, each side a multiple of the size step within the bounds."""
    upload, headers = await store(svc, key, await file.read())
    return JSONResponse(
        upload.model_dump(), status_code=201, headers={"Location": upload.asset_url, **headers}
    )
