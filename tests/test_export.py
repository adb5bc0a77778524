"""The export commands against real diffusers pipelines and ONNX Runtime."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import onnx
import pytest

from export.__main__ import main as export_main
from export.components import COMPONENTS, SAFETY_CHECKER, VAE_ENCODER
from export.errors import ExportError
from export.onnx_export import export_onnx
from export.tiny import write_tiny
from launcher.triton import copy_model_repository


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_tiny_model_is_byte_identical_for_a_seed(tiny_model: Path, tmp_path: Path) -> None:
    again = write_tiny(tmp_path / "again")
    assert tree_digest(again) == tree_digest(tiny_model)
    other = write_tiny(tmp_path / "other", seed=1)
    assert tree_digest(other) != tree_digest(tiny_model)
    assert {"model_index.json", "unet/config.json", "tokenizer/tokenizer_config.json"} <= set(
        tree_digest(tiny_model)
    )


def test_tiny_tokenizer_uses_the_real_clip_vocabulary(tiny_model: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    # Token ids of the released CLIP ViT-L/14 tokenizer for this sentence.
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_export_writes_checked_onnx_and_a_manifest_under_tolerance(weights: Path) -> None:
    manifest = json.loads((weights / "manifest.json").read_text())
    assert manifest["model"]["name"] == "forge-tiny-sd"
    assert len(manifest["model"]["version"]) == 12
    assert manifest["safety_checker"]["component"] == SAFETY_CHECKER.as_manifest()
    # The VAE encoder (image to image): images to the posterior's moments, 2 x 4 channels.
    assert manifest["components"]["vae_encoder"] == VAE_ENCODER.as_manifest()
    assert manifest["dimensions"]["latent_moments"] == 2 * manifest["dimensions"]["latent_channels"]
    assert set(manifest["parity"]) == {spec.name for spec in (*COMPONENTS, SAFETY_CHECKER)}
    for spec in (*COMPONENTS, SAFETY_CHECKER):
        onnx_file = weights / spec.filename
        onnx.checker.check_model(str(onnx_file), full_check=True)
        graph = onnx.load(str(onnx_file), load_external_data=False).graph
        assert [i.name for i in graph.input] == [t.name for t in spec.inputs]
        assert [o.name for o in graph.output] == [t.name for t in spec.outputs]
        assert (weights / f"{spec.filename}.data").stat().st_size > 0  # external data
        parity = manifest["parity"][spec.name]
        print(f"parity {spec.name}: max abs diff {parity['max_abs_diff']:.3g}")
        assert 0 <= parity["max_abs_diff"] <= parity["tolerance"] == 1e-3
    assert manifest["contract"] == {
        "size_multiple": 16,
        "default_size": 128,
        "max_prompt_tokens": 77,
    }
    assert manifest["vae"]["scaling_factor"] == pytest.approx(0.18215)


def test_a_failed_export_leaves_the_published_weights_alone(
    tiny_model: Path, tmp_path: Path
) -> None:
    repo = copy_model_repository(tmp_path / "repo")
    export_onnx(str(tiny_model), repo)
    version_dir = repo / "stable_diffusion" / "1"
    before = (version_dir / "weights").resolve()
    digest = tree_digest(before)
    with pytest.raises(ExportError, match="above the tolerance"):
        export_onnx(str(tiny_model), repo, tolerance=0.0)
    assert (version_dir / "weights").resolve() == before
    assert tree_digest(before) == digest
    assert sorted(p.name for p in version_dir.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "no model_index.json"),
        (
            lambda p: (
                p.mkdir(),
                (p / "model_index.json").write_text(
                    json.dumps({"_class_name": "StableDiffusionXLPipeline"})
                ),
            ),
            "StableDiffusionXLPipeline",
        ),
    ],
    ids=["missing", "not-a-pipeline", "unsupported"],
)
def test_export_explains_what_is_wrong_with_the_model(
    setup, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    setup(model)
    repo = copy_model_repository(tmp_path / "repo")
    code = export_main(["onnx", "--model", str(model), "--repository", str(repo)])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err
    assert not (repo / "stable_diffusion" / "1" / "weights").exists()


def test_export_config_adds_the_manifest_values_and_deployment_overrides(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from export.triton_config import read_config

    # A copy of the session's repository: the running Tritons' config stays as it is, even
    # when an assertion below fails.
    repo = Path(shutil.copytree(weights.parents[2], tmp_path / "repo", symlinks=True))
    manifest = json.loads((weights / "manifest.json").read_text())
    code = export_main(
        [
            "config",
            "--repository",
            str(repo),
            "--runtime",
            "onnxruntime_cuda",
            "--instance-kind",
            "KIND_GPU",
            "--instances",
            "2",
            "--max-batch-size",
            "16",
            "--parameter",
            "max_steps=60",
        ]
    )
    assert code == 0
    config = read_config(repo / "stable_diffusion" / "configs" / "exported.pbtxt")
    committed = read_config(repo / "stable_diffusion" / "config.pbtxt")
    assert [i.name for i in config.input] == [i.name for i in committed.input]
    assert config.parameters["model_name"].string_value == manifest["model"]["name"]
    assert config.parameters["model_version"].string_value == manifest["model"]["version"]
    for name, value in manifest["contract"].items():  # size_multiple, default_size, tokens
        assert config.parameters[name].string_value == str(value)
    assert config.parameters["runtime"].string_value == "onnxruntime_cuda"
    assert config.parameters["max_steps"].string_value == "60"
    assert config.max_batch_size == 16
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (config.instance_group[0].KIND_GPU, 2)
    ]
    assert export_main(["config", "--repository", str(repo)]) == 0  # the committed settings
    again = read_config(repo / "stable_diffusion" / "configs" / "exported.pbtxt")
    assert again.max_batch_size == committed.max_batch_size
    empty = copy_model_repository(tmp_path / "empty")
    assert export_main(["config", "--repository", str(empty)]) == 2
    assert "export the model first" in capsys.readouterr().err
    assert export_main(["config", "--repository", str(repo), "--parameter", "max_steps"]) == 2
    assert "--parameter 'max_steps' is not KEY=VALUE" in capsys.readouterr().err
