"""The weights schema, `<model>/weights.schema.json`: file names, format versions, validation.

The schema lives in the model repository, beside the model that reads the weights. The
export reads it from the repository it writes into, takes the file names and format versions
from it, and validates every manifest against it before publishing, so what it publishes is
what that model accepts. The export never imports the model's code, nor the model the
export's: the two meet in this file and the data it describes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from export.errors import ExportError

SCHEMA_FILE = "weights.schema.json"
# The documents the schema describes ($defs): the weights and engine manifests, a style's.
MANIFEST, ENGINES, STYLE = "manifest", "engines", "style"


@dataclass(frozen=True)
class WeightsSchema:
    """A model's weights schema, read from its folder in the model repository."""

    path: Path
    schema: dict[str, Any]

    @classmethod
    def of_model(cls, model_dir: Path) -> WeightsSchema:
        """The schema of the model in `model_dir` (e.g. model_repository/stable_diffusion)."""
        path = model_dir / SCHEMA_FILE
        if not path.is_file():
            raise ExportError(
                f"{path} does not exist: the model folder must hold its weights schema "
                "(copy the committed model_repository/stable_diffusion)"
            )
        return cls(path, json.loads(path.read_text()))

    def _file(self, role: str) -> str:
        return str(self.schema["x-files"][role])

    @property
    def manifest_file(self) -> str:
        """The weights manifest's name in the weights folder."""
        return self._file("manifest")

    @property
    def engines_dir(self) -> str:
        """The folder, in the weights folder, that holds the TensorRT plans."""
        return self._file("engines_dir")

    @property
    def engine_manifest_file(self) -> str:
        """The engine manifest's name in the engines folder."""
        return self._file("engine_manifest")

    @property
    def style_manifest_file(self) -> str:
        """A style's manifest's name in its folder."""
        return self._file("style_manifest")

    @property
    def style_weights_file(self) -> str:
        """A style's tensors' file name in its folder."""
        return self._file("style_weights")

    def plan_file(self, component: str, gpu_key: str) -> str:
        """A TensorRT plan's name in the engines folder."""
        return self._file("engine_plan").format(component=component, gpu_key=gpu_key)

    def format_of(self, document: str) -> int:
        """The format version the schema requires of `document` (manifest, engines, style)."""
        return int(self.schema["$defs"][document]["properties"]["format"]["const"])

    def check(self, document: str, data: dict[str, Any], file: Path) -> None:
        """Refuse `data` (the contents of `file`, read or about to be written) unless it is a
        valid `document`; the message names the file and the failing path."""
        registry = Registry().with_resource(
            self.schema["$id"], DRAFT202012.create_resource(self.schema)
        )
        validator = Draft202012Validator(
            {"$ref": f"{self.schema['$id']}#/$defs/{document}"}, registry=registry
        )
        error = best_match(validator.iter_errors(data))
        if error is not None:
            raise ExportError(
                f"{file} does not match {self.path} ($defs/{document}) at {error.json_path}: "
                f"{error.message}"
            )
