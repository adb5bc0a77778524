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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from sd_contract import GenerationContract
from sd_engines import uncovered
from sd_requests import GenerationRequest, InvalidRequest, Row, make_row
from sd_runtimes import Component, RuntimeSettings, load_components
from sd_weights import Shape, input_shapes, load_manifest
from transformers import CLIPTokenizer


class StableDiffusionCore:
    """The model: weights, contract and runtime from the model config, images from requests.

    `parameters` are the model config's parameters as Triton passes them (strings):
    the generation contract (`sd_contract`), the values copied from the weights' manifest
    and the runtime settings (`sd_runtimes.RuntimeSettings`); `max_batch_size` is the
    config's. Loading refuses, naming the file or parameter, weights that do not match
    `weights.schema.json` and a config that is incomplete, inconsistent or made for other
    weights.
    """

    def __init__(
        self, weights: Path, parameters: Mapping[str, str], *, max_batch_size: int
    ) -> None:
        self.manifest = load_manifest(weights)
        self.contract = GenerationContract.from_config(parameters, self.manifest, max_batch_size)
        self.settings = RuntimeSettings.from_config(parameters)
        self.tokenizer = CLIPTokenizer.from_pretrained(weights / self.manifest["tokenizer"])
        self.scheduler_config = json.loads(
            (weights / self.manifest["scheduler_config"]).read_text()
        )
        self.components: dict[str, Component] = load_components(
            weights,
            self.manifest,
            self.settings,
            max_batch_size=self.contract.max_batch_size,
            default_size=self.contract.default_size,
        )
        self.device = self.components["unet"].device

    @property
    def model_name(self) -> str:
        """The exported model's name."""
        return str(self.manifest["model"]["name"])

    @property
    def model_version(self) -> str:
        """The exported weights' content version."""
        return str(self.manifest["model"]["version"])

    def row(
        self, request: GenerationRequest, is_cancelled: Callable[[], bool] | None = None
    ) -> Row:
        """`request` resolved against the contract and ready to denoise; InvalidRequest
        names the first value the client must change."""
        resolved = self.contract.resolve(request)
        if self.contract.prompt_overflow == "reject":
            self._check_tokens("prompt", resolved.prompt)
            self._check_tokens("negative_prompt", resolved.negative_prompt)
        self._check_engine_profiles(resolved.height, resolved.width)
        return make_row(resolved, self.scheduler_config, is_cancelled)

    def _check_engine_profiles(self, height: int, width: int) -> None:
        """TensorRT engines serve only the sizes their profiles hold: say so up front."""
        for component in self.components.values():
            entry = getattr(component, "engine_entry", None)
            if entry is None:
                continue
            problem = uncovered(entry, self.manifest, 1, [(height, width)])
            if problem is not None:
                raise InvalidRequest(
                    f"width {width} x height {height} is not served by the TensorRT engines "
                    f"here: {problem}"
                )

    def _check_tokens(self, name: str, text: str) -> None:
        """Reject rather than silently drop words the text encoder cannot read."""
        tokens = len(self.tokenizer(text, truncation=False).input_ids)
        if tokens > self.contract.max_prompt_tokens:
            raise InvalidRequest(
                f"{name} is {tokens} tokens long; the text encoder reads at most "
                f"{self.contract.max_prompt_tokens} (start and end tokens included)"
            )

    def warm_up(self) -> None:
        """Images of a default request (default size, scheduler and guidance; two steps
        where the contract allows) before the first request, so lazy initialisation (CUDA
        context, kernels, torch.compile) is paid here, not by a client. A compiled UNet sees
        every batch the batcher may form at that size (one CUDA graph each)."""
        steps = min(max(2, self.contract.min_steps), self.contract.max_steps)
        batches = range(1, self.contract.max_batch_size + 1 if self.settings.compile_mode else 2)
        for n in batches:
            self.generate([self.row(GenerationRequest("warm-up", steps=steps)) for _ in range(n)])

    def _latent_shape(self, height: int, width: int) -> Shape:
        """One image's latents: the VAE decoder's input for one row."""
        (shape,) = input_shapes(
            self.manifest, "vae_decoder", images=1, guided=False, height=height, width=width
        ).values()
        return shape

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
            max_length=self.contract.max_prompt_tokens,
            truncation=True,
            return_tensors="np",
        ).input_ids
        return self.components["text_encoder"](torch.from_numpy(ids.astype(np.int64)))

    def _generate_group(self, rows: list[Row]) -> list[np.ndarray | None]:
        latent_shape = self._latent_shape(rows[0].request.height, rows[0].request.width)
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
            torch.cat([latents[id(r)] for r in live]) / self.manifest["vae"]["scaling_factor"]
        )
        pixels = ((decoded / 2 + 0.5).clamp(0.0, 1.0) * 255).round().to(torch.uint8)
        images = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # one copy to host
        by_row = {id(r): images[i] for i, r in enumerate(live)}
        return [by_row.get(id(r)) for r in rows]
