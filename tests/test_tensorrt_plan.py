"""TensorRT engines without TensorRT: profiles, names, the engine manifest, and the model's
refusal of a mismatched engine, with synthetic manifests and a stand-in for the builder.

The engine build itself (`export.tensorrt_build.build_engine`) and the TensorRT runtime
(`sd_runtimes.TensorRTComponent`) run only where TensorRT and a CUDA GPU are installed;
elsewhere the test that needs them skips, naming what is missing.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import sd_runtimes
import torch
from sd_engines import EngineMismatch, profile_covers, select_engines, uncovered
from sd_requests import GenerationRequest, InvalidRequest
from sd_weights import WeightsError, input_shapes, load_engine_manifest

from export import tensorrt_build
from export.__main__ import main as export_main
from export.components import COMPONENTS, TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER
from export.errors import ExportError
from export.geometry import ModelGeometry
from export.tensorrt_build import (
    GpuIdentity,
    dry_run,
    engine_entry,
    merge_engine_manifest,
    plan_engines,
)
from export.tensorrt_profiles import ProfilePlan, parse_sizes, profiles
from export.weights_schema import ENGINES, WeightsSchema
from launcher.triton import MODEL_SOURCE
from tests.conftest import make_core

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
SD15 = ModelGeometry(
    vocab=49408,
    sequence=77,
    hidden=768,
    latent_channels=4,
    vae_scale_factor=8,
    size_multiple=64,
    default_size=512,
    scaling_factor=0.18215,
)
DIMS = SD15.dimensions()
T4 = GpuIdentity((7, 5), "10.5.0.18", "Tesla T4")
A10G = GpuIdentity((8, 6), "10.5.0.18", "NVIDIA A10G")
SCHEMA = WeightsSchema.of_model(MODEL_SOURCE)
FORMAT = SCHEMA.format_of(ENGINES)


def sd15_plan(**overrides: Any) -> ProfilePlan:
    fields: dict[str, Any] = dict(
        max_batch_size=8, size_multiple=64, min_size=64, max_size=1024, default_size=512
    )
    return ProfilePlan.make(**{**fields, **overrides})


def weights_manifest(version: str = "abc123") -> dict[str, Any]:
    return {
        "model": {"name": "sd15", "version": version},
        "dimensions": DIMS,
        "components": {s.name: s.as_manifest() for s in COMPONENTS},
    }


def entry(spec: Any, gpu: GpuIdentity, plan: ProfilePlan) -> dict[str, Any]:
    file = SCHEMA.plan_file(spec.name, gpu.key)
    return engine_entry(spec, gpu, file, profiles(spec, DIMS, plan), {"gpu_name": gpu.name})


def engine_manifest(
    plan: ProfilePlan, gpu: GpuIdentity = T4, version: str = "abc123"
) -> dict[str, Any]:
    entries = [entry(spec, gpu, plan) for spec in COMPONENTS]
    model = {"name": "sd15", "version": version}
    return merge_engine_manifest(None, model, entries, format_version=FORMAT)


def test_gpu_identity_is_data_and_its_key_names_the_plans() -> None:
    assert T4.as_manifest() == {"compute_capability": [7, 5], "tensorrt": "10.5.0.18"}
    assert T4.key == "sm75-trt10.5.0.18"
    assert SCHEMA.plan_file("unet", T4.key) == "unet.sm75-trt10.5.0.18.plan"
    assert (SCHEMA.engines_dir, SCHEMA.engine_manifest_file) == ("engines", "engines.json")


def test_a_dynamic_profile_spans_batch_1_to_max_and_the_configured_sizes() -> None:
    plan = sd15_plan()
    (unet,) = profiles(UNET, DIMS, plan)
    # One unguided image at 64x64 ... eight guided images (16 UNet rows) at 1024x1024.
    assert unet["sample"] == ((1, 4, 8, 8), (8, 4, 64, 64), (16, 4, 128, 128))
    assert unet["timestep"] == ((1,), (8,), (16,))
    assert unet["encoder_hidden_states"] == ((1, 77, 768), (8, 77, 768), (16, 77, 768))
    (text,) = profiles(TEXT_ENCODER, DIMS, plan)
    assert text["input_ids"] == ((1, 77), (8, 77), (16, 77))  # prompts + negative prompts
    (vae,) = profiles(VAE_DECODER, DIMS, plan)
    assert vae["latent_sample"] == ((1, 4, 8, 8), (4, 4, 64, 64), (8, 4, 128, 128))
    (encoder,) = profiles(VAE_ENCODER, DIMS, plan)  # one input image per image
    assert encoder["sample"] == ((1, 3, 64, 64), (4, 3, 512, 512), (8, 3, 1024, 1024))


def test_fixed_sizes_give_one_profile_each() -> None:
    plan = sd15_plan(sizes=parse_sizes("512x512,768x512"), max_batch_size=4, opt_batch=2)
    p512, p768 = profiles(UNET, DIMS, plan)
    assert p512["sample"] == ((1, 4, 64, 64), (4, 4, 64, 64), (8, 4, 64, 64))
    assert p768["sample"] == ((1, 4, 64, 96), (4, 4, 64, 96), (8, 4, 64, 96))  # width 768


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sizes": [(500, 512)]}, "width 500 of size 500x512: sizes must be multiples of 64"),
        ({"sizes": [(512, 2048)]}, "height 2048"),
        ({"max_batch_size": 0}, "max batch size 0"),
        ({"min_size": 900, "max_size": 950}, "no size between"),
    ],
)
def test_profile_plans_explain_what_is_wrong(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ExportError, match=message):
        sd15_plan(**overrides)
    with pytest.raises(ExportError, match="not WIDTHxHEIGHT"):
        parse_sizes("512")


def test_the_engine_manifest_keeps_other_gpus_drops_other_weights_and_validates() -> None:
    plan = sd15_plan()
    t4 = engine_manifest(plan)
    assert [e["file"] for e in t4["engines"]] == [
        "text_encoder.sm75-trt10.5.0.18.plan",
        "unet.sm75-trt10.5.0.18.plan",
        "vae_decoder.sm75-trt10.5.0.18.plan",
        "vae_encoder.sm75-trt10.5.0.18.plan",
    ]
    assert {e["precision"] for e in t4["engines"]} == {"fp16"}
    assert t4["engines"][1]["profiles"][0]["sample"] == {
        "min": [1, 4, 8, 8],
        "opt": [8, 4, 64, 64],
        "max": [16, 4, 128, 128],
    }
    a10g = entry(UNET, A10G, plan)
    both = merge_engine_manifest(t4, t4["model"], [a10g], format_version=FORMAT)
    assert [e["gpu"]["compute_capability"] for e in both["engines"]] == [[7, 5]] * 4 + [[8, 6]]
    SCHEMA.check(ENGINES, both, Path("engines.json"))
    rebuilt = merge_engine_manifest(
        both, {"name": "sd15", "version": "new"}, [a10g], format_version=FORMAT
    )
    assert rebuilt["engines"] == [a10g]
    older = merge_engine_manifest({**both, "format": 1}, both["model"], [a10g], format_version=2)
    assert older["engines"] == [a10g]  # another format: rebuilt, not mixed
    broken = json.loads(json.dumps(both))
    del broken["engines"][0]["gpu"]["tensorrt"]
    with pytest.raises(ExportError, match=r"at \$\.engines\[0\]\.gpu: 'tensorrt' is a required"):
        SCHEMA.check(ENGINES, broken, Path("engines.json"))


def test_the_model_picks_the_engines_built_for_its_gpu() -> None:
    manifest = engine_manifest(sd15_plan(), gpu=T4)
    manifest["engines"] += engine_manifest(sd15_plan(), gpu=A10G)["engines"]
    chosen = select_engines(
        manifest, weights_manifest(), A10G.as_manifest(), max_batch_size=8, sizes=[(512, 512)]
    )
    assert {tuple(e["gpu"]["compute_capability"]) for e in chosen.values()} == {(8, 6)}
    assert set(chosen) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}


def test_the_model_refuses_another_gpu_or_tensorrt_version_naming_both() -> None:
    manifest = engine_manifest(sd15_plan(), gpu=T4)
    for here, named in [
        ({"compute_capability": [9, 0], "tensorrt": "10.5.0.18"}, "compute capability 9.0"),
        ({"compute_capability": [7, 5], "tensorrt": "10.6.0.26"}, "TensorRT 10.6.0.26"),
    ]:
        with pytest.raises(EngineMismatch) as caught:
            select_engines(manifest, weights_manifest(), here, max_batch_size=8, sizes=[(512, 512)])
        message = str(caught.value)
        assert named in message and "compute capability 7.5, TensorRT 10.5.0.18" in message
        assert "python -m export tensorrt" in message


def test_the_model_refuses_engines_without_a_profile_for_its_batch_or_size() -> None:
    here = T4.as_manifest()
    small = engine_manifest(sd15_plan(max_batch_size=4))
    with pytest.raises(EngineMismatch, match=r"batch 1\.\.8.*no optimisation profile"):
        select_engines(small, weights_manifest(), here, max_batch_size=8, sizes=[(512, 512)])
    only_512 = engine_manifest(sd15_plan(sizes=[(512, 512)]))
    select_engines(only_512, weights_manifest(), here, max_batch_size=8, sizes=[(512, 512)])
    with pytest.raises(EngineMismatch, match="768x512"):
        select_engines(only_512, weights_manifest(), here, max_batch_size=8, sizes=[(512, 768)])
    with pytest.raises(EngineMismatch, match="weights version 'abc123'"):
        select_engines(
            only_512, weights_manifest("other"), here, max_batch_size=8, sizes=[(512, 512)]
        )


def test_profile_coverage_is_axis_by_axis() -> None:
    (unet,) = engine_manifest(sd15_plan(sizes=[(512, 512)]))["engines"][1:2]
    shapes = input_shapes(weights_manifest(), "unet", images=8, guided=True, height=512, width=512)
    assert shapes["sample"] == (16, 4, 64, 64)
    assert profile_covers(unet["profiles"][0], shapes)
    assert not profile_covers(unet["profiles"][0], {**shapes, "sample": (17, 4, 64, 64)})
    assert uncovered(unet, weights_manifest(), 8, [(512, 512)]) is None


def test_the_pipeline_refuses_a_size_its_engines_lack(weights: Path) -> None:
    """A stand-in component carries a synthetic engine entry; no TensorRT runs."""
    core = make_core(weights)
    plan = ProfilePlan.make(
        max_batch_size=2,
        size_multiple=16,
        min_size=64,
        max_size=1024,
        default_size=128,
        sizes=[(128, 128)],
    )
    built = profiles(UNET, core.manifest["dimensions"], plan)
    core.components["unet"].engine_entry = engine_entry(  # type: ignore[attr-defined]
        UNET, T4, "unet.plan", built, {}
    )
    fields: dict[str, Any] = dict(prompt="an axe", steps=2, scheduler="ddim")
    core.row(GenerationRequest(width=128, height=128, **fields))
    with pytest.raises(InvalidRequest, match="width 256 x height 128 is not served"):
        core.row(GenerationRequest(width=256, height=128, **fields))


def test_dry_run_prints_the_profiles_from_the_config(
    weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = weights.parents[2]
    code = export_main(["tensorrt", "--repository", str(repo), "--dry-run", "--sizes", "128x128"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    version = json.loads((weights / "manifest.json").read_text())["model"]["version"]
    assert printed["model"]["version"] == version
    # config.pbtxt: max_batch_size 8, so up to 16 guided UNet rows.
    assert printed["profiles"]["unet"][0]["sample"]["max"] == [16, 4, 16, 16]
    assert not (weights / "engines").exists()  # a dry run writes nothing


@pytest.fixture
def engines_repository(weights: Path, tmp_path: Path) -> Path:
    """A copy of the exported repository, so engines written here stay out of `weights`."""
    return Path(shutil.copytree(weights.parents[2], tmp_path / "repo", symlinks=True))


def test_a_build_writes_plans_and_an_engine_manifest_the_model_reads(
    engines_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole build with TensorRT and the GPU stood in for: names, validated manifest,
    and the model's refusal of the engines on another GPU."""
    monkeypatch.setattr(tensorrt_build, "require_tensorrt", lambda: (object(), T4))
    refittable_by_file: dict[str, bool] = {}

    def build(trt: Any, onnx: Path, *args: Any, refittable: bool) -> bytes:
        refittable_by_file[onnx.name] = refittable
        return onnx.name.encode()

    monkeypatch.setattr(tensorrt_build, "build_engine", build)
    weights = engines_repository / "stable_diffusion" / "1" / "weights"
    planned = plan_engines(engines_repository, max_batch_size=2, sizes=[(128, 128)])
    written = tensorrt_build.build_engines(
        planned, timing_cache=engines_repository / "cache", refittable=True
    )
    # Styles refit the networks they adapt: those engines only are built refittable.
    assert refittable_by_file == {
        "text_encoder.onnx": True,
        "unet.onnx": True,
        "vae_decoder.onnx": False,
        "vae_encoder.onnx": False,
    }
    engines = weights / "engines"
    assert sorted(p.name for p in engines.iterdir()) == [
        "engines.json",
        "text_encoder.sm75-trt10.5.0.18.plan",
        "unet.sm75-trt10.5.0.18.plan",
        "vae_decoder.sm75-trt10.5.0.18.plan",
        "vae_encoder.sm75-trt10.5.0.18.plan",
    ]
    assert (engines / "unet.sm75-trt10.5.0.18.plan").read_bytes() == b"unet.onnx"
    assert load_engine_manifest(weights) == written  # validated on both sides
    SCHEMA.check(ENGINES, written, engines / "engines.json")
    monkeypatch.setattr(sd_runtimes, "current_gpu", A10G.as_manifest)
    with pytest.raises(EngineMismatch, match=r"this machine \(compute capability 8\.6.*7\.5"):
        make_core(weights, runtime="tensorrt", max_batch_size=2)


