"""TensorRT engines without TensorRT: profiles, names, the engine manifest, and the model's
refusal of a mismatched engine, with synthetic manifests.

The engine build itself (`export.tensorrt_build.build_engine`) and the TensorRT runtime
(`sd_runtimes.TensorRTComponent`) are verified only where TensorRT and a CUDA GPU are
installed: this machine has neither, so the last test skips with that reason.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sd_engines import (
    EngineMismatch,
    profile_covers,
    required_shapes,
    select_engines,
    uncovered,
)
from sd_engines import gpu_key as model_gpu_key
from sd_pipeline import StableDiffusionCore
from sd_requests import GenerationRequest, InvalidRequest

from export.__main__ import main as export_main
from export.components import TEXT_ENCODER, UNET, VAE_DECODER
from export.errors import ExportError
from export.tensorrt_build import (
    ProfilePlan,
    build_engines,
    engine_entry,
    engine_filename,
    gpu_key,
    merge_engine_manifest,
    parse_sizes,
    profiles,
)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
GEO = {
    "sequence": 77,
    "hidden": 768,
    "latent_channels": 4,
    "vae_scale_factor": 8,
    "vae_scaling_factor": 0.18215,
    "size_multiple": 64,
    "default_size": 512,
}
T4 = "sm75-trt10.5.0"


def sd15_plan(**overrides: Any) -> ProfilePlan:
    fields: dict[str, Any] = dict(
        max_batch_size=8, size_multiple=64, min_size=64, max_size=1024, default_size=512
    )
    return ProfilePlan.make(**{**fields, **overrides})


def weights_manifest(version: str = "abc123") -> dict[str, Any]:
    return {
        "model": {"name": "sd15", "version": version},
        "geometry": GEO,
        "components": {s.name: s.as_manifest() for s in (TEXT_ENCODER, UNET, VAE_DECODER)},
    }


def engine_manifest(plan: ProfilePlan, key: str = T4, version: str = "abc123") -> dict[str, Any]:
    entries = [
        engine_entry(spec, key, profiles(spec, GEO, plan), {})
        for spec in (TEXT_ENCODER, UNET, VAE_DECODER)
    ]
    return merge_engine_manifest(None, {"name": "sd15", "version": version}, entries)


def test_gpu_keys_name_the_architecture_and_the_tensorrt_version() -> None:
    assert gpu_key(7, 5, "10.5.0") == T4 == model_gpu_key(7, 5, "10.5.0")
    assert gpu_key(9, 0, "10.13.2.6") == "sm90-trt10.13.2" == model_gpu_key(9, 0, "10.13.2.6")
    assert engine_filename("unet", T4) == "unet.sm75-trt10.5.0.plan"
    with pytest.raises(ExportError, match=r"not major\.minor\.patch"):
        gpu_key(7, 5, "10")


def test_a_dynamic_profile_spans_batch_1_to_max_and_the_configured_sizes() -> None:
    plan = sd15_plan()
    (unet,) = profiles(UNET, GEO, plan)
    # One unguided image at 64x64 ... eight guided images (16 UNet rows) at 1024x1024.
    assert unet["sample"] == ((1, 4, 8, 8), (8, 4, 64, 64), (16, 4, 128, 128))
    assert unet["timestep"] == ((1,), (8,), (16,))
    assert unet["encoder_hidden_states"] == ((1, 77, 768), (8, 77, 768), (16, 77, 768))
    (text,) = profiles(TEXT_ENCODER, GEO, plan)
    assert text["input_ids"] == ((1, 77), (8, 77), (16, 77))  # prompts + negative prompts
    (vae,) = profiles(VAE_DECODER, GEO, plan)
    assert vae["latent_sample"] == ((1, 4, 8, 8), (4, 4, 64, 64), (8, 4, 128, 128))


def test_fixed_sizes_give_one_profile_each() -> None:
    plan = sd15_plan(sizes=parse_sizes("512x512,768x512"), max_batch_size=4, opt_batch=2)
    p512, p768 = profiles(UNET, GEO, plan)
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


def test_the_engine_manifest_keeps_other_gpus_and_drops_other_weights() -> None:
    plan = sd15_plan()
    t4 = engine_manifest(plan)
    assert [e["file"] for e in t4["engines"]] == [
        "text_encoder.sm75-trt10.5.0.plan",
        "unet.sm75-trt10.5.0.plan",
        "vae_decoder.sm75-trt10.5.0.plan",
    ]
    assert {e["precision"] for e in t4["engines"]} == {"fp16"}
    assert t4["engines"][1]["profiles"][0]["sample"] == {
        "min": [1, 4, 8, 8],
        "opt": [8, 4, 64, 64],
        "max": [16, 4, 128, 128],
    }
    a10g = engine_entry(UNET, "sm86-trt10.5.0", profiles(UNET, GEO, plan), {})
    both = merge_engine_manifest(t4, t4["model"], [a10g])
    assert sorted({e["gpu_key"] for e in both["engines"]}) == ["sm75-trt10.5.0", "sm86-trt10.5.0"]
    rebuilt = merge_engine_manifest(both, {"name": "sd15", "version": "new"}, [a10g])
    assert rebuilt["engines"] == [a10g]
    json.dumps(both)  # plain JSON


def test_the_model_picks_the_engines_built_for_its_gpu() -> None:
    manifest = engine_manifest(sd15_plan(), key=T4)
    manifest["engines"] += engine_manifest(sd15_plan(), key="sm86-trt10.5.0")["engines"]
    chosen = select_engines(
        manifest, weights_manifest(), "sm86-trt10.5.0", max_batch_size=8, sizes=[(512, 512)]
    )
    assert {e["gpu_key"] for e in chosen.values()} == {"sm86-trt10.5.0"}
    assert set(chosen) == {"text_encoder", "unet", "vae_decoder"}


def test_the_model_refuses_another_gpu_or_tensorrt_version_naming_both_keys() -> None:
    manifest = engine_manifest(sd15_plan(), key=T4)
    for here in ("sm90-trt10.5.0", "sm75-trt10.6.0"):
        with pytest.raises(EngineMismatch) as caught:
            select_engines(manifest, weights_manifest(), here, max_batch_size=8, sizes=[(512, 512)])
        assert here in str(caught.value) and T4 in str(caught.value)
        assert "python -m export tensorrt" in str(caught.value)


def test_the_model_refuses_engines_without_a_profile_for_its_batch_or_size() -> None:
    small = engine_manifest(sd15_plan(max_batch_size=4))
    with pytest.raises(EngineMismatch, match=r"batch 1\.\.8.*no optimisation profile"):
        select_engines(small, weights_manifest(), T4, max_batch_size=8, sizes=[(512, 512)])
    only_512 = engine_manifest(sd15_plan(sizes=[(512, 512)]))
    select_engines(only_512, weights_manifest(), T4, max_batch_size=8, sizes=[(512, 512)])
    with pytest.raises(EngineMismatch, match="768x512"):
        select_engines(only_512, weights_manifest(), T4, max_batch_size=8, sizes=[(512, 768)])
    with pytest.raises(EngineMismatch, match="weights version 'abc123'"):
        select_engines(
            only_512, weights_manifest("other"), T4, max_batch_size=8, sizes=[(512, 512)]
        )
    broken = copy.deepcopy(only_512)
    broken["format"] = 99
    with pytest.raises(EngineMismatch, match="format 99"):
        select_engines(broken, weights_manifest(), T4, max_batch_size=8, sizes=[(512, 512)])


def test_profile_coverage_is_axis_by_axis() -> None:
    (unet,) = engine_manifest(sd15_plan(sizes=[(512, 512)]))["engines"][1:2]
    shapes = required_shapes(weights_manifest(), "unet", 16, 512, 512)
    assert shapes["sample"] == (16, 4, 64, 64)
    assert profile_covers(unet["profiles"][0], shapes)
    assert not profile_covers(unet["profiles"][0], {**shapes, "sample": (17, 4, 64, 64)})
    assert uncovered(unet, weights_manifest(), 8, [(512, 512)]) is None


def test_the_pipeline_refuses_a_size_its_engines_lack(weights: Path) -> None:
    """A stand-in component carries a synthetic engine entry; no TensorRT runs."""
    core = StableDiffusionCore(weights)
    tiny = core.manifest
    entry = engine_entry(
        UNET,
        T4,
        profiles(
            UNET,
            tiny["geometry"],
            ProfilePlan.make(
                max_batch_size=2,
                size_multiple=16,
                min_size=64,
                max_size=1024,
                default_size=128,
                sizes=[(128, 128)],
            ),
        ),
        {},
    )
    core.components["unet"].engine_entry = entry  # type: ignore[attr-defined]
    fields: dict[str, Any] = dict(
        prompt="an axe", seed=1, steps=2, guidance_scale=7.5, scheduler="ddim"
    )
    core.row(GenerationRequest(width=128, height=128, **fields))
    with pytest.raises(InvalidRequest, match="width 256 x height 128 is not served"):
        core.row(GenerationRequest(width=256, height=128, **fields))


def test_dry_run_prints_the_engine_manifest_from_the_config(
    weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = weights.parents[2]
    code = export_main(["tensorrt", "--repository", str(repo), "--dry-run", "--sizes", "128x128"])
    assert code == 0
    manifest = json.loads(capsys.readouterr().out)
    assert (
        manifest["model"]["version"]
        == json.loads((weights / "manifest.json").read_text())["model"]["version"]
    )
    unet = next(e for e in manifest["engines"] if e["component"] == "unet")
    # config.pbtxt: max_batch_size 8, so up to 16 guided UNet rows.
    assert unet["profiles"][0]["sample"]["max"] == [16, 4, 16, 16]
    assert not (weights / "engines").exists()  # a dry run writes nothing


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
    with pytest.raises(ExportError, match="run `python -m export onnx` first"):
        build_engines(tmp_path, dry_run=True)


@pytest.mark.skipif(
    not (HAS_TENSORRT and torch.cuda.is_available()),
    reason="building and running an engine needs TensorRT and a CUDA GPU; neither is here",
)
def test_engines_build_and_serve_like_onnxruntime(weights: Path) -> None:
    import numpy as np

    repo = weights.parents[2]
    assert export_main(["tensorrt", "--repository", str(repo), "--max-batch-size", "2"]) == 0
    core = StableDiffusionCore(weights, runtime="tensorrt", max_batch_size=2)
    reference = StableDiffusionCore(weights)
    req = GenerationRequest(
        prompt="an axe",
        seed=1,
        steps=4,
        guidance_scale=7.5,
        width=128,
        height=128,
        scheduler="ddim",
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
