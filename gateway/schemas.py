"""Response bodies, the fixed request bodies, and the resolved form of an image request.

The image request bodies themselves (bounds, defaults, scheduler enum) are built from the
model's generation contract in `gateway.bodies`; what is here does not depend on it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

Format = Literal["png", "webp"]
Priority = Literal["priority", "standard", "bulk"]
ItemStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


def _whole_number(value: Any) -> Any:
    """A JSON number without a fraction (2.0) is an integer, as JSON Schema counts them."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer field of a request body: strict (no "5", no true), but 2.0 is 2.
JsonInt = Annotated[int, BeforeValidator(_whole_number)]


def bounded_int(low: int, high: int) -> Any:
    """JsonInt within [low, high], for use inside a union (`bounded_int(0, 9) | None`): the
    bounds come before the validator, so the JSON schema states them as minimum/maximum."""
    return Annotated[int, Field(ge=low, le=high), BeforeValidator(_whole_number)]


class Strict(BaseModel):
    """Unknown fields and type coercion (false as 0.0, "5" as 5) are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ImageSpec(BaseModel):
    """One image to generate, every value resolved (the contract's defaults filled in).

    What the sync API and the job workers hand to Triton, what the cache keys on and what a
    job message carries. `seed` None lets the model draw one (sync requests only: a job's
    seed is drawn at submission so that a redelivered item makes the same image).
    `init_image`, for image-to-image, is the key of the stored image to start from (its
    content hash, so the cache and idempotency keys hold the image's hash), fitted to width x
    height; `strength` is set with it and only with it. `style` names a studio style (a
    LoRA), applied at `style_weight`; `style_version` is its content version when the
    request was resolved, so that the cache and idempotency keys change with its weights.
    """

    prompt: str
    negative_prompt: str
    seed: int | None
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    format: Format
    init_image: str | None = None
    strength: float | None = None
    style: str | None = None
    style_weight: float | None = None
    style_version: str | None = None


class ModelInfo(BaseModel):
    """The exported model that made an image."""

    name: str
    version: str


class Timings(BaseModel):
    """Where a request's time went, in milliseconds."""

    generation_ms: float = Field(description="Triton call, 0 for a cache hit")
    total_ms: float


class ImageResult(BaseModel):
    """A generated (or cached) image: its asset and what made it."""

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
    safety_flagged: bool = Field(
        False,
        description="the model's safety checker flagged the image: what is served is its "
        "blurred or replaced form (as the model is configured); strict API keys are refused",
    )
    content_flags: list[str] = Field(
        default_factory=list,
        description="the content policy's categories the request's text fell in (API keys in "
        "review mode; strict keys are refused instead)",
    )
    init_image: str | None = Field(
        None, description="image-to-image: the key of the asset the image started from"
    )
    strength: float | None = Field(None, description="image-to-image: how far it moved from it")
    style: str | None = Field(None, description="the studio style it was made in")
    style_weight: float | None = Field(None, description="how strongly the style applied")
    style_version: str | None = Field(None, description="the style's content version")


class Upload(BaseModel):
    """An input image stored for image-to-image: its key (`init_image` of a request) and the
    size it was fitted to."""

    id: str = Field(description="the content key: pass it as `init_image`")
    asset_url: str
    width: int
    height: int


class ProblemDetails(BaseModel):
    """RFC 9457 problem details: every error response has this shape."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str
    errors: list[dict[str, object]] | None = None


class KeyRequest(Strict):
    """A new API key: its name, scopes, tier and, optionally, how long it lives."""

    name: str = Field(min_length=1, max_length=100)
    scopes: list[Literal["generate", "admin"]] = Field(default=["generate"], min_length=1)
    tier: Priority = "standard"
    expires_in_days: bounded_int(1, 3650) | None = Field(  # type: ignore[valid-type]
        None, description="the key stops working after this many days"
    )
    content_policy: Literal["strict", "review", "off"] = Field(
        "strict",
        description="players' text the content policy blocks: strict refuses it (player-facing "
        "keys), review lets it through flagged (studio tools), off does not check",
    )


class KeyInfo(BaseModel):
    """An API key as listed (never its secrets)."""

    id: str
    name: str
    scopes: list[str]
    tier: str
    revoked: bool
    source: Literal["api", "file", "dev"] = Field(
        description="made over the API or the CLI, from the keys file, or the dev key"
    )
    created_at: float
    expires_at: float | None
    content_policy: Literal["strict", "review", "off"]
    previous_secret_until: float | None = Field(
        description="after a rotation, the previous webhook secret also signs until then"
    )
    last_used_at: float | None = Field(None, description="to the minute")


class CreatedKey(KeyInfo):
    """A key just made, with its secrets, shown this once."""

    key: str = Field(description="the secret; shown only once")
    webhook_secret: str = Field(
        description="signs the callbacks of this key's jobs (Standard Webhooks); shown only once"
    )


class RotatedSecret(BaseModel):
    """A key's new webhook secret, shown this once."""

    webhook_secret: str
    previous_valid_until: float = Field(
        description="the previous secret also signs callbacks until then"
    )


class JobOptions(Strict):
    """What a job adds to its images: which queue (and, where callbacks are on, a
    `callback_url`: see `gateway.bodies`)."""

    priority: Priority | None = Field(
        None, description="queue to use; at most the API key's tier (default: the tier)"
    )


class StepProgress(BaseModel):
    """How far a running image is: the denoising step just done, of how many."""

    step: int
    total_steps: int
    elapsed_ms: float = Field(description="since the image model started the image")


class JobItem(BaseModel):
    """One image of a job and its state."""

    index: int
    status: ItemStatus
    result: ImageResult | None = None
    error: str | None = None
    attempts: int = 0
    content_flags: list[str] = Field(
        default_factory=list, description="as in the result: the content policy's categories"
    )
    progress: StepProgress | None = Field(None, description="a running item's current step")


class JobStatus(BaseModel):
    """A job: its items and the state derived from them."""

    id: str
    status: ItemStatus
    created_at: float
    updated_at: float
    priority: Priority
    items: list[JobItem]
    items_done: int = Field(description="items finished: succeeded, failed or cancelled")
    items_total: int
    error: str | None = Field(None, description="why the job failed, if it did")