def test_the_model_refuses_an_engine_manifest_of_another_format(engines_repository: Path) -> None:
    weights = engines_repository / "stable_diffusion" / "1" / "weights"
    with pytest.raises(WeightsError, match=r"engines\.json does not exist: build the engines"):
        load_engine_manifest(weights)
    (weights / "engines").mkdir()
    old = {"format": 1, "model": {"name": "x", "version": "y"}, "engines": []}
    (weights / "engines" / "engines.json").write_text(json.dumps(old))
    with pytest.raises(WeightsError, match="has format 1; this model reads format 2"):
        load_engine_manifest(weights)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_without_tensorrt_the_build_fails_clearly(
    weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = weights.parents[2]
    assert export_main(["tensorrt", "--repository", str(repo)]) == 2
    err = capsys.readouterr().err
    assert "error: TensorRT is not installed" in err
    assert not (weights / "engines").exists()


def test_bad_arguments_fail_before_tensorrt_is_needed(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = weights.parents[2]
    assert export_main(["tensorrt", "--repository", str(repo), "--sizes", "100x100"]) == 2
    assert "multiples of 16" in capsys.readouterr().err
    with pytest.raises(ExportError, match=r"weights\.schema\.json does not exist"):
        plan_engines(tmp_path)
    shutil.copytree(MODEL_SOURCE, tmp_path / "stable_diffusion", ignore=lambda *_: ["1"])
    with pytest.raises(ExportError, match="run `python -m export onnx` first"):
        dry_run(plan_engines(tmp_path))


@pytest.mark.skipif(
    not (HAS_TENSORRT and torch.cuda.is_available()),
    reason="building and running an engine needs TensorRT and a CUDA GPU; neither is here",
)
def test_engines_build_and_serve_like_onnxruntime(engines_repository: Path) -> None:
    import numpy as np

    weights = engines_repository / "stable_diffusion" / "1" / "weights"
    args = ["tensorrt", "--repository", str(engines_repository), "--max-batch-size", "2"]
    assert export_main(args) == 0
    core = make_core(weights, runtime="tensorrt", max_batch_size=2)
    reference = make_core(weights)
    req = GenerationRequest(
        prompt="an axe", seed=1, steps=4, guidance_scale=7.5, width=128, height=128
    )
    (ours,) = core.generate([core.row(req)])
    (theirs,) = reference.generate([reference.row(req)])
    assert ours is not None and theirs is not None
    assert np.abs(ours.astype(int) - theirs.astype(int)).mean() < 8  # fp16 vs fp32


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_with_tensorrt_but_no_gpu_the_build_fails_clearly(
    weights: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys
    import types

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    repo = weights.parents[2]
    assert export_main(["tensorrt", "--repository", str(repo)]) == 2
    assert "error: no CUDA GPU" in capsys.readouterr().err
