"""The optional safety check after decoding: diffusers' safety checker decides, the model
config says what happens to a flagged image.

Weights whose manifest has a `safety_checker` entry (exported from a pipeline with diffusers'
`StableDiffusionSafetyChecker`) have every decoded image checked, one image per call, so a
decision never depends on the image's batch mates, whatever a runtime's kernels do with the
batch size. Weights without one are served as they are, none flagged.

1. **Preprocessing** is CLIP's, as diffusers' pipeline runs the checker's CLIPImageProcessor
   on the uint8 image it decoded (the same bytes as ours): resize with PIL (the manifest's
   filter, bicubic for CLIP) so that the shortest edge is `shortest_edge` and the other
   `int(shortest_edge * long / short)`, center-crop (top and left offsets rounded down),
   multiply by the rescale factor in float64 and cast to float32, then subtract the mean and
   divide by the std in float32. These are the steps, order and dtypes of transformers'
   PIL backend (`CLIPImageProcessor` in transformers 4, and in 5 where torchvision is
   absent, as here; `CLIPImageProcessorPil`): the input is the same, bit for bit
   (tests/test_safety_checker.py). transformers 5 with torchvision resizes with torch's
   antialiased bicubic instead (torchvision is not installed here: torch's own interpolate,
   which it calls, differs from PIL's by at most one 8-bit level, on about a tenth of the
   pixels), so there diffusers' decision can differ from ours only for an image whose score
   is within that much of a threshold.
2. **The network** (the exported `safety_checker` component) gives the cosine similarities of
   the image's CLIP embedding to the special-care concepts and to the other concepts. It runs
   on ONNX Runtime for runtime `onnxruntime` (CPU) and `onnxruntime_cuda` (its CUDA provider);
   for `tensorrt` too, as no engine is built for it: with the CUDA provider where
   onnxruntime-gpu offers it, else on the CPU. Runtime `torch` runs diffusers' module from
   the `diffusers/` copy (fp16 on CUDA, fp32 on CPU).
3. **The decision** is `StableDiffusionSafetyChecker.forward`'s, in numpy with the checker's
   thresholds from the manifest: a special-care concept counts where its similarity minus its
   threshold, rounded to 3 decimals, is above 0, and then every concept's score gets 0.01
   more; the image is flagged where any concept's similarity minus its threshold (plus that
   0.01), rounded to 3 decimals, is above 0. Each score is computed with the same operations
   and types as there, so at the default adjustment the decision is diffusers' own. The
   config's `safety_adjustment` is added to every score, special-care ones included: it
   lowers every threshold by that much, as lowering the checker's weights would (diffusers'
   local `adjustment` agrees at 0, its value; above 0.01 its special-care rule would lower
   it back to 0.01, which a threshold shift does not).
4. **The action**, the config's `safety_action`: `blur` (a Gaussian blur whose standard
   deviation is an eighth of the image's shorter side: shapes, no detail), `replace` (flat
   grey), or `none` (the image as it is, flagged all the same).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageFilter
import torch
from sd_contract import ConfigError
from sd_runtimes import RuntimeSettings, ort_session
from sd_weights import WeightsError

SPECIAL_CARE_BUMP = 0.01  # what a special-care concept adds to every concept's score
GREY = 128
BLUR_FRACTION = 1 / 8  # of the shorter side: the blur's standard deviation

# One image's CLIP input (1 x 3 x H x W) -> its similarities (special care, concepts).
Similarities = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def blur(image: np.ndarray) -> np.ndarray:
    """`image` under a Gaussian blur of standard deviation an eighth of its shorter side."""
    radius = min(image.shape[:2]) * BLUR_FRACTION
    return np.asarray(PIL.Image.fromarray(image).filter(PIL.ImageFilter.GaussianBlur(radius)))


# safety_action -> what a flagged image becomes.
ACTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "blur": blur,
    "replace": lambda image: np.full_like(image, GREY),
    "none": lambda image: image,
}


@dataclass(frozen=True)
class SafetySettings:
    """What the model config asks of the check: `safety_action` (blur, replace or none) and
    `safety_adjustment` (a finite number added to every score; 0 decides as diffusers)."""

    action: str
    adjustment: float

    @classmethod
    def from_config(cls, parameters: Mapping[str, str]) -> SafetySettings:
        """The settings in the config's parameters, checked (no defaults: config.pbtxt
        sets both)."""
        for name in ("safety_action", "safety_adjustment"):
            if name not in parameters:
                raise ConfigError(f"model config parameter {name} is missing")
        action, value = parameters["safety_action"], parameters["safety_adjustment"]
        if action not in ACTIONS:
            raise ConfigError(
                f"model config parameter safety_action {action!r}: choose from {', '.join(ACTIONS)}"
            )
        try:
            adjustment = float(value)
        except ValueError:
            adjustment = math.nan
        if not math.isfinite(adjustment):
            raise ConfigError(
                f"model config parameter safety_adjustment {value!r} is not a finite number"
            )
        return cls(action, adjustment)


@dataclass(frozen=True)
class Preprocessing:
    """CLIP's preprocessing of one image, with the manifest's settings (see the module)."""

    shortest_edge: int
    crop_height: int
    crop_width: int
    resample: str
    rescale_factor: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, entry: Mapping[str, Any]) -> Preprocessing:
        """The manifest's `preprocessing` settings."""
        return cls(**{**entry, "mean": tuple(entry["mean"]), "std": tuple(entry["std"])})

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the shortest-edge resize, as transformers computes it."""
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """The 3 x crop_height x crop_width float32 CLIP input of one HxWx3 uint8 image."""
        height, width = self.resized_size(*image.shape[:2])
        resized = PIL.Image.fromarray(image).resize(
            (width, height), resample=PIL.Image.Resampling[self.resample.upper()]
        )
        top, left = (height - self.crop_height) // 2, (width - self.crop_width) // 2
        crop = np.asarray(resized)[top : top + self.crop_height, left : left + self.crop_width]
        scaled = (crop.transpose(2, 0, 1).astype(np.float64) * self.rescale_factor).astype(
            np.float32
        )
        mean = np.array(self.mean, dtype=np.float32)[:, None, None]
        std = np.array(self.std, dtype=np.float32)[:, None, None]
        return np.asarray((scaled - mean) / std)


def is_flagged(
    special_care: Sequence[np.floating],
    concepts: Sequence[np.floating],
    thresholds: tuple[Sequence[float], Sequence[float]],
    adjustment: float,
) -> bool:
    """One image's decision from its float32 similarities (diffusers' rule, see the module):
    `thresholds` are the (special-care, concept) thresholds, as Python floats."""
    special_thresholds, concept_thresholds = thresholds
    bump = adjustment
    for similarity, threshold in zip(special_care, special_thresholds, strict=True):
        if round(similarity - threshold + bump, 3) > 0:
            bump = adjustment + SPECIAL_CARE_BUMP
            break
    return any(
        round(similarity - threshold + bump, 3) > 0
        for similarity, threshold in zip(concepts, concept_thresholds, strict=True)
    )


class OnnxSimilarities:
    """The exported checker in an ONNX Runtime session on `providers`."""

    def __init__(self, path: Path, spec: Mapping[str, Any], threads: int, providers: list[Any]):
        self.session = ort_session(path, threads, providers)
        self.input_name = spec["inputs"][0]["name"]
        self.output_names = [t["name"] for t in spec["outputs"]]

    def __call__(self, clip_input: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(special-care, concept) similarities, float32, one row per image."""
        special, concepts = self.session.run(self.output_names, {self.input_name: clip_input})
        return special, concepts


