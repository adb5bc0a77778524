"""Triton Python-backend model `stable_diffusion_styles`: the studio styles served now.

Styles are published while `stable_diffusion` runs (`sd_styles`), and a loaded model's config
cannot change, so the generation contract in the config cannot list them: the gateway asks
this model. Its version folder is `stable_diffusion`'s (a link), so it reads the same
`styles/` at every request. Each request is answered with `styles`: the published styles'
manifests as one JSON array (name, content version, rank, alphas, source format, modules,
base model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from sd_styles import catalog, style_folder


class TritonPythonModel:
    """Lists the styles published beside the model's weights."""

    def initialize(self, args: dict[str, Any]) -> None:
        """Find the styles folder: the one `stable_diffusion` reads."""
        version = Path(args["model_repository"]) / args["model_version"]
        self.folder = style_folder(version / "weights")

    def execute(self, requests: list[Any]) -> list[Any]:
        """Answer every request with the listing as it is now."""
        listing = np.array([json.dumps(catalog(self.folder)).encode()], dtype=np.object_)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("styles", listing)]) for _ in requests]
