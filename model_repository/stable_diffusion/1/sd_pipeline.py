"""The Stable Diffusion pipeline core: tokenizer, text encoder, denoising loop, VAE decoder.

Runs without Triton. Rows that share scheduler, steps and size are denoised together, one
UNet call per step for the whole group; every row keeps its own scheduler state and random
generator, so a row's image never depends on its batch mates.

Components take and return torch tensors on their device (`sd_runtimes`): on a GPU runtime
the embeddings, latents, scheduler steps and the decoded image stay in GPU memory from the
text encoder to the final uint8 image; only token ids go in and the uint8 image comes out.
Initial noise is drawn on the CPU from each row's CPU generator (as diffusers does with a
CPU generator), so the same seed gives the same starting latents on every device.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sd_engines import uncovered
from sd_requests import GenerationRequest, InvalidRequest, Limits, Row, make_row
from sd_runtimes import Component, load_components
from transformers import CLIPTokenizer

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Geometry:
    latent_channels: int
    vae_scale_factor: int
    vae_scaling_factor: float


class StableDiffusionCore:
    def __init__(
        self,
        weights: Path,
        *,
        runtime: str = "onnxruntime",
        threads: int = 1,
        limits: dict[str, Any] | None = None,
        max_batch_size: int = 1,
        compile_mode: str = "",
    ) -> None:
        manifest = json.loads((weights / "manifest.json").read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(
                f"{weights}: manifest format {manifest.get('format')!r} is not "
                f"{MANIFEST_FORMAT}; re-run the export"
            )
        self.manifest = manifest
        geo = manifest["geometry"]
        self.geometry = Geometry(
            geo["latent_channels"], geo["vae_scale_factor"], geo["vae_scaling_factor"]
        )
        self.limits = Limits(
            size_multiple=geo["size_multiple"], default_size=geo["default_size"], **(limits or {})
        )
        self.tokenizer = CLIPTokenizer.from_pretrained(weights / manifest["tokenizer"])
        self.scheduler_config = json.loads((weights / manifest["scheduler_config"]).read_text())
        self.runtime = runtime
        self.compile_mode = compile_mode
        self.max_batch_size = max_batch_size
        self.components: dict[str, Component] = load_components(
            weights,
            manifest,
            runtime,
            threads,
            max_batch_size=max_batch_size,
            compile_mode=compile_mode,
        )
        self.device = self.components["unet"].device

    @property
    def model_name(self) -> str:
        return str(self.manifest["model"]["name"])

    @property
    def model_version(self) -> str:
        return str(self.manifest["model"]["version"])

    def row(self, request: GenerationRequest, is_cancelled: Any = None) -> Row:
        row = make_row(request, self.limits, self.scheduler_config, is_cancelled)
        if self.limits.prompt_overflow == "reject":
            for name in ("prompt", "negative_prompt"):
                self._check_tokens(name, getattr(request, name))
        self._check_engine_profiles(request)
        return row

    def _check_engine_profiles(self, request: GenerationRequest) -> None:
        """TensorRT engines serve only the sizes their profiles hold: say so up front."""
        for component in self.components.values():
            entry = getattr(component, "engine_entry", None)
            if entry is None:
                continue
            problem = uncovered(entry, self.manifest, 1, [(request.height, request.width)])
            if problem is not None:
                raise InvalidRequest(
                    f"width {request.width} x height {request.height} is not served by the "
                    f"TensorRT engines here: {problem}"
                )

    def _check_tokens(self, name: str, text: str) -> None:
        """Reject rather than silently drop words the text encoder cannot read."""
        tokens = len(self.tokenizer(text, truncation=False).input_ids)
        if tokens > self.tokenizer.model_max_length:
            raise InvalidRequest(
                f"{name} is {tokens} tokens long; the text encoder reads at most "
                f"{self.tokenizer.model_max_length} (start and end tokens included)"
            )

    def warm_up(self) -> None:
        """Two-step images at the default size before the first request, so lazy
        initialisation (CUDA context, kernels, torch.compile) is paid here, not by a client.
        A compiled UNet sees every batch the batcher may form at that size (one CUDA graph
        each)."""
        size = self.limits.default_size

        def rows(n: int) -> list[Row]:  # guided: the UNet sees 2n rows
            return [
                self.row(
                    GenerationRequest(
                        prompt="warm-up",
                        seed=seed,
                        steps=2,
                        guidance_scale=7.5,
                        width=size,
                        height=size,
                        scheduler=self.limits.default_scheduler,
                    )
                )
                for seed in range(n)
            ]

        for n in range(1, self.max_batch_size + 1 if self.compile_mode else 2):
            self.generate(rows(n))

    @torch.inference_mode()  # every tensor alike, so a compiled UNet's guards hold
    def generate(self, rows: Sequence[Row]) -> list[np.ndarray | None]:
        """One HxWx3 uint8 image per row, or None where the row was cancelled."""
        groups: dict[tuple[str, int, int, int], list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            groups[row.request.group_key].append(i)
        images: list[np.ndarray | None] = [None] * len(rows)
        for indices in groups.values():
            for i, image in zip(
                indices, self._generate_group([rows[i] for i in indices]), strict=True
            ):
                images[i] = image
        return images

    def _encode(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="np",
        ).input_ids
        return self.components["text_encoder"](torch.from_numpy(ids.astype(np.int64)))

    def _generate_group(self, rows: list[Row]) -> list[np.ndarray | None]:
        first = rows[0].request
        latent_shape = (
            1,
            self.geometry.latent_channels,
            first.height // self.geometry.vae_scale_factor,
            first.width // self.geometry.vae_scale_factor,
        )
        texts = [r.request.prompt for r in rows] + [
            r.request.negative_prompt for r in rows if r.request.guided
        ]
        embeddings = self._encode(texts)
        cond = {id(r): embeddings[i] for i, r in enumerate(rows)}
        uncond = {
            id(r): embeddings[len(rows) + j]
            for j, r in enumerate(r for r in rows if r.request.guided)
        }
        latents = {
            id(r): (
                torch.randn(latent_shape, generator=r.generator, dtype=torch.float32)
                * r.scheduler.init_noise_sigma
            ).to(self.device)
            for r in rows
        }
        live = list(rows)
        for t in rows[0].scheduler.timesteps:
            live = [r for r in live if not r.is_cancelled()]
            if not live:
                break
            guided = [r for r in live if r.request.guided]
            scaled = {id(r): r.scheduler.scale_model_input(latents[id(r)], t) for r in live}
            sample = torch.cat([scaled[id(r)] for r in guided] + [scaled[id(r)] for r in live])
            context = torch.stack([uncond[id(r)] for r in guided] + [cond[id(r)] for r in live])
            timestep = torch.full(
                (sample.shape[0],), float(t), dtype=torch.float32, device=self.device
            )
            noise = self.components["unet"](sample, timestep, context)
            uncond_noise, cond_noise = noise[: len(guided)], noise[len(guided) :]
            g = 0
            for i, r in enumerate(live):
                pred = cond_noise[i : i + 1]
                if r.request.guided:
                    u = uncond_noise[g : g + 1]
                    pred = u + r.request.guidance_scale * (pred - u)
                    g += 1
                latents[id(r)] = r.scheduler.step(
                    pred, t, latents[id(r)], **r.step_kwargs(), return_dict=False
                )[0]
        live = [r for r in live if not r.is_cancelled()]
        if not live:
            return [None] * len(rows)
        decoded = self.components["vae_decoder"](
            torch.cat([latents[id(r)] for r in live]) / self.geometry.vae_scaling_factor
        )
        pixels = ((decoded / 2 + 0.5).clamp(0.0, 1.0) * 255).round().to(torch.uint8)
        images = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # one copy to host
        by_row = {id(r): images[i] for i, r in enumerate(live)}
        return [by_row.get(id(r)) for r in rows]
