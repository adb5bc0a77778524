"""Studio styles served per request on the torch runtime: parity with diffusers' own LoRA
loading for both layouts, weight 0 as no style, rows with different styles in one batch
independent of each other, styles published and removed while the model runs (in-process
and through a real Triton), the memory budget's least-recently-used unloading, and the
requests refused (unknown style, weight out of bounds, a runtime that applies no styles).
TensorRT engines refitted with a style are checked only where TensorRT and a GPU exist."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from safetensors.torch import save_file
from sd_pipeline import StableDiffusionCore
from sd_requests import GenerationRequest, InvalidRequest
from tritonclient.utils import InferenceServerException

from export.styles import add_style, list_styles, remove_style
from export.tiny_lora import write_test_loras
from launcher.triton import Triton
from tests.conftest import ROOT, make_core

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
PROMPT = "a frost-forged legendary axe in the studio's style"


def request(**overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = dict(
        prompt=PROMPT, negative_prompt="blurry", seed=42, steps=4, scheduler="euler"
    )
    return GenerationRequest(**{**fields, **overrides})


def one(core: StableDiffusionCore, **overrides: Any) -> np.ndarray:
    (image,) = core.generate([core.row(request(**overrides))])
    assert image is not None
    return image


def levels(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def base_pipe(tiny_model: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lora_files(base_pipe: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("served-loras")
    files = write_test_loras(base_pipe, folder / "ember", seed=11)
    files["other"] = write_test_loras(base_pipe, folder / "other", seed=12)["peft"]
    files["large"] = write_test_loras(base_pipe, folder / "large", rank=128, seed=13)["peft"]
    return files


@pytest.fixture
def styles(repository: Path, lora_files: dict[str, Path]) -> Iterator[Path]:
    """`ember` (the kohya file) and `other` published; every style removed afterwards."""
    add_style(repository, "ember", lora_files["kohya"])
    add_style(repository, "other", lora_files["other"])
    yield repository
    for style in list_styles(repository):
        remove_style(repository, style["name"])


RUNTIMES = ["onnxruntime", "torch"]


@pytest.fixture(scope="module", params=RUNTIMES)
def core(request: pytest.FixtureRequest, weights: Path) -> StableDiffusionCore:
    return make_core(weights, runtime=request.param)


def diffusers_styled(tiny_model: Path, file: Path, weight: float) -> np.ndarray:
    """diffusers' image for `request()` with `file` loaded by load_lora_weights at `weight`."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="studio")
    pipe.set_adapters(["studio"], [weight])
    r = request()
    image = pipe(
        r.prompt,
        negative_prompt=r.negative_prompt,
        num_inference_steps=r.steps,
        generator=torch.Generator().manual_seed(r.seed),
        output_type="np",
    ).images[0]
    return (image * 255).round().astype(np.uint8)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_a_styled_image_equals_diffusers_with_the_lora_loaded(
    core: StableDiffusionCore,
    styles: Path,
    lora_files: dict[str, Path],
    tiny_model: Path,
    layout: str,
) -> None:
    add_style(styles, "studio", lora_files[layout])
    for weight in (0.6, 1.0):
        ours = one(core, style="studio", style_weight=weight)
        want = diffusers_styled(tiny_model, lora_files[layout], weight)
        assert levels(ours, want) <= 1, f"{layout} at {weight}"
        assert levels(ours, one(core)) > 8  # the style shows


def test_weight_zero_is_no_style(core: StableDiffusionCore, styles: Path) -> None:
    plain = one(core)
    one(core, style="ember")  # a style applied before leaves nothing behind
    assert np.array_equal(one(core, style="ember", style_weight=0.0), plain)
    row = core.row(request(style="ember", style_weight=0.0))
    assert row.style is None
    assert row.request.group_key == core.row(request()).request.group_key


def test_rows_with_different_styles_in_one_batch_are_each_as_alone(
    core: StableDiffusionCore, styles: Path
) -> None:
    asked = [
        dict(style="ember", style_weight=0.8),
        {},
        dict(style="other"),
        dict(style="ember", style_weight=0.5, seed=7),
        dict(style="ember", style_weight=0.8, seed=9),
    ]
    rows = [core.row(request(**a)) for a in asked]
    assert len(core.batches(rows)) == 4  # ember at 0.8 twice shares one batch
    together = core.generate(rows)
    for i, (a, image) in enumerate(zip(asked, together, strict=True)):
        assert image is not None
        alone = one(core, **a)
        if i in (1, 2, 3) or core.settings.runtime == "onnxruntime":  # the same bytes
            assert np.array_equal(image, alone), a
        else:  # torch's kernels vary with the batch size (tests/test_runtimes.py)
            assert levels(image, alone) <= 1, a
    assert len({image.tobytes() for image in together if image is not None}) == 5


