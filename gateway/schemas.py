"""Request and response bodies of the public API (the OpenAPI document is made from these)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SEED_MAX = 2**63 - 1
Format = Literal["png", "webp"]
Scheduler = Literal["ddim", "euler", "euler_ancestral", "dpmpp_2m", "lcm", "pndm"]


class Strict(BaseModel):
    """Unknown fields and type coercion (false as 0.0, "5" as 5) are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ImageOptions(Strict):
    """How to draw: everything but the words. Absent size: the model's default size."""

    seed: int | None = Field(
        None,
        ge=0,
        le=SEED_MAX,
        description="same seed and parameters, same image; random if absent",
    )
    steps: int = Field(25, ge=1, le=150, description="denoising steps")
    guidance_scale: float = Field(
        7.5, ge=0.0, le=30.0, description="prompt adherence; at most 1 disables guidance"
    )
    width: int | None = Field(None, ge=64, le=1024, multiple_of=8)
    height: int | None = Field(None, ge=64, le=1024, multiple_of=8)
    scheduler: Scheduler = "dpmpp_2m"
    format: Format = "png"


class ImageRequest(ImageOptions):
    prompt: str = Field(
        min_length=1, max_length=2000, description="at most 77 CLIP tokens (longer prompts get 422)"
    )
    negative_prompt: str = Field("", max_length=2000)


class ModelInfo(BaseModel):
    name: str
    version: str


class Timings(BaseModel):
    generation_ms: float = Field(description="Triton call, 0 for a cache hit")
    total_ms: float


class ImageResult(BaseModel):
    id: str = Field(description="the content key of the asset")
    seed: int
    asset_url: str
    width: int
    height: int
    format: Format
    model: ModelInfo
    prompt: str
    negative_prompt: str
    cached: bool
    timings: Timings


class ProblemDetails(BaseModel):
    """RFC 9457 problem details: every error response has this shape."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str
    errors: list[dict[str, object]] | None = None


class KeyRequest(Strict):
    name: str = Field(min_length=1, max_length=100)
    scopes: list[Literal["generate", "admin"]] = Field(default=["generate"], min_length=1)
    tier: Literal["priority", "standard", "bulk"] = "standard"


class KeyInfo(BaseModel):
    id: str
    name: str
    scopes: list[str]
    tier: str
    revoked: bool


class CreatedKey(KeyInfo):
    key: str = Field(description="the secret; shown only once")


Priority = Literal["priority", "standard", "bulk"]
ItemStatus = Literal["queued", "running", "succeeded", "failed"]


class JobOptions(Strict):
    callback_url: str | None = Field(
        None,
        max_length=2000,
        pattern=r"^https?://",
        description="receives the finished job, signed as Standard Webhooks specifies",
    )
    priority: Priority | None = Field(
        None, description="queue to use; at most the API key's tier (default: the tier)"
    )


class ImageJobRequest(JobOptions):
    images: list[ImageRequest] = Field(min_length=1, description="one image per entry")


class JobItem(BaseModel):
    index: int
    status: ItemStatus
    result: ImageResult | None = None
    error: str | None = None
    attempts: int = 0


class JobStatus(BaseModel):
    id: str
    status: ItemStatus
    created_at: float
    updated_at: float
    priority: Priority
    items: list[JobItem]
    error: str | None = Field(None, description="why the job failed, if it did")
