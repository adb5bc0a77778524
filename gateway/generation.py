"""From a resolved image request to a stored image: cache, Triton, encoding, asset store.

Used by the sync API and by the Kafka workers, so both produce the same results. Failures
leave as the triton_client's `ModelError`s (or the store's and Redis's own errors): the HTTP
edge and the worker each map them in one place.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import numpy as np

from gateway import metrics
from gateway.assets import AssetStore
from gateway.cache import ResultCache
from gateway.contract import ContractBook
from gateway.input_images import (
    InputImageError,
    Limits,
    header_size,
    normalized_png,
    pixels,
    target_size,
)
from gateway.schemas import ImageResult, ImageSpec, ModelInfo, Timings, Upload
from gateway.triton_client import AsyncTriton, ImageParams, ModelError, Progress

PNG_LEVEL = 1
UNSAFE_IMAGE = "unsafe_image"  # the content policy category of images the model flagged


class ImageFlagged(Exception):
    """The model's safety checker flagged the image, and the request may not have it: the
    image is neither stored nor served."""


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    """PNG or WebP bytes of an HxWx3 uint8 image.

    PNG at zlib level 1: lossless like any level, a few times faster to write than the
    default 6 for slightly larger files (perf/bench_gateway.py measures both).
    """
    from PIL import Image

    buffer = io.BytesIO()
    if fmt == "webp":
        Image.fromarray(pixels).save(buffer, format="WEBP", quality=90, method=4)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=PNG_LEVEL)
    return buffer.getvalue()


def progress_event(progress: Progress) -> tuple[str, dict[str, Any]]:
    """A step of a generation as an event for clients: `progress` (step, total_steps,
    elapsed_ms) or, where the step brought a preview, `preview` (the same, and the
    preview's width, height and image: a PNG data URL)."""
    data: dict[str, Any] = {
        "step": progress.step,
        "total_steps": progress.total_steps,
        "elapsed_ms": round(progress.elapsed_s * 1000, 1),
    }
    if progress.preview is None:
        return "progress", data
    height, width = progress.preview.shape[:2]
    png = base64.b64encode(encode(progress.preview, "png")).decode("ascii")
    image = f"data:image/png;base64,{png}"
    return "preview", data | {"width": width, "height": height, "image": image}


# What a result repeats of its request.
ECHOED = {
    "prompt",
    "negative_prompt",
    "init_image",
    "strength",
    "style",
    "style_weight",
    "style_version",
}


def cache_params(spec: ImageSpec, seed: int) -> dict[str, Any]:
    """What identifies an image for the cache, besides the model version (an input image by
    its key, the hash of its bytes; text-only requests keep the keys they always had)."""
    return spec.model_dump(exclude={"seed"}, exclude_none=True) | {"seed": seed}


class Generator:
    """Makes or finds the image of an ImageSpec and stores it under its content key."""

    def __init__(
        self,
        triton: AsyncTriton,
        contract: ContractBook,
        assets: AssetStore,
        cache: ResultCache,
        public_base_url: str,
        limits: Limits,
    ) -> None:
        self.triton, self.contract, self.assets, self.cache = triton, contract, assets, cache
        self.public_base_url = public_base_url.rstrip("/")
        self.limits = limits

    def asset_url(self, key: str) -> str:
        """The public URL of an asset (relative, or under the CDN's base URL)."""
        return f"{self.public_base_url}/assets/{key}"

    async def upload(self, data: bytes) -> Upload:
        """Store an input image for image-to-image, checked and fitted to the size the
        contract's rule gives it (`gateway.input_images`); InputImageError if refused."""
        contract = self.contract.current
        png, (width, height) = await asyncio.to_thread(normalized_png, data, contract, self.limits)
        key = await self.assets.put(png, "png")
        return Upload(id=key, asset_url=self.asset_url(key), width=width, height=height)

    async def init_image(self, key: str) -> bytes:
        """The stored bytes of an input image, or InputImageError (422) naming the key."""
        data = await self.assets.get(key)
        if data is None:
            raise InputImageError(
                422,
                "Unknown input image",
                f"no image {key} is stored: upload it (POST /v1/uploads) or name an image "
                "the forge made",
            )
        return data

    async def init_size(self, key: str) -> tuple[int, int]:
        """(width, height) of a stored input image, or InputImageError (422) naming the key."""
        return header_size(await self.init_image(key))

    async def sized(self, spec: ImageSpec, given: set[str]) -> ImageSpec:
        """`spec` with the width and height of an image made from its init_image (see
        `fitted`); InputImageError if none is stored under the key."""
        if spec.init_image is None:
            return spec
        return self.fitted(spec, given, await self.init_size(spec.init_image))

    def fitted(self, spec: ImageSpec, given: set[str], source: tuple[int, int]) -> ImageSpec:
        """`spec` with the width and height of an image made from a `source`-sized input
        image: those of the request (`given`: the fields the client set) where given, the
        rest from the input image (`gateway.input_images.target_size`)."""
        width, height = target_size(
            source,
            spec.width if "width" in given else None,
            spec.height if "height" in given else None,
            self.contract.current,
        )
        return spec.model_copy(update={"width": width, "height": height})

    async def triton_params(self, spec: ImageSpec) -> ImageParams:
        """The model's inputs for a resolved request: every value explicit but a missing
        seed; an input image as its pixels, fitted to the request's size."""
        params = spec.model_dump(exclude={"format", "init_image", "style_version"})
        if spec.init_image is None:
            return ImageParams(**params)
        data = await self.init_image(spec.init_image)
        size = (spec.width, spec.height)
        return ImageParams(**params, image=await asyncio.to_thread(pixels, data, size, self.limits))

    def model(self) -> ModelInfo:
        """The model in force (UnknownContract if it was never seen)."""
        contract = self.contract.current
        return ModelInfo(name=contract.model_name, version=contract.model_version)

    async def cached(self, spec: ImageSpec, *, refuse_flagged: bool) -> ImageResult | None:
        """The stored result for a request with an explicit seed made before, if any;
        ImageFlagged if the model flagged it and `refuse_flagged`."""
        if spec.seed is None:
            return None
        start = time.perf_counter()
        model = self.model()
        hit = await self.cache.get(model.version, cache_params(spec, spec.seed))
        if hit is not None and await self.assets.exists(hit["id"]):
            if hit.get("safety_flagged") and refuse_flagged:
                raise ImageFlagged
            metrics.CACHE_REQUESTS.labels("hit").inc()
            total = (time.perf_counter() - start) * 1000
            return ImageResult(
                **{**hit, "cached": True, "timings": Timings(generation_ms=0, total_ms=total)}
            )
        metrics.CACHE_REQUESTS.labels("miss").inc()
        return None

    async def generate(self, spec: ImageSpec, *, source: str, refuse_flagged: bool) -> ImageResult:
        """Call Triton, store the image, remember it in the cache."""
        generation = self.generation(spec, source=source, refuse_flagged=refuse_flagged)
        async with aclosing(generation) as events:
            async for event in events:
                if isinstance(event, ImageResult):
                    return event
        raise AssertionError("a generation ends with its result or an exception")

    async def generation(
        self,
        spec: ImageSpec,
        *,
        source: str,
        refuse_flagged: bool,
        preview_every: int | None = None,
    ) -> AsyncGenerator[Progress | ImageResult, None]:
        """The image of `spec`, stored and cached, as the last event; streamed from the
        model (`preview_every` not None: a Progress after every step, with a preview every
        `preview_every` steps, 0 for none) or in one call. Closing the iteration early
        cancels the model's work. An image the model's safety checker flagged is stored
        marked `safety_flagged`, or, if `refuse_flagged`, raises ImageFlagged unstored."""
        start = time.perf_counter()
        outcome = "error"
        try:
            model = self.model()
            try:
                params = await self.triton_params(spec)
            except InputImageError:
                outcome = "invalid"
                raise
            try:
                if preview_every is None:
                    (image,) = await self.triton.generate([params])
                else:
                    async with aclosing(self.triton.stream(params, preview_every)) as stream:
                        async for event in stream:
                            if isinstance(event, Progress):
                                yield event
                            else:
                                image = event
            except ModelError as exc:
                metrics.TRITON_ERRORS.labels(exc.status or type(exc).__name__).inc()
                outcome = exc.outcome
                raise
            if image.flagged:
                refused = "refused" if refuse_flagged else "flagged"
                metrics.CONTENT_POLICY.labels(UNSAFE_IMAGE, refused).inc()
                if refuse_flagged:
                    outcome = "flagged"
                    raise ImageFlagged
            generated = time.perf_counter()
            data = await asyncio.to_thread(encode, image.pixels, spec.format)
            key = await self.assets.put(data, spec.format)
            height, width = image.pixels.shape[:2]
            result = ImageResult(
                id=key,
                seed=image.seed,
                asset_url=self.asset_url(key),
                width=width,
                height=height,
                format=spec.format,
                model=model,
                **spec.model_dump(include=ECHOED),
                cached=False,
                safety_flagged=image.flagged,
                timings=Timings(
                    generation_ms=(generated - start) * 1000,
                    total_ms=(time.perf_counter() - start) * 1000,
                ),
            )
            await self.cache.put(
                model.version,
                cache_params(spec, image.seed),
                result.model_dump(exclude={"cached", "timings", "content_flags"}),
            )
            outcome = "success"
            yield result
        except (asyncio.CancelledError, GeneratorExit):
            if outcome != "success":  # closed after its result is not a cancellation
                outcome = "cancelled"
            raise
        finally:
            metrics.GENERATION_SECONDS.labels(source, outcome).observe(time.perf_counter() - start)