def test_styles_published_and_removed_while_running(
    core: StableDiffusionCore, styles: Path, lora_files: dict[str, Path]
) -> None:
    with pytest.raises(InvalidRequest, match="unknown style 'fresh'; styles available: ember, o"):
        core.row(request(style="fresh"))
    add_style(styles, "fresh", lora_files["peft"])
    first = one(core, style="fresh")
    before = core.row(request(style="fresh"))
    add_style(styles, "fresh", lora_files["other"])  # republished: new weights, same name
    after = core.row(request(style="fresh"))
    assert len(core.batches([before, after])) == 2  # each row keeps the style it found
    assert np.array_equal(one(core, style="fresh"), one(core, style="other"))
    assert not np.array_equal(first, one(core, style="fresh"))
    remove_style(styles, "fresh")
    with pytest.raises(InvalidRequest, match="unknown style 'fresh'"):
        core.row(request(style="fresh"))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_memory_budget_unloads_the_least_recently_used_style(
    weights: Path, styles: Path, lora_files: dict[str, Path], runtime: str
) -> None:
    add_style(styles, "large", lora_files["large"])  # rank 128: over the 3 MB budget alone
    core = make_core(weights, runtime=runtime, style_memory_mb="3")

    def resident() -> list[str]:
        return [style.name for style, _ in core.styles.resident.values()]

    ember = one(core, style="ember")
    large = one(core, style="large")
    assert resident() == ["large"]  # loaded alone: ember unloaded
    assert core.styles.resident_bytes() > 3 * 2**20
    assert np.array_equal(one(core, style="ember"), ember)  # loaded again, same image
    other = one(core, style="other")
    assert resident() == ["ember", "other"]  # both fit
    one(core, style="ember")
    assert resident() == ["other", "ember"]  # ember used last
    assert np.array_equal(one(core, style="large"), large)
    assert resident() == ["large"]
    assert np.array_equal(one(core, style="other"), other)


def test_bad_style_requests_are_refused(weights: Path, styles: Path) -> None:
    core = make_core(weights, runtime="onnxruntime", style_memory_mb="0")
    with pytest.raises(InvalidRequest, match=r"serves no styles \(its style_memory_mb is 0\)"):
        core.row(request(style="ember"))
    assert not core.components["unet"].style_targets  # plain sessions, pre-packed
    with pytest.raises(InvalidRequest, match=r"style_weight 2.5 is outside \[0.0, 2.0\]"):
        core.row(request(style="ember", style_weight=2.5))
    with pytest.raises(InvalidRequest, match=r"style_weight 0\.5 applies to a style"):
        core.row(request(style_weight=0.5))
    with pytest.raises(InvalidRequest, match=r"unknown style '\.\./ember'"):
        core.row(request(style="../ember"))
    manifest_file = styles / "stable_diffusion" / "styles" / "ember" / "style.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["base_model"]["version"] = "0123456789ab"  # imported for other weights
    manifest_file.write_text(json.dumps(manifest))
    served = make_core(weights, runtime="onnxruntime")
    with pytest.raises(InvalidRequest, match="was imported for forge-tiny-sd version 0123456789ab"):
        served.row(request(style="ember"))
    manifest["format"] = 2  # written by a newer export
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(InvalidRequest, match=r"cannot be served: .* this model reads format 1"):
        served.row(request(style="ember"))


@pytest.fixture(scope="module")
def torch_triton(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    """The tiny model in its own Triton on runtime torch, with its own styles folder."""
    import subprocess

    copy = tmp_path_factory.mktemp("styled") / "model_repository"
    shutil.copytree(repository, copy, symlinks=True)
    shutil.rmtree(copy / "stable_diffusion" / "styles", ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "export", "config", "--repository", str(copy), "--runtime", "torch"],
        check=True,
        cwd=ROOT,
    )
    server = Triton(copy, tmp_path_factory.mktemp("styled-triton")).start()
    try:
        server.load()
        yield server
    finally:
        server.stop()


