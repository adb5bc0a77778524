"""The runtimes behind the one pipeline core: torch (run on the CPU), the ONNX Runtime CPU
path it must agree with, and the helpers the GPU runtimes share.

The `onnxruntime_cuda`, CUDA `torch` and `tensorrt` tests run only where a CUDA GPU (and
onnxruntime-gpu or TensorRT) exist; elsewhere they skip, naming what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sd_contract import ConfigError
from sd_pipeline import StableDiffusionCore
from sd_requests import GenerationRequest
from sd_runtimes import RuntimeSettings, load_components
from sd_weights import load_manifest, output_shape

from tests.conftest import core_config, diffusers_reference, make_core

PROMPT = "a frost-forged legendary axe"


def request(**overrides) -> GenerationRequest:  # type: ignore[no-untyped-def]
    fields = dict(
        prompt=PROMPT,
        seed=42,
        steps=6,
        guidance_scale=7.5,
        width=128,
        height=144,
        scheduler="euler_ancestral",
        negative_prompt="blurry",
    )
    return GenerationRequest(**{**fields, **overrides})


@pytest.fixture(scope="module")
def torch_core(weights: Path) -> StableDiffusionCore:
    return make_core(weights, runtime="torch")


@pytest.fixture(scope="module")
def onnx_core(weights: Path) -> StableDiffusionCore:
    return make_core(weights)


def test_the_export_publishes_the_diffusers_copy_for_the_torch_runtime(weights: Path) -> None:
    manifest = json.loads((weights / "manifest.json").read_text())
    assert manifest["diffusers"] == "diffusers" and manifest["runtime"] == "onnx"
    copy = weights / manifest["diffusers"]
    for part in ("unet", "vae", "text_encoder"):
        assert list((copy / part).glob("*.safetensors")), part
    assert not list(copy.rglob("*.bin"))  # safetensors only
    assert manifest == load_manifest(weights)  # the model reads what the export wrote


def test_torch_runtime_on_the_cpu_is_fp32(torch_core: StableDiffusionCore) -> None:
    assert torch_core.device == torch.device("cpu")
    for component in torch_core.components.values():
        assert component.dtype == torch.float32  # type: ignore[attr-defined]


@pytest.mark.parametrize("scheduler", ["euler_ancestral", "dpmpp_2m", "ddim"])
def test_torch_runtime_matches_the_diffusers_pipeline(
    torch_core: StableDiffusionCore, diffusers_pipe, scheduler: str
) -> None:
    req = request(scheduler=scheduler)
    (ours,) = torch_core.generate([torch_core.row(req)])
    reference = diffusers_reference(diffusers_pipe, req)
    assert ours is not None and ours.shape == reference.shape == (144, 128, 3)
    diff = np.abs(ours.astype(int) - reference.astype(int))
    print(f"torch runtime, {scheduler}: max diff {diff.max()} levels")
    # The same stated tolerance as the ONNX Runtime path: at most one 8-bit level.
    assert diff.max() <= 1
    assert ours.std() > 10


def test_torch_and_onnxruntime_agree_and_batch_mates_do_not_matter(
    torch_core: StableDiffusionCore, onnx_core: StableDiffusionCore
) -> None:
    mates = [request(prompt="a rusty sword", seed=7, guidance_scale=1.0), request()]
    by_torch = torch_core.generate([torch_core.row(r) for r in mates])
    alone = torch_core.generate([torch_core.row(request())])[0]
    by_onnx = onnx_core.generate([onnx_core.row(r) for r in mates])
    assert alone is not None and by_torch[1] is not None
    # Not bit-identical: torch's CPU kernels block matrix products by batch size, so a row in a
    # batch of 2 differs from itself alone by at most one 8-bit level on ~0.01% of pixels
    # (measured). ONNX Runtime's CPU path is bit-identical (tests/test_pipeline.py).
    assert np.abs(by_torch[1].astype(int) - alone.astype(int)).max() <= 1
    for a, b in zip(by_torch, by_onnx, strict=True):
        assert a is not None and b is not None
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_onnx_runtimes_refuse_a_torch_only_export(weights: Path) -> None:
    manifest = load_manifest(weights)
    settings = RuntimeSettings("onnxruntime", 1, "")
    with pytest.raises(RuntimeError, match="--torch-only"):
        load_components(
            weights, {**manifest, "runtime": "torch"}, settings, max_batch_size=1, default_size=128
        )


def test_output_shapes_for_io_binding_follow_the_manifest(weights: Path) -> None:
    manifest = load_manifest(weights)
    hidden = manifest["dimensions"]["hidden"]
    assert output_shape(manifest, "text_encoder", [(3, 77)]) == (3, 77, hidden)
    unet_in = [(4, 4, 18, 16), (4,), (4, 77, hidden)]
    assert output_shape(manifest, "unet", unet_in) == (4, 4, 18, 16)
    assert output_shape(manifest, "vae_decoder", [(2, 4, 18, 16)]) == (2, 3, 144, 128)
    assert output_shape(manifest, "vae_encoder", [(2, 3, 144, 128)]) == (2, 8, 18, 16)


def _has_cuda_onnxruntime() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(
    not _has_cuda_onnxruntime(),
    reason="onnxruntime_cuda needs onnxruntime-gpu and a CUDA GPU; neither is here",
)
def test_onnxruntime_cuda_matches_the_cpu_runtime(
    weights: Path, onnx_core: StableDiffusionCore
) -> None:
    cuda_core = make_core(weights, runtime="onnxruntime_cuda")
    (gpu,) = cuda_core.generate([cuda_core.row(request())])
    (cpu,) = onnx_core.generate([onnx_core.row(request())])
    assert gpu is not None and cpu is not None
    assert np.abs(gpu.astype(int) - cpu.astype(int)).max() <= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch on CUDA needs a CUDA GPU")
def test_torch_runtime_on_cuda_is_fp16_and_close_to_the_cpu(
    weights: Path, onnx_core: StableDiffusionCore
) -> None:
    cuda_core = make_core(weights, runtime="torch")
    assert cuda_core.device.type == "cuda"
    (gpu,) = cuda_core.generate([cuda_core.row(request())])
    (cpu,) = onnx_core.generate([onnx_core.row(request())])
    assert gpu is not None and cpu is not None
    # fp16 vs fp32 over 6 steps: a loose bound, stated; not a parity claim.
    assert np.abs(gpu.astype(int) - cpu.astype(int)).mean() < 8


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"runtime": "tvm"}, "parameter runtime 'tvm': choose from onnxruntime"),
        ({"intra_op_threads": "0"}, "intra_op_threads '0' is not a positive integer"),
        ({"torch_compile": "fast"}, "parameter torch_compile 'fast': choose from"),
        ({"torch_compile": "default"}, "applies to runtime torch, not onnxruntime"),
    ],
)
def test_runtime_parameters_are_checked(weights: Path, changes: dict, message: str) -> None:
    parameters, _ = core_config(weights, **changes)
    with pytest.raises(ConfigError, match=message):
        RuntimeSettings.from_config(parameters)
    del parameters["runtime"]
    with pytest.raises(ConfigError, match="parameter runtime is missing"):
        RuntimeSettings.from_config(parameters)


@pytest.mark.parametrize(
    ("runtime", "expected"),
    [("torch", 3), ("onnxruntime", 1), ("onnxruntime_cuda", 1), ("tensorrt", 1)],
)
def test_torch_gets_the_threads_only_where_it_runs_the_networks(
    runtime: str, expected: int
) -> None:
    assert RuntimeSettings(runtime, 3, "").torch_threads == expected


def compiled_matches_eager(compiled: StableDiffusionCore, eager: StableDiffusionCore) -> None:
    """Three batch sizes and a size other than the warm-up's through the one dynamic-shape
    compilation, with no recompilation after the warm-up (an unguided single row too), each
    within one 8-bit level of eager torch on the same device."""
    small = dict(width=64, height=64, steps=3)
    unguided = request(guidance_scale=1.0, **small)  # a UNet batch of one
    for batch in ([request(**small)], [request(**small), request(seed=9, **small)], [unguided]):
        with torch._dynamo.config.patch(error_on_recompile=True):
            ours = compiled.generate([compiled.row(r) for r in batch])
        theirs = eager.generate([eager.row(r) for r in batch])
        for a, b in zip(ours, theirs, strict=True):
            assert a is not None and b is not None
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_torch_compile_matches_eager_on_the_cpu(
    weights: Path, torch_core: StableDiffusionCore
) -> None:
    """torch.compile (inductor, dynamic shapes) of the UNet; the warm-up pays for it."""
    compiled = make_core(weights, runtime="torch", torch_compile="default")
    compiled.warm_up()
    compiled_matches_eager(compiled, torch_core)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CUDA graphs need a CUDA GPU; perf/gpu_bench.py serves this mode on the GPU machine",
)
def test_torch_compile_with_cuda_graphs_matches_eager_on_cuda(weights: Path) -> None:
    eager = make_core(weights, runtime="torch")
    graphed = make_core(weights, runtime="torch", torch_compile="reduce-overhead")
    graphed.warm_up()
    compiled_matches_eager(graphed, eager)
