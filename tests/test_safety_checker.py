"""The optional safety checker: its export and parity, the model's preprocessing and decision
against diffusers', the actions on a flagged image, and `flagged` through the real Triton."""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
import tritonclient.grpc as grpcclient
from sd_contract import ConfigError
from sd_pipeline import StableDiffusionCore
from sd_requests import GenerationRequest
from sd_safety import SafetySettings, blur, is_flagged

from export.__main__ import main as export_main
from export.components import COMPONENTS, SAFETY_CHECKER, SafetyCheckerModule
from export.errors import ExportError
from export.onnx_export import export_onnx
from export.safety import preprocessing
from gateway.triton_client import (
    MODEL_NAME,
    AsyncTriton,
    GeneratedImage,
    ImageParams,
    generate,
    read_result,
)
from launcher.triton import Triton, copy_model_repository
from tests.conftest import make_core

ROWS = [
    GenerationRequest(prompt=p, seed=s, steps=2, width=128, height=h, scheduler="euler")
    for p, s, h in [
        ("a frost-forged legendary axe", 1, 128),
        ("a rusty sword", 2, 128),
        ("a bone dagger", 3, 144),
        ("a bow of yew", 4, 128),
    ]
]
# Scores of the tiny checker's images lie about 0.75 to 0.97 below its thresholds: this grid
# crosses them in steps that fall on no 3-decimal rounding boundary.
ADJUSTMENTS = [0.0, *np.arange(0.70, 1.02, 0.0037).tolist()]


def checker_module(tiny_model: Path) -> Any:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    return StableDiffusionSafetyChecker.from_pretrained(tiny_model / "safety_checker").eval()


def feature_extractor(weights: Path) -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor.from_pretrained(weights / "diffusers" / "feature_extractor")


@pytest.fixture(scope="module")
def core(weights: Path) -> StableDiffusionCore:
    return make_core(weights)


@pytest.fixture(scope="module")
def images(core: StableDiffusionCore) -> list[np.ndarray]:
    """Decoded images of the tiny model, flat images and noise: what the checker sees."""
    decoded = core.generate([core.row(r) for r in ROWS])
    flat = [np.full((128, 128, 3), level, dtype=np.uint8) for level in (0, 128, 255)]
    noise = [np.random.default_rng(s).integers(0, 256, (96, 160, 3), np.uint8) for s in (0, 1)]
    return [*(i for i in decoded if i is not None), *flat, *noise]