def infer(triton: Triton, style: str | None = None, weight: float | None = None) -> np.ndarray:
    inputs = []
    values: list[tuple[str, str, np.ndarray]] = [
        ("prompt", "BYTES", np.array([[PROMPT.encode()]], dtype=object)),
        ("negative_prompt", "BYTES", np.array([[b"blurry"]], dtype=object)),
        ("seed", "INT64", np.array([[42]], dtype=np.int64)),
        ("steps", "INT32", np.array([[4]], dtype=np.int32)),
        ("scheduler", "BYTES", np.array([[b"euler"]], dtype=object)),
    ]
    if style is not None:
        values.append(("style", "BYTES", np.array([[style.encode()]], dtype=object)))
    if weight is not None:
        values.append(("style_weight", "FP32", np.array([[weight]], dtype=np.float32)))
    for name, dtype, value in values:
        tensor = grpcclient.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        result = client.infer("stable_diffusion", inputs)
    return result.as_numpy("generated_image")[0]


@pytest.mark.parametrize("server", ["triton", "torch_triton"])  # onnxruntime, torch
def test_a_style_published_while_triton_runs_is_served_by_the_next_request(
    server: str,
    request: pytest.FixtureRequest,
    lora_files: dict[str, Path],
    tiny_model: Path,
) -> None:
    triton: Triton = request.getfixturevalue(server)
    with pytest.raises(InferenceServerException, match="unknown style 'hot'") as caught:
        infer(triton, "hot")
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    add_style(triton.repository, "hot", lora_files["peft"])
    try:
        served = infer(triton, "hot", 0.7)
    finally:
        remove_style(triton.repository, "hot")
    assert levels(served, diffusers_styled(tiny_model, lora_files["peft"], 0.7)) <= 1
    with pytest.raises(InferenceServerException, match="unknown style 'hot'; styles available"):
        infer(triton, "hot", 0.7)


def test_onnx_initializers_are_matched_to_modules_by_value(weights: Path) -> None:
    """Convolutions keep their torch names; unbiased linear layers are MatMuls on transposed
    weights under names of the exporter's own, found by value."""
    core = make_core(weights, runtime="onnxruntime")
    unet = core.components["unet"].style_targets
    conv = unet["down_blocks.1.attentions.0.proj_in"]
    assert (conv.initializer, conv.transposed) == (
        "unet.down_blocks.1.attentions.0.proj_in.weight",
        False,
    )
    to_q = unet["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert to_q.initializer.startswith("onnx::MatMul_") and to_q.transposed
    text = core.components["text_encoder"].style_targets
    assert {f"encoder.layers.{i}.mlp.fc1" for i in range(5)} <= set(text)


def test_a_style_the_onnx_files_cannot_take_is_refused_on_onnxruntime(
    weights: Path, tmp_path: Path
) -> None:
    from sd_style_onnx import OnnxStyles
    from sd_styles import Style

    core = make_core(weights, runtime="onnxruntime")
    save_file(
        {"unet.time_proj.lora_A.weight": torch.zeros(4, 8)},
        str(tmp_path / "lora.safetensors"),
    )
    style = Style("odd", "0", tmp_path, {"file": "lora.safetensors"})
    with pytest.raises(InvalidRequest, match="adapts unet time_proj, which the exported ONNX"):
        OnnxStyles(core.components).check(style)


@pytest.mark.skipif(
    not (HAS_TENSORRT and torch.cuda.is_available()),
    reason="refitting engines with a style needs TensorRT and a CUDA GPU; neither is here (it "
    "runs where `python -m export tensorrt` builds engines, as on deploy.yml's T4 runner)",
)
def test_refitted_engines_serve_a_style_like_onnxruntime(
    repository: Path, lora_files: dict[str, Path], tmp_path: Path
) -> None:
    from export.__main__ import main as export_main

    copy = Path(shutil.copytree(repository, tmp_path / "repo", symlinks=True))
    weights = copy / "stable_diffusion" / "1" / "weights"
    args = ["--repository", str(copy), "--max-batch-size", "2", "--refittable"]
    assert export_main(["tensorrt", *args]) == 0
    add_style(copy, "ember", lora_files["kohya"])
    engines = make_core(weights, runtime="tensorrt", max_batch_size=2)
    reference = make_core(weights, runtime="onnxruntime")
    plain = one(engines)
    styled = one(engines, style="ember", style_weight=0.8)
    want = one(reference, style="ember", style_weight=0.8)
    assert np.abs(styled.astype(int) - want.astype(int)).mean() < 8  # fp16 vs fp32
    assert levels(styled, plain) > 8
    assert np.array_equal(one(engines), plain)  # refitted back to the exported weights
