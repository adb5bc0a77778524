"""From a validated request to a stored image: cache, Triton, encoding, asset store.

Used by the sync API and by the Kafka workers, so both produce the same results.
"""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.utils import InferenceServerException

from gateway import metrics
from gateway.assets import AssetStore
from gateway.cache import ResultCache
from gateway.problems import from_triton
from gateway.schemas import ImageOptions, ImageResult, ModelInfo, Timings
from gateway.triton_client import AsyncTriton, ImageParams


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    if fmt == "webp":
        Image.fromarray(pixels).save(buffer, format="WEBP", quality=90, method=4)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Job:
    """What to generate: words plus options (a /v1/images or /v1/weapons body, resolved)."""

    prompt: str
    negative_prompt: str
    options: ImageOptions

    def params(self, seed: int | None) -> ImageParams:
        o = self.options
        return ImageParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            seed=seed,
            steps=o.steps,
            guidance_scale=o.guidance_scale,
            width=o.width,
            height=o.height,
            scheduler=o.scheduler,
        )

    def cache_params(self, seed: int) -> dict[str, Any]:
        return {
            **self.options.model_dump(exclude={"seed"}),
            "seed": seed,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
        }


class Generator:
    def __init__(
        self,
        triton: AsyncTriton,
        assets: AssetStore,
        cache: ResultCache,
        public_base_url: str,
        retry_after_s: int,
    ) -> None:
        self.triton, self.assets, self.cache = triton, assets, cache
        self.public_base_url = public_base_url.rstrip("/")
        self.retry_after_s = retry_after_s

    def asset_url(self, key: str) -> str:
        return f"{self.public_base_url}/assets/{key}"

    async def model(self) -> ModelInfo:
        try:
            identity = await self.triton.identity()
        except InferenceServerException as exc:
            raise from_triton(exc, self.retry_after_s) from exc
        return ModelInfo(name=identity.name, version=identity.version)

    async def cached(self, job: Job) -> ImageResult | None:
        """The stored result for a request with an explicit seed made before, if any."""
        if job.options.seed is None:
            return None
        start = time.perf_counter()
        model = await self.model()
        hit = await self.cache.get(model.version, job.cache_params(job.options.seed))
        if hit is not None and await self.assets.exists(hit["id"]):
            metrics.CACHE_REQUESTS.labels("hit").inc()
            total = (time.perf_counter() - start) * 1000
            return ImageResult(
                **{**hit, "cached": True, "timings": Timings(generation_ms=0, total_ms=total)}
            )
        metrics.CACHE_REQUESTS.labels("miss").inc()
        return None

    async def generate(self, job: Job, *, source: str) -> ImageResult:
        """Call Triton, store the image, remember it in the cache; errors as Problems."""
        start = time.perf_counter()
        outcome = "error"
        try:
            model = await self.model()
            try:
                (image,) = await self.triton.generate([job.params(job.options.seed)])
            except InferenceServerException as exc:
                metrics.TRITON_ERRORS.labels(str(exc.status())).inc()
                problem = from_triton(exc, self.retry_after_s)
                outcome = "invalid" if problem.status == 422 else "unavailable"
                raise problem from exc
            generated = time.perf_counter()
            data = await asyncio.to_thread(encode, image.pixels, job.options.format)
            key = await self.assets.put(data, job.options.format)
            height, width = image.pixels.shape[:2]
            result = ImageResult(
                id=key,
                seed=image.seed,
                asset_url=self.asset_url(key),
                width=width,
                height=height,
                format=job.options.format,
                model=model,
                prompt=job.prompt,
                negative_prompt=job.negative_prompt,
                cached=False,
                timings=Timings(
                    generation_ms=(generated - start) * 1000,
                    total_ms=(time.perf_counter() - start) * 1000,
                ),
            )
            await self.cache.put(
                model.version,
                job.cache_params(image.seed),
                result.model_dump(exclude={"cached", "timings"}),
            )
            outcome = "success"
            return result
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            metrics.GENERATION_SECONDS.labels(source, outcome).observe(time.perf_counter() - start)