class TorchSimilarities:
    """diffusers' StableDiffusionSafetyChecker up to its similarities, as its forward
    computes them: CLIP's vision model, the projection, `cosine_distance`."""

    def __init__(self, folder: Path) -> None:
        from diffusers.pipelines.stable_diffusion.safety_checker import (
            StableDiffusionSafetyChecker,
        )

        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        checker: Any = StableDiffusionSafetyChecker.from_pretrained(folder, torch_dtype=self.dtype)
        self.checker = checker.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, clip_input: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(special-care, concept) similarities, float32, one row per image."""
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        pixels = torch.from_numpy(clip_input).to(self.device, self.dtype)
        embeds = self.checker.visual_projection(self.checker.vision_model(pixels)[1])
        special = cosine_distance(embeds, self.checker.special_care_embeds)
        concepts = cosine_distance(embeds, self.checker.concept_embeds)
        return special.float().cpu().numpy(), concepts.float().cpu().numpy()


def similarities_on(
    weights: Path, manifest: Mapping[str, Any], runtime: RuntimeSettings
) -> Similarities:
    """The checker network on the runtime's device (see the module: ONNX Runtime for every
    runtime but torch)."""
    if runtime.runtime == "torch":
        return TorchSimilarities(weights / manifest["diffusers"] / "safety_checker")
    import onnxruntime as ort

    spec = manifest["safety_checker"]["component"]
    providers: list[Any] = ["CPUExecutionProvider"]
    if runtime.runtime == "onnxruntime_cuda" or (
        runtime.runtime == "tensorrt" and "CUDAExecutionProvider" in ort.get_available_providers()
    ):
        device = torch.cuda.current_device()
        providers = [("CUDAExecutionProvider", {"device_id": device}), *providers]
    return OnnxSimilarities(weights / spec["file"], spec, runtime.threads, providers)


@dataclass(frozen=True)
class SafetyChecker:
    """The check of decoded images: CLIP input, similarities, decision, action."""

    similarities: Similarities
    preprocessing: Preprocessing
    thresholds: tuple[tuple[float, ...], tuple[float, ...]]
    settings: SafetySettings

    def flagged(self, image: np.ndarray) -> bool:
        """Whether the checker flags one HxWx3 uint8 image (alone: see the module)."""
        special, concepts = self.similarities(self.preprocessing(image)[np.newaxis])
        return is_flagged(special[0], concepts[0], self.thresholds, self.settings.adjustment)

    def screen(self, image: np.ndarray) -> tuple[np.ndarray, bool]:
        """The image to return for one decoded image, and whether it was flagged."""
        if not self.flagged(image):
            return image, False
        return ACTIONS[self.settings.action](image), True


def _checked_entry(manifest: Mapping[str, Any], weights: Path) -> Mapping[str, Any]:
    """The manifest's `safety_checker` entry, once its parts agree with each other."""
    entry = manifest["safety_checker"]
    outputs = entry["component"]["outputs"]
    dimensions = manifest["dimensions"]
    fix = "re-run the export (`python -m export onnx`)"
    if len(outputs) != 2:
        raise WeightsError(
            f"{weights}: the safety checker has {len(outputs)} outputs, not 2; {fix}"
        )
    for output, name in zip(outputs, ("special_care", "concepts"), strict=True):
        width = dimensions.get(output["shape"][-1], output["shape"][-1])
        if width != len(entry["thresholds"][name]):
            raise WeightsError(
                f"{weights}: the safety checker's {output['name']} has {width} columns but "
                f"{len(entry['thresholds'][name])} {name} thresholds; {fix}"
            )
    crop = entry["preprocessing"]
    if max(crop["crop_height"], crop["crop_width"]) > crop["shortest_edge"]:
        raise WeightsError(
            f"{weights}: the safety checker crops {crop['crop_width']}x{crop['crop_height']} "
            f"from images resized to a shortest edge of {crop['shortest_edge']}; {fix}"
        )
    return entry


def load_safety_checker(
    weights: Path, manifest: Mapping[str, Any], settings: SafetySettings, runtime: RuntimeSettings
) -> SafetyChecker | None:
    """The check the weights provide on the runtime, or None where they have no checker."""
    if "safety_checker" not in manifest:
        return None
    entry = _checked_entry(manifest, weights)
    thresholds = entry["thresholds"]
    return SafetyChecker(
        similarities_on(weights, manifest, runtime),
        Preprocessing.of(entry["preprocessing"]),
        (tuple(thresholds["special_care"]), tuple(thresholds["concepts"])),
        settings,
    )
