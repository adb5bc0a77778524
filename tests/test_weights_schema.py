"""The one schema the export and the model share: what the export writes validates against
it, and the model refuses, naming the file and the failing field, what does not."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from sd_weights import SCHEMA_PATH, WeightsError, load_manifest

from export.components import COMPONENTS
from export.errors import ExportError
from export.geometry import ModelGeometry
from export.onnx_export import export_onnx
from export.tensorrt_build import GpuIdentity, engine_entry, merge_engine_manifest
from export.tensorrt_profiles import ProfilePlan, profiles
from launcher.triton import MODEL_SOURCE, copy_model_repository
from tests.conftest import make_core


def schema() -> dict[str, Any]:
    return json.loads((MODEL_SOURCE / "weights.schema.json").read_text())


def errors(document: str, data: dict[str, Any]) -> list[str]:
    """Every violation of $defs/<document>, straight from jsonschema."""
    s = schema()
    registry = Registry().with_resource(s["$id"], DRAFT202012.create_resource(s))
    validator = Draft202012Validator({"$ref": f"{s['$id']}#/$defs/{document}"}, registry=registry)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(data)]


def test_the_schema_is_json_schema_2020_12_beside_the_model() -> None:
    assert SCHEMA_PATH == MODEL_SOURCE / "weights.schema.json"
    s = schema()
    Draft202012Validator.check_schema(s)
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(s["x-files"]) == {
        "manifest",
        "engines_dir",
        "engine_manifest",
        "engine_plan",
        "style_manifest",
        "style_weights",
    }


def test_what_the_export_writes_validates(weights: Path) -> None:
    manifest = json.loads((weights / "manifest.json").read_text())
    assert errors("manifest", manifest) == []
    assert manifest["format"] == schema()["$defs"]["manifest"]["properties"]["format"]["const"]
    # The dimension table and rows per image: data the model evaluates, from the export.
    assert manifest["dimensions"]["latent_height"] == {"from": "height", "divisor": 8}
    assert manifest["components"]["unet"]["rows_per_image"] == {"guided": 2, "unguided": 1}
    geometry = ModelGeometry(49408, 77, 768, 4, 8, 64, 512, 0.18215)
    plan = ProfilePlan.make(
        max_batch_size=8, size_multiple=64, min_size=256, max_size=1024, default_size=512
    )
    gpu = GpuIdentity((7, 5), "10.5.0.18", "Tesla T4")
    entries = [
        engine_entry(spec, gpu, f"{spec.name}.{gpu.key}.plan", built, {"gpu_name": gpu.name})
        for spec in COMPONENTS
        for built in [profiles(spec, geometry.dimensions(), plan)]
    ]
    engines = merge_engine_manifest(None, manifest["model"], entries, format_version=2)
    assert errors("engines", engines) == []


def changed(manifest: dict[str, Any], change: Any) -> dict[str, Any]:
    data = copy.deepcopy(manifest)
    change(data)
    return data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: m.update(format=1),
            "manifest.json has format 1; this model reads format 3: re-run the export",
        ),
        (
            lambda m: m.pop("format"),
            "manifest.json has format None; this model reads format 3",
        ),
        (
            lambda m: m["components"]["unet"].pop("rows_per_image"),
            "at $.components.unet: 'rows_per_image' is a required property",
        ),
        (
            lambda m: m["contract"].update(size_multiple="16"),
            "at $.contract.size_multiple: '16' is not of type 'integer'",
        ),
        (
            lambda m: m["dimensions"].update(latent_height={"from": "depth", "divisor": 8}),
            "at $.dimensions.latent_height.from: 'depth' is not one of ['rows', 'height', 'width']",
        ),
        (
            lambda m: m["components"]["unet"]["inputs"][0].update(shape=["batch", "depth"]),
            "unet.sample has dimensions ['depth'] that the manifest's dimensions do not define",
        ),
        (
            lambda m: m["components"].pop("vae_encoder"),
            "at $.components: 'vae_encoder' is a required property",
        ),
    ],
    ids=[
        "old-format",
        "no-format",
        "no-rows",
        "string-size",
        "bad-dimension",
        "unknown-dim",
        "no-encoder",
    ],
)
def test_the_model_refuses_a_manifest_of_another_format_or_shape(
    weights: Path, tmp_path: Path, change: Any, message: str
) -> None:
    bad = changed(json.loads((weights / "manifest.json").read_text()), change)
    (tmp_path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(WeightsError) as caught:
        load_manifest(tmp_path)
    assert message in str(caught.value) and str(tmp_path) in str(caught.value)


def test_the_core_refuses_to_load_weights_the_schema_refuses(weights: Path, tmp_path: Path) -> None:
    for item in weights.iterdir():
        (tmp_path / item.name).symlink_to(item)
    (tmp_path / "manifest.json").unlink()
    manifest = json.loads((weights / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(WeightsError, match="has format 1; this model reads format 3"):
        make_core(tmp_path)


def test_the_export_refuses_to_publish_a_manifest_the_schema_refuses(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = copy_model_repository(tmp_path / "repo")
    monkeypatch.setattr(ModelGeometry, "contract", lambda self: {"size_multiple": 0})
    with pytest.raises(ExportError, match=r"at \$\.contract: .*required property"):
        export_onnx(str(tiny_model), repo)
    version_dir = repo / "stable_diffusion" / "1"
    assert not (version_dir / "weights").exists()
    assert sorted(p.name for p in version_dir.iterdir()) == sorted(
        p.name for p in (MODEL_SOURCE / "1").glob("*.py")
    )
