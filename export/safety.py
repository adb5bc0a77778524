"""The safety checker's manifest entry: its component, its thresholds, its input's preprocessing.

A model folder with diffusers' `StableDiffusionSafetyChecker` (`safety_checker/`) and its
CLIP image processor (`feature_extractor/`) exports the checker as the `safety_checker`
component (`components.SAFETY_CHECKER`: CLIP-preprocessed images in, cosine similarities to
the concept embeddings out). The rest is data the model needs to decide as diffusers does:
the thresholds (the checker's `special_care_embeds_weights` and `concept_embeds_weights`),
which the model compares the similarities with in numpy, so that a config parameter can
shift them; and the image processor's settings (shortest-edge resize, resampling filter,
center crop, rescale factor, mean and std), so that the model preprocesses an image as the
image processor does without loading one. An image processor that does anything else is
refused: the model implements CLIP's preprocessing and nothing more.
"""

from __future__ import annotations

from typing import Any

import PIL.Image

from export.components import SAFETY_CHECKER
from export.errors import ExportError

# The image processor's steps the model implements, all of which must be on.
REQUIRED_STEPS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize")


def preprocessing(feature_extractor: Any) -> dict[str, Any]:
    """The CLIP image processor's settings as the manifest records them, or an ExportError
    naming the setting the model does not implement."""
    settings = feature_extractor.to_dict()
    off = [step for step in REQUIRED_STEPS if not settings.get(step)]
    if off:
        raise ExportError(
            f"the safety checker's feature extractor has {', '.join(off)} off; the model "
            "implements CLIP's preprocessing (resize, center crop, rescale, normalize)"
        )
    size = settings["size"]
    if set(size) != {"shortest_edge"}:
        raise ExportError(
            f"the safety checker's feature extractor resizes to {size}; the model resizes "
            "the shortest edge only"
        )
    crop = settings["crop_size"]
    return {
        "shortest_edge": int(size["shortest_edge"]),
        "crop_height": int(crop["height"]),
        "crop_width": int(crop["width"]),
        "resample": PIL.Image.Resampling(int(settings["resample"])).name.lower(),
        "rescale_factor": float(settings["rescale_factor"]),
        "mean": [float(m) for m in settings["image_mean"]],
        "std": [float(s) for s in settings["image_std"]],
    }


def safety_checker_entry(pipe: Any) -> dict[str, Any]:
    """The manifest's `safety_checker`: the component, the thresholds and the preprocessing
    of a pipeline that has a safety checker."""
    checker = pipe.safety_checker
    return {
        "component": SAFETY_CHECKER.as_manifest(),
        "thresholds": {
            "special_care": checker.special_care_embeds_weights.detach().float().tolist(),
            "concepts": checker.concept_embeds_weights.detach().float().tolist(),
        },
        "preprocessing": preprocessing(pipe.feature_extractor),
    }