@pytest.mark.parametrize(("height", "width"), [(128, 128), (144, 128), (64, 208), (768, 512)])
def test_preprocessing_is_the_clip_image_processors_bit_for_bit(
    core: StableDiffusionCore, weights: Path, height: int, width: int
) -> None:
    assert core.safety is not None
    rng = np.random.default_rng(height * width)
    coarse = rng.integers(0, 256, (height // 8, width // 8, 3), np.uint8)
    image = np.asarray(
        PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.Resampling.BICUBIC)
    )
    ours = core.safety.preprocessing(image)
    theirs = feature_extractor(weights)(PIL.Image.fromarray(image), return_tensors="np")
    assert ours.shape == theirs.pixel_values[0].shape == (3, 224, 224)
    assert ours.dtype == np.float32
    assert np.array_equal(ours, theirs.pixel_values[0])


def test_the_onnx_checker_matches_torch(
    core: StableDiffusionCore, images: list[np.ndarray], tiny_model: Path, weights: Path
) -> None:
    assert core.safety is not None
    clip_input = np.stack([core.safety.preprocessing(i) for i in images])
    module = SafetyCheckerModule(checker_module(tiny_model)).eval()
    with torch.no_grad():
        expected = [t.numpy() for t in module(torch.from_numpy(clip_input))]
    got = core.safety.similarities(clip_input)
    worst = max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
    print(f"safety checker: max |onnxruntime - torch| = {worst:.3g} on {len(images)} images")
    assert [g.shape for g in got] == [(len(images), 3), (len(images), 17)]
    assert worst <= 1e-5
    parity = json.loads((weights / "manifest.json").read_text())["parity"]["safety_checker"]
    assert parity["max_abs_diff"] <= parity["tolerance"]


def diffusers_flags(checker: Any, clip_input: np.ndarray, adjustment: float) -> list[bool]:
    """diffusers' own decision (StableDiffusionSafetyChecker.forward) with every threshold
    lowered by `adjustment`."""
    lowered = copy.deepcopy(checker)
    with torch.no_grad():
        lowered.special_care_embeds_weights -= adjustment
        lowered.concept_embeds_weights -= adjustment
    blank = [np.zeros((1, 1, 3)) for _ in clip_input]
    _, flags = lowered(clip_input=torch.from_numpy(clip_input), images=blank)
    return [bool(f) for f in flags]


def test_the_decision_is_diffusers_at_every_adjustment(
    core: StableDiffusionCore, images: list[np.ndarray], tiny_model: Path, weights: Path
) -> None:
    assert core.safety is not None
    clip_input = feature_extractor(weights)(
        [PIL.Image.fromarray(i) for i in images], return_tensors="np"
    ).pixel_values
    checker = checker_module(tiny_model)
    special, concepts = core.safety.similarities(clip_input)
    ours, theirs, bumped = {}, {}, 0
    for a in ADJUSTMENTS:
        check = replace(core.safety, settings=SafetySettings("none", a))
        ours[a] = [check.flagged(i) for i in images]
        theirs[a] = diffusers_flags(checker, clip_input, a)
        # Flagged only thanks to a special-care concept's 0.01 (no special care: not flagged).
        no_special = np.full_like(special[0], -1.0)
        bumped += sum(
            flag and not is_flagged(no_special, c, core.safety.thresholds, a)
            for flag, c in zip(ours[a], concepts, strict=True)
        )
    assert ours == theirs
    assert not any(ours[0.0]), "the tiny checker flags nothing at the default adjustment"
    assert any(any(f) and not all(f) for f in ours.values()), "no adjustment flags some only"
    assert all(ours[ADJUSTMENTS[-1]])
    assert bumped >= 1, "no case where the special-care rule decided"


def test_the_torch_runtime_decides_as_onnx_runtime(
    core: StableDiffusionCore, images: list[np.ndarray], weights: Path
) -> None:
    torch_core = make_core(weights, runtime="torch")
    assert core.safety is not None and torch_core.safety is not None
    clip_input = np.stack([core.safety.preprocessing(i) for i in images])
    by_onnx, by_torch = (
        core.safety.similarities(clip_input),
        torch_core.safety.similarities(clip_input),
    )
    assert max(float(np.abs(a - b).max()) for a, b in zip(by_onnx, by_torch, strict=True)) < 1e-5
    for a in ADJUSTMENTS:
        settings = SafetySettings("none", a)
        onnx_check = replace(core.safety, settings=settings)
        torch_check = replace(torch_core.safety, settings=settings)
        assert [onnx_check.flagged(i) for i in images] == [torch_check.flagged(i) for i in images]


def adjustment_flagging_some(core: StableDiffusionCore, images: list[np.ndarray]) -> float:
    """An adjustment at which some of `images` are flagged and some are not."""
    assert core.safety is not None
    for a in ADJUSTMENTS:
        flags = [
            replace(core.safety, settings=SafetySettings("none", a)).flagged(i) for i in images
        ]
        if any(flags) and not all(flags):
            return a
    raise AssertionError("no adjustment flags some of the images only")


def test_a_rows_flag_and_image_do_not_depend_on_its_batch_mates(
    core: StableDiffusionCore, images: list[np.ndarray], weights: Path
) -> None:
    a = adjustment_flagging_some(core, images[: len(ROWS)])
    mixed = make_core(weights, safety_adjustment=repr(a), safety_action="replace")
    alone = []
    for r in ROWS:
        row = mixed.row(r)
        (image,) = mixed.generate([row])
        alone.append((row.flagged, image))
    rows = [mixed.row(r) for r in ROWS]
    decoded = mixed.generate(rows)
    together = list(zip([r.flagged for r in rows], decoded, strict=True))
    flags = [f for f, _ in together]
    assert [f for f, _ in alone] == flags and any(flags) and not all(flags)
    for (_, a_image), (flag, t_image) in zip(alone, together, strict=True):
        assert a_image is not None and t_image is not None
        assert a_image.tobytes() == t_image.tobytes()
        assert bool((t_image == 128).all()) == flag  # replaced: flat grey


def test_the_default_settings_flag_nothing_and_change_no_byte(
    core: StableDiffusionCore, images: list[np.ndarray]
) -> None:
    assert core.safety is not None and core.safety.settings == SafetySettings("blur", 0.0)
    rows = [core.row(r) for r in ROWS]
    decoded = core.generate(rows)
    assert not any(r.flagged for r in rows)
    for got, seen in zip(decoded, images[: len(ROWS)], strict=True):
        assert got is not None and got.tobytes() == seen.tobytes()


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"safety_adjustment": "0"}, "safety_action is missing"),
        ({"safety_action": "blur"}, "safety_adjustment is missing"),
        ({"safety_action": "hide", "safety_adjustment": "0"}, "safety_action 'hide': choose"),
        ({"safety_action": "none", "safety_adjustment": "lots"}, "'lots' is not a finite"),
        ({"safety_action": "none", "safety_adjustment": "nan"}, "'nan' is not a finite"),
    ],
)
def test_bad_safety_settings_refuse_to_load_naming_the_parameter(
    parameters: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        SafetySettings.from_config(parameters)


def test_weights_without_a_checker_are_served_unflagged(weights: Path, tmp_path: Path) -> None:
    for item in weights.iterdir():
        if item.name != "manifest.json":
            (tmp_path / item.name).symlink_to(item)
    manifest = json.loads((weights / "manifest.json").read_text())
    del manifest["safety_checker"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    bare = make_core(tmp_path, safety_adjustment="1000")
    assert bare.safety is None
    rows = [bare.row(r) for r in ROWS[:2]]
    assert all(i is not None for i in bare.generate(rows))
    assert not any(r.flagged for r in rows)


def test_a_model_folder_without_a_checker_exports_as_before(
    tiny_model: Path, tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(tiny_model, tmp_path / "no-checker"))
    for part in ("safety_checker", "feature_extractor"):
        shutil.rmtree(folder / part)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=[None, None], feature_extractor=[None, None])
    (folder / "model_index.json").write_text(json.dumps(index))
    repo = copy_model_repository(tmp_path / "repo")
    manifest = export_onnx(str(folder), repo)
    assert "safety_checker" not in manifest
    assert set(manifest["components"]) == set(manifest["parity"]) == {c.name for c in COMPONENTS}
    weights = repo / "stable_diffusion" / "1" / "weights"
    assert not (weights / SAFETY_CHECKER.filename).exists()
    assert not (weights / "diffusers" / "safety_checker").exists()


def test_a_feature_extractor_the_model_cannot_follow_is_refused() -> None:
    from transformers import CLIPImageProcessor

    with pytest.raises(ExportError, match="do_center_crop off"):
        preprocessing(CLIPImageProcessor(do_center_crop=False))
    with pytest.raises(ExportError, match="resizes the shortest edge only"):
        preprocessing(CLIPImageProcessor(size={"height": 224, "width": 224}))


def test_a_result_without_flagged_reads_as_unflagged() -> None:
    class OlderModel:  # an InferResult of a model without the `flagged` output
        def as_numpy(self, name: str) -> np.ndarray | None:
            outputs = {
                "generated_image": np.zeros((2, 4, 4, 3), np.uint8),
                "seed": np.array([[1], [2]], np.int64),
            }
            return outputs.get(name)

    assert [(i.seed, i.flagged) for i in read_result(OlderModel())] == [(1, False), (2, False)]


# Through the real Triton: every image flagged (the adjustment is far above any score).
AXE = ImageParams(
    prompt="a frost-forged legendary axe", seed=5, steps=3, width=128, height=128, scheduler="ddim"
)
SWORD = replace(AXE, prompt="a rusty sword", seed=6)


@pytest.fixture(scope="module", params=["blur", "replace", "none"])
def flagging_triton(
    request: pytest.FixtureRequest, repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Triton]]:
    """Both models in their own Triton, flagging every image, acting as `request.param` says;
    the config written by `export config`."""
    action = request.param
    copy_dir = tmp_path_factory.mktemp(f"flagging-{action}") / "model_repository"
    shutil.copytree(repository, copy_dir, symlinks=True)
    parameters = [f"--parameter=safety_action={action}", "--parameter=safety_adjustment=3"]
    assert export_main(["config", "--repository", str(copy_dir), *parameters]) == 0
    server = Triton(copy_dir, tmp_path_factory.mktemp(f"flagging-{action}-triton")).start()
    try:
        server.load_served()
        yield action, server
    finally:
        server.stop()


