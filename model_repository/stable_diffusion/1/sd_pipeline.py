"""The Stable Diffusion pipeline core: tokenizer, text encoder, denoising loop, VAE decoder;
for a row with an input image, the VAE encoder too (`sd_img2img`).

Runs without Triton. Rows that share scheduler, steps and size, and for image-to-image rows
strength (a group), are denoised together, one UNet call per step for the whole group, or for
each batch of it when the group exceeds the config's `max_batch_pixels`; every row keeps its
own scheduler state and random generator, so a row's image never depends on its batch mates
or on how its group was split.

A batch that fails (an exception in a network or a scheduler) fails only its own rows:
`generate_outcomes` gives each row its image, None where the row was cancelled, or the
`RowFailure` of its batch, and every other batch still runs. `generate` is the all-or-error
form of it, for callers that want every image or an exception.

Where the weights have a safety checker, each decoded image is checked on its own
(`sd_safety`): a flagged image is blurred, replaced or kept as the config's `safety_action`
says, and its row is marked `flagged`.

Components take and return torch tensors on their device (`sd_runtimes`): on a GPU runtime
the embeddings, latents, scheduler steps and the decoded image stay in GPU memory from the
text encoder to the final uint8 image; only token ids go in and the uint8 image comes out.
Initial noise is drawn on the CPU from each row's CPU generator (as diffusers does with a
CPU generator), so the same seed gives the same starting latents on every device. A row with
an input image starts from the image's latents noised to its strength, and walks only the
timesteps its strength leaves, as diffusers' StableDiffusionImg2ImgPipeline does.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from sd_contract import ConfigError, GenerationContract
from sd_engines import uncovered
from sd_img2img import image_batch, starting_latents
from sd_requests import (
    SCHEDULERS,
    GenerationRequest,
    GroupKey,
    InvalidRequest,
    Row,
    StepObserver,
    make_row,
)
from sd_runtimes import Component, RuntimeSettings, load_components, positive_integer
from sd_safety import SafetyChecker, SafetySettings, load_safety_checker
from sd_styles import StyleLibrary, StyleRuntime, style_folder
from sd_weights import Shape, input_shapes, load_manifest
from transformers import CLIPTokenizer


@dataclass(frozen=True)
class RowFailure:
    """Why a row has no image: the batch it was denoised in (`group`, in words) raised
    `error`. Every row of that batch holds the same RowFailure."""

    group: str
    error: Exception

    def __str__(self) -> str:
        return f"{self.group}: {type(self.error).__name__}: {self.error}"


# One row's outcome: its HxWx3 uint8 image, None where it was cancelled, or its failure.
Outcome: TypeAlias = "np.ndarray | RowFailure | None"


class GenerationFailed(RuntimeError):
    """`generate` when a row failed: names the first failure, its exception chained."""


def pack(costs: Sequence[int], budget: int) -> list[list[int]]:
    """The indices of `costs` in the fewest bins of total cost at most `budget`, where an
    item over the budget has a bin of its own; each bin lists its indices in order.

    First fit, costliest first (ties in order): the fewest bins for a group's costs, which
    are one value and twice it (unguided and guided rows of one size).
    """
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        fit = next((b for b, load in enumerate(loads) if load + costs[i] <= budget), None)
        if fit is None:
            bins.append([i])
            loads.append(costs[i])
        else:
            bins[fit].append(i)
            loads[fit] += costs[i]
    return [sorted(b) for b in bins]


def check_step_range(contract: GenerationContract, scheduler_config: dict[str, Any]) -> None:
    """Refuse a contract whose step range an offered scheduler cannot take (LCM takes at
    most its `original_inference_steps`), so that every request within the contract's
    bounds is one the model serves: the gateway checks those bounds and nothing more."""
    for name in contract.schedulers:
        for steps in (contract.min_steps, contract.max_steps):
            try:
                SCHEDULERS[name](scheduler_config).set_timesteps(steps)
            except ValueError as exc:
                raise ConfigError(
                    f"model config offers scheduler {name}, which cannot take {steps} steps "
                    f"({exc}): lower max_steps, or do not offer {name}"
                ) from exc


def style_runtime(
    settings: RuntimeSettings,
    components: dict[str, Component],
    weights: Path,
    manifest: dict[str, Any],
) -> Any:
    """What applies styles on `settings.runtime`: PEFT adapters on torch, initializer
    overrides on onnxruntime, engine refits on tensorrt; None on onnxruntime_cuda and where
    `style_memory_mb` is 0 (a request with a style is then refused, naming the reason)."""
    if not settings.style_memory_mb:
        return None
    if settings.runtime == "tensorrt":
        from sd_style_onnx import style_targets
        from sd_style_tensorrt import TensorRTStyles

        return TensorRTStyles(components, style_targets(weights, manifest))
    if settings.runtime == "onnxruntime":
        from sd_style_onnx import OnnxStyles

        return OnnxStyles(components)
    if settings.runtime != "torch":
        return None
    from sd_style_torch import TorchStyles

    unet, text_encoder = components["unet"], components["text_encoder"]
    return TorchStyles(unet.module, text_encoder.module)  # type: ignore[attr-defined]


class StableDiffusionCore:
    """The model: weights, contract and runtime from the model config, images from requests.

    `parameters` are the model config's parameters as Triton passes them (strings):
    the generation contract (`sd_contract`), the values copied from the weights' manifest,
    the runtime settings (`sd_runtimes.RuntimeSettings`), `max_batch_pixels` (the most
    UNet pixels of one batch, see `batches`) and the safety check's settings
    (`sd_safety.SafetySettings`); with `style_memory_mb` (`sd_styles`), the styles are those
    published in the model folder's `styles/` beside the version folder that holds
    `weights`. `max_batch_size` is the config's. Loading
    refuses, naming the file or parameter, weights that do not match `weights.schema.json`
    and a config that is incomplete, inconsistent or made for other weights.
    """

    def __init__(
        self, weights: Path, parameters: Mapping[str, str], *, max_batch_size: int
    ) -> None:
        self.manifest = load_manifest(weights)
        self.contract = GenerationContract.from_config(parameters, self.manifest, max_batch_size)
        self.settings = RuntimeSettings.from_config(parameters)
        self.max_batch_pixels = positive_integer(parameters, "max_batch_pixels")
        self.tokenizer = CLIPTokenizer.from_pretrained(weights / self.manifest["tokenizer"])
        self.scheduler_config = json.loads(
            (weights / self.manifest["scheduler_config"]).read_text()
        )
        check_step_range(self.contract, self.scheduler_config)
        self.components: dict[str, Component] = load_components(
            weights,
            self.manifest,
            self.settings,
            max_batch_size=self.contract.max_batch_size,
            default_size=self.contract.default_size,
        )
        self.device = self.components["unet"].device
        self.safety: SafetyChecker | None = load_safety_checker(
            weights, self.manifest, SafetySettings.from_config(parameters), self.settings
        )
        runtime: StyleRuntime | None = style_runtime(
            self.settings, self.components, weights, self.manifest
        )
        self.styles = StyleLibrary(
            style_folder(weights),
            self.manifest["model"],
            self.settings.style_memory_mb * 2**20,
            runtime,
            unavailable=(
                f"runtime {self.settings.runtime} applies no styles (onnxruntime, torch and "
                "tensorrt do)"
                if self.settings.style_memory_mb
                else "this model serves no styles (its style_memory_mb is 0)"
            ),
        )

    @property
    def model_name(self) -> str:
        """The exported model's name."""
        return str(self.manifest["model"]["name"])

    @property
    def model_version(self) -> str:
        """The exported weights' content version."""
        return str(self.manifest["model"]["version"])

    def row(
        self,
        request: GenerationRequest,
        is_cancelled: Callable[[], bool] | None = None,
        on_step: StepObserver | None = None,
    ) -> Row:
        """`request` resolved against the contract and ready to denoise; InvalidRequest
        names the first value the client must change. `is_cancelled` is asked before every
        step; `on_step` is told of every step done (see `StepObserver`)."""
        resolved = self.contract.resolve(request)
        if self.contract.prompt_overflow == "reject":
            self._check_tokens("prompt", resolved.prompt)
            self._check_tokens("negative_prompt", resolved.negative_prompt)
        self._check_engine_profiles(resolved.height, resolved.width)
        # A style name must name a published style, even at weight 0 (which applies none).
        style = self.styles.find(request.style) if request.style else None
        row = make_row(resolved, self.scheduler_config, is_cancelled, on_step)
        row.style = style if resolved.style is not None else None
        return row

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
        where the contract allows), and a VAE encoder call, before the first request, so lazy
        initialisation (CUDA context, kernels, torch.compile) is paid here, not by a client. A
        compiled UNet sees every batch the batcher may form at that size (one CUDA graph
        each)."""
        steps = min(max(2, self.contract.min_steps), self.contract.max_steps)
        batches = range(1, self.contract.max_batch_size + 1 if self.settings.compile_mode else 2)
        for n in batches:
            self.generate([self.row(GenerationRequest("warm-up", steps=steps)) for _ in range(n)])
        size = self.contract.default_size
        self.components["vae_encoder"](torch.zeros((1, 3, size, size), device=self.device))

    def _latent_shape(self, height: int, width: int) -> Shape:
        """One image's latents: the VAE decoder's input for one row."""
        (shape,) = input_shapes(
            self.manifest, "vae_decoder", images=1, guided=False, height=height, width=width
        ).values()
        return shape

    def batches(self, rows: Sequence[Row]) -> list[list[int]]:
        """How `generate_outcomes` runs `rows`: lists of row indices, each denoised together
        (one UNet call per step) and decoded together.

        Rows share a batch only when they share scheduler, steps, size, style and style
        weight and, for input images, strength (a group: `ResolvedRequest.group_key`; groups
        in order of first appearance). A group is split so that no batch holds more than
        `max_batch_pixels` of UNet pixels (`ResolvedRequest.unet_pixels`: a guided row counts
        twice); a row over the budget by itself is a batch of its own.
        """
        # A style republished between two rows' lookups is two styles: the key holds its
        # content version too.
        groups: dict[tuple[GroupKey, str | None], list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            groups[row.request.group_key, None if row.style is None else row.style.key].append(i)
        return [
            [indices[j] for j in part]
            for indices in groups.values()
            for part in pack([rows[i].request.unet_pixels for i in indices], self.max_batch_pixels)
        ]

    @torch.inference_mode()  # every tensor alike, so a compiled UNet's guards hold
    def generate_outcomes(self, rows: Sequence[Row]) -> list[Outcome]:
        """Per row, in order: its HxWx3 uint8 image; None where it was cancelled; or the
        `RowFailure` of its batch where running that batch raised. A failure touches only
        the rows of its batch: every other batch, of its group or another, still runs."""
        outcomes: list[Outcome] = [None] * len(rows)
        for indices in self.batches(rows):
            batch = [rows[i] for i in indices]
            results: list[Outcome]
            try:
                results = list(self._generate_batch(batch))
            except Exception as exc:  # this batch's rows fail; the other batches run
                # Without its traceback the error holds no frame, so none of the failed
                # batch's tensors (GPU memory, after an out-of-memory error) outlive it.
                failure = RowFailure(batch[0].request.describe_group(), exc.with_traceback(None))
                results = [failure] * len(batch)
            for i, outcome in zip(indices, results, strict=True):
                outcomes[i] = outcome
        return outcomes

    def generate(self, rows: Sequence[Row]) -> list[np.ndarray | None]:
        """One HxWx3 uint8 image per row, or None where the row was cancelled; raises
        GenerationFailed, naming the first failure, where any row failed (the other
        batches ran all the same)."""
        images: list[np.ndarray | None] = []
        for outcome in self.generate_outcomes(rows):
            if isinstance(outcome, RowFailure):
                raise GenerationFailed(f"generation failed: {outcome}") from outcome.error
            images.append(outcome)
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

    def _starting_latents(self, rows: list[Row], latent_shape: Shape) -> dict[int, torch.Tensor]:
        """Each row's latents before its first step, by id: noise from its generator (scaled
        to the scheduler's first sigma), or for rows with an input image (a group has images
        on all its rows or none) the image's latents noised to its strength."""
        if rows[0].request.image is None:
            return {
                id(r): (
                    torch.randn(latent_shape, generator=r.generator, dtype=torch.float32)
                    * r.scheduler.init_noise_sigma
                ).to(self.device)
                for r in rows
            }
        images = [r.request.image for r in rows if r.request.image is not None]
        moments = self.components["vae_encoder"](image_batch(images, self.device))
        return {
            id(r): starting_latents(
                moments[i : i + 1],
                scaling_factor=self.manifest["vae"]["scaling_factor"],
                generator=r.generator,
                scheduler=r.scheduler,
                timestep=r.timesteps[:1],
            )
            for i, r in enumerate(rows)
        }

    def _generate_batch(self, rows: list[Row]) -> list[np.ndarray | None]:
        """Denoise and decode one batch (rows of one group): an image per row, None where
        the row was cancelled."""
        latent_shape = self._latent_shape(rows[0].request.height, rows[0].request.width)
        self.styles.activate(rows[0].style, rows[0].request.style_weight)  # one per batch
        texts = [r.request.prompt for r in rows] + [
            r.request.negative_prompt for r in rows if r.request.guided
        ]
        embeddings = self._encode(texts)
        cond = {id(r): embeddings[i] for i, r in enumerate(rows)}
        uncond = {
            id(r): embeddings[len(rows) + j]
            for j, r in enumerate(r for r in rows if r.request.guided)
        }
        latents = self._starting_latents(rows, latent_shape)
        live = list(rows)
        timesteps = rows[0].timesteps  # one list for the group: same scheduler, steps, strength
        for done, t in enumerate(timesteps, start=1):
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
                out = r.scheduler.step(pred, t, latents[id(r)], **r.step_kwargs())
                latents[id(r)] = out.prev_sample
                if r.on_step is not None:
                    estimate = getattr(out, "pred_original_sample", None)
                    preview = out.prev_sample if estimate is None else estimate
                    r.on_step(done, len(timesteps), preview)
        live = [r for r in live if not r.is_cancelled()]
        if not live:
            return [None] * len(rows)
        decoded = self.components["vae_decoder"](
            torch.cat([latents[id(r)] for r in live]) / self.manifest["vae"]["scaling_factor"]
        )
        pixels = ((decoded / 2 + 0.5).clamp(0.0, 1.0) * 255).round().to(torch.uint8)
        images = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # one copy to host
        by_row = {id(r): images[i] for i, r in enumerate(live)}
        if self.safety is not None:
            for r in live:
                by_row[id(r)], r.flagged = self.safety.screen(by_row[id(r)])
        return [by_row.get(id(r)) for r in rows]
