"""The exported weights' manifests, read and checked against `weights.schema.json`, and the
tensor shapes they describe.

`python -m export` writes the weights manifest and, for TensorRT, the engine manifest; the
schema beside this model (`../weights.schema.json`) names the files, fixes their format
versions and describes their shape. The model never imports the export: it loads only what
validates, with an error naming the file and the failing path. Shapes are evaluated from the
manifest's data alone (its dimension table and each component's rows per image), so the
export stays the one place that says what a dimension means.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry
from referencing.jsonschema import DRAFT202012

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "weights.schema.json"
# The documents the schema describes ($defs): the weights and engine manifests, a style's.
MANIFEST, ENGINES, STYLE = "manifest", "engines", "style"

Shape = tuple[int, ...]


class WeightsError(RuntimeError):
    """Weights files this model cannot use; the message names the file and the fix."""


@functools.lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    return dict(json.loads(SCHEMA_PATH.read_text()))


def weights_file(role: str) -> str:
    """A file name from the schema's x-files: manifest, engines_dir, engine_manifest,
    style_manifest or style_weights."""
    return str(_schema()["x-files"][role])


def _load(document: str, path: Path, fix: str) -> dict[str, Any]:
    schema = _schema()
    if not path.is_file():
        raise WeightsError(f"{path} does not exist: {fix}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path} is not JSON ({exc}): {fix}") from exc
    wanted = schema["$defs"][document]["properties"]["format"]["const"]
    found = data.get("format") if isinstance(data, dict) else None
    if found != wanted:
        raise WeightsError(
            f"{path} has format {found!r}; this model reads format {wanted!r}: {fix}"
        )
    registry = Registry().with_resource(schema["$id"], DRAFT202012.create_resource(schema))
    validator = Draft202012Validator(
        {"$ref": f"{schema['$id']}#/$defs/{document}"}, registry=registry
    )
    error = best_match(validator.iter_errors(data))
    if error is not None:
        raise WeightsError(
            f"{path} does not match {SCHEMA_PATH.name} at {error.json_path}: {error.message}; {fix}"
        )
    return dict(data)


def load_manifest(weights: Path) -> dict[str, Any]:
    """The weights manifest in `weights`, validated."""
    fix = "re-run the export (`python -m export onnx`)"
    manifest = _load(MANIFEST, weights / weights_file("manifest"), fix)
    components = dict(manifest["components"])
    if "safety_checker" in manifest:
        components["safety_checker"] = manifest["safety_checker"]["component"]
    for name, component in components.items():
        for tensor in (*component["inputs"], *component["outputs"]):
            shape = tensor["shape"]
            unknown = [d for d in shape if isinstance(d, str) and d not in manifest["dimensions"]]
            if unknown:
                raise WeightsError(
                    f"{weights}: {name}.{tensor['name']} has dimensions {unknown} that the "
                    f"manifest's dimensions do not define; {fix}"
                )
    return manifest


def load_style_manifest(folder: Path) -> dict[str, Any]:
    """A published style's manifest in its `folder`, validated."""
    fix = "import the style again (`python -m export style add`)"
    return _load(STYLE, folder / weights_file("style_manifest"), fix)


def load_engine_manifest(weights: Path) -> dict[str, Any]:
    """The TensorRT engine manifest in `weights`' engines folder, validated."""
    path = weights / weights_file("engines_dir") / weights_file("engine_manifest")
    return _load(ENGINES, path, "build the engines on this GPU with `python -m export tensorrt`")


def _size(axis: int | str, dimensions: Mapping[str, Any], values: Mapping[str, int]) -> int:
    if isinstance(axis, int):
        return axis
    dimension = dimensions[axis]
    if isinstance(dimension, int):
        return dimension
    return values[dimension["from"]] // int(dimension["divisor"])


def input_shapes(
    manifest: Mapping[str, Any],
    component: str,
    *,
    images: int,
    guided: bool,
    height: int,
    width: int,
) -> dict[str, Shape]:
    """Input name -> shape of `component` for `images` height x width images, all guided or
    all unguided."""
    spec = manifest["components"][component]
    rows = images * spec["rows_per_image"]["guided" if guided else "unguided"]
    values = {"rows": rows, "height": height, "width": width}
    dimensions = manifest["dimensions"]
    return {
        t["name"]: tuple(_size(axis, dimensions, values) for axis in t["shape"])
        for t in spec["inputs"]
    }


def output_shape(manifest: Mapping[str, Any], component: str, inputs: Sequence[Shape]) -> Shape:
    """The first output's shape of `component` given its input shapes: each derived input
    dimension gives back the rows, height or width it was computed from."""
    spec = manifest["components"][component]
    dimensions = manifest["dimensions"]
    values: dict[str, int] = {}
    for tensor, shape in zip(spec["inputs"], inputs, strict=True):
        for axis, size in zip(tensor["shape"], shape, strict=True):
            dimension = dimensions.get(axis) if isinstance(axis, str) else None
            if isinstance(dimension, dict):
                values[dimension["from"]] = size * int(dimension["divisor"])
    return tuple(_size(axis, dimensions, values) for axis in spec["outputs"][0]["shape"])