def test_forced_flags_come_back_and_the_action_decides_the_pixels(
    flagging_triton: tuple[str, Triton], triton: Triton
) -> None:
    action, flagging = flagging_triton
    plain = generate(triton.grpc_url, [AXE, SWORD])
    assert [i.flagged for i in plain] == [False, False]
    for protocol, url in [("grpc", flagging.grpc_url), ("http", flagging.http_url)]:
        flagged = generate(url, [AXE, SWORD], protocol=protocol)
        assert [i.flagged for i in flagged] == [True, True]
        assert [i.seed for i in flagged] == [i.seed for i in plain]
        for got, original in zip(flagged, plain, strict=True):
            if action == "none":
                assert got.pixels.tobytes() == original.pixels.tobytes()
            elif action == "replace":
                assert (got.pixels == 128).all()
            else:
                assert got.pixels.tobytes() != original.pixels.tobytes()
                assert got.pixels.tobytes() == blur(original.pixels).tobytes()
    # NVIDIA's tutorial client asks for the image alone; the extra output is no bother.
    prompt = grpcclient.InferInput("prompt", [1, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[b"an axe"]], dtype=np.object_))
    with grpcclient.InferenceServerClient(flagging.grpc_url) as client:
        result = client.infer(
            MODEL_NAME, [prompt], outputs=[grpcclient.InferRequestedOutput("generated_image")]
        )
    assert result.as_numpy("generated_image").shape == (1, 128, 128, 3)
    assert result.as_numpy("flagged") is None


async def final_image(triton: Triton, row: ImageParams) -> GeneratedImage:
    client = AsyncTriton(triton.grpc_url, timeout_s=120)
    try:
        events = [event async for event in client.stream(row, preview_every=1)]
    finally:
        await client.close()
    final = events[-1]
    assert isinstance(final, GeneratedImage) and len(events) > 1
    return final


def test_the_streaming_models_final_response_carries_flagged(
    flagging_triton: tuple[str, Triton], triton: Triton
) -> None:
    _, flagging = flagging_triton
    streamed = asyncio.run(final_image(flagging, AXE))
    (plain,) = generate(flagging.grpc_url, [AXE])
    assert streamed.flagged and plain.flagged
    assert streamed.pixels.tobytes() == plain.pixels.tobytes()
    assert not asyncio.run(final_image(triton, AXE)).flagged
