"""Image to image: parity with diffusers' StableDiffusionImg2ImgPipeline on both CPU runtimes,
rows that do not depend on their batch mates, the requests and configs the contract refuses,
and the same through the real Triton (plain and streaming models)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from PIL import Image
from sd_contract import ConfigError
from sd_pipeline import StableDiffusionCore
from sd_requests import SCHEDULERS, GenerationRequest, InvalidRequest
from tritonclient.utils import InferenceServerException

from gateway.triton_client import ImageParams, make_inputs
from launcher.triton import Triton
from tests.conftest import core_config, make_core
from tests.polling import wait_until
from tests.triton_state import Hold, settle, wait_pending

PROMPT = "a frost-forged legendary axe, from the concept sketch"
MODEL, STREAM_MODEL = "stable_diffusion", "stable_diffusion_stream"


def sketch(height: int = 144, width: int = 128, seed: int = 0) -> np.ndarray:
    """A deterministic input image: a diagonal colour gradient with seeded speckles."""
    y, x = np.mgrid[0:height, 0:width]
    gradient = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    speckles = np.random.default_rng(seed).integers(-40, 40, size=(height, width, 3))
    return np.clip(gradient + speckles, 0, 255).astype(np.uint8)


def request(**overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = dict(
        prompt=PROMPT,
        negative_prompt="blurry",
        seed=42,
        steps=6,
        guidance_scale=7.5,
        scheduler="euler_ancestral",
        image=sketch(),
        strength=0.5,
    )
    return GenerationRequest(**{**fields, **overrides})


EVERY_SCHEDULER = {"schedulers": ",".join(SCHEDULERS), "max_steps": "50"}  # lcm: 50 at most


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def every_scheduler(request: pytest.FixtureRequest, weights: Path) -> StableDiffusionCore:
    """A core on each CPU runtime offering every supported scheduler."""
    return make_core(weights, runtime=request.param, **EVERY_SCHEDULER)


@pytest.fixture(scope="module")
def core(weights: Path) -> StableDiffusionCore:
    return make_core(weights)


class Img2ImgReference:
    """The tiny model in diffusers' own StableDiffusionImg2ImgPipeline: the reference."""

    def __init__(self, tiny_model: Path) -> None:
        from diffusers import StableDiffusionImg2ImgPipeline

        self.pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
            tiny_model, safety_checker=None, requires_safety_checker=False
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler_config = self.pipe.scheduler.config  # the model's, as exported

    def image(self, req: GenerationRequest) -> np.ndarray:
        """diffusers' uint8 image for an image-to-image request (its image as a PIL image,
        as a diffusers user passes it), with the request's scheduler and seed."""
        assert req.image is not None and req.scheduler is not None and req.seed is not None
        pipe = self.pipe
        pipe.scheduler = SCHEDULERS[req.scheduler](self.scheduler_config)
        image = pipe(
            req.prompt,
            image=Image.fromarray(req.image),
            strength=req.strength,
            negative_prompt=req.negative_prompt,
            num_inference_steps=req.steps,
            guidance_scale=req.guidance_scale,
            generator=torch.Generator().manual_seed(req.seed),
            output_type="np",
        ).images[0]
        return (image * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Img2ImgReference:
    return Img2ImgReference(tiny_model)


@pytest.mark.parametrize("strength", [0.5, 0.8])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_each_scheduler_matches_the_diffusers_img2img_pipeline(
    every_scheduler: StableDiffusionCore,
    reference: Img2ImgReference,
    scheduler: str,
    strength: float,
) -> None:
    req = request(scheduler=scheduler, strength=strength)
    (ours,) = every_scheduler.generate([every_scheduler.row(req)])
    theirs = reference.image(req)
    assert ours is not None and ours.shape == theirs.shape == (144, 128, 3)
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    runtime = every_scheduler.settings.runtime
    print(
        f"{runtime}, {scheduler}, strength {strength}: max diff {diff.max()} levels, "
        f"{np.mean(diff > 0):.4%} pixels differ"
    )
    assert diff.max() <= 1  # the stated tolerance: one 8-bit level
    # A denoised image, not the input image passed through the VAE.
    assert np.abs(ours.astype(int) - req.image.astype(int)).mean() > 1  # type: ignore[union-attr]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch on CUDA needs a CUDA GPU")
def test_the_torch_runtime_on_cuda_is_close_to_the_cpu(
    weights: Path, core: StableDiffusionCore
) -> None:
    cuda_core = make_core(weights, runtime="torch")
    assert cuda_core.device.type == "cuda"
    (gpu,) = cuda_core.generate([cuda_core.row(request())])
    (cpu,) = core.generate([core.row(request())])
    assert gpu is not None and cpu is not None
    # fp16 vs fp32 through the encoder and 3 steps: a loose bound, stated; not a parity claim.
    assert np.abs(gpu.astype(int) - cpu.astype(int)).mean() < 8


class CountingUNet:
    def __init__(self, inner: Any) -> None:
        self.inner, self.batches = inner, []  # type: list[int]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.batches.append(inputs[0].shape[0])
        return self.inner(*inputs)


def test_a_row_does_not_depend_on_its_batch_mates_and_a_group_shares_unet_calls(
    core: StableDiffusionCore, weights: Path
) -> None:
    rows = [
        request(),  # group A: strength 0.5, 3 of 6 steps
        request(image=None, strength=None, height=144, width=128),  # text: 6 steps
        request(strength=0.8, seed=7, image=sketch(seed=3)),  # group B: 4 of 6 steps
        request(image=None, strength=None, seed=8, guidance_scale=1.0, height=144, width=128),
        request(seed=9, prompt="a bone dagger", image=sketch(seed=5)),  # group A
    ]
    alone = [core.generate([core.row(r)])[0] for r in rows]
    counted = make_core(weights)
    unet = counted.components["unet"] = CountingUNet(counted.components["unet"])
    together = counted.generate([counted.row(r) for r in rows])
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert a is not None and b is not None and a.tobytes() == b.tobytes(), f"row {i}"
    # One UNet call per step per group: A (two guided rows) 3 steps, text 6, B 4.
    assert Counter(unet.batches) == {4: 3, 3: 6, 2: 4}
    assert len({a.tobytes() for a in alone if a is not None}) == len(rows)


def test_each_row_reports_its_own_steps_and_can_be_cancelled(core: StableDiffusionCore) -> None:
    seen: dict[str, list[tuple[int, int]]] = {"image": [], "text": []}
    image_row = core.row(
        request(scheduler="euler"), on_step=lambda d, t, _: seen["image"].append((d, t))
    )
    text_row = core.row(
        request(image=None, strength=None, scheduler="euler"),
        on_step=lambda d, t, _: seen["text"].append((d, t)),
    )
    core.generate([image_row, text_row])
    assert seen["image"] == [(1, 3), (2, 3), (3, 3)]  # int(6 x 0.5) steps
    assert seen["text"] == [(d, 6) for d in range(1, 7)]
    asked = iter(range(100))
    cancelled = core.row(request(), is_cancelled=lambda: next(asked) >= 1)
    assert core.generate([cancelled, core.row(request(seed=1))])[0] is None


def test_the_safety_check_screens_image_rows(weights: Path) -> None:
    strict = make_core(weights, safety_adjustment="1000", safety_action="replace")
    row = strict.row(request())
    (image,) = strict.generate([row])
    assert row.flagged and image is not None and len(np.unique(image)) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"image": np.zeros((128, 128, 4), np.uint8)},
            "image must be height x width x 3 uint8 (RGB); it is uint8 of shape (128, 128, 4)",
        ),
        ({"image": np.zeros((128, 128, 3), np.float32)}, "it is float32 of shape (128, 128, 3)"),
        ({"image": np.zeros((128, 128), np.uint8)}, "it is uint8 of shape (128, 128)"),
        ({"image": sketch(height=72)}, "image height 72 is not a multiple of 16"),
        ({"image": sketch(height=32, width=32)}, "image width 32 is outside [64, 1024]"),
        ({"image": sketch(height=2048)}, "image height 2048 is outside [64, 1024]"),
        ({"width": 256}, "width 256 differs from the image's width 128"),
        ({"height": 128}, "height 128 differs from the image's height 144"),
        ({"strength": 1.5}, "strength 1.5 is outside [0.0, 1.0]"),
        ({"strength": -0.25}, "strength -0.25 is outside [0.0, 1.0]"),
        ({"strength": float("nan")}, "strength nan is outside"),
        ({"image": None}, "strength 0.5 applies to an input image; this request has none"),
        ({"steps": 4, "strength": 0.2}, "strength 0.2 with steps 4 leaves no denoising step"),
        ({"steps": 1, "strength": None}, "strength 0.75 with steps 1 leaves no denoising step"),
    ],
)
def test_the_contract_refuses_a_bad_image_request_naming_the_value(
    core: StableDiffusionCore, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        core.row(request(**overrides))
    assert message in str(caught.value)


def test_an_image_without_strength_gets_the_default_and_its_own_size(
    core: StableDiffusionCore,
) -> None:
    row = core.row(request(strength=None, image=sketch(height=96, width=160)))
    assert (row.request.strength, row.request.width, row.request.height) == (0.75, 160, 96)
    assert row.request.describe_group() == (
        "euler_ancestral, 6 steps, 160x96, image to image at strength 0.75"
    )
    text = core.row(request(image=None, strength=None))
    assert text.request.strength is None and text.request.group_key[4:6] == (False, None)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"min_strength": "-0.1"}, "model config min_strength is -0.1; it must be at least 0"),
        ({"max_strength": "1.5"}, "max_strength <= full strength; they are"),
        ({"default_strength": "0.9", "max_strength": "0.8"}, "default_strength <= max_strength"),
        ({"min_strength": "0.8"}, "min_strength <= default_strength"),
        ({"default_strength": "strong"}, "default_strength 'strong' is not a finite number"),
    ],
)
def test_a_bad_strength_contract_stops_the_model_from_loading(
    weights: Path, changes: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        make_core(weights, **changes)
    parameters, batch = core_config(weights)
    del parameters["default_strength"]
    with pytest.raises(ConfigError, match="parameter default_strength is missing"):
        StableDiffusionCore(weights, parameters, max_batch_size=batch)


# Through the real Triton.


def infer_inputs(rows: list[GenerationRequest]) -> list[grpcclient.InferInput]:
    """The Triton inputs of one request of `rows`, made as the gateway makes them."""
    return make_inputs(grpcclient, [ImageParams(**vars(r)) for r in rows])


def served(triton: Triton, rows: list[GenerationRequest]) -> np.ndarray:
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        result = client.infer(MODEL, infer_inputs(rows))
    return result.as_numpy("generated_image")  # type: ignore[no-any-return]


def test_triton_serves_the_in_process_cores_images(
    triton: Triton, core: StableDiffusionCore
) -> None:
    rows = [request(), request(strength=0.7, seed=3, image=sketch(seed=4))]
    for r in rows:
        (expected,) = core.generate([core.row(r)])
        (image,) = served(triton, [r])
        assert expected is not None and image.tobytes() == expected.tobytes()
    # A static batch of two image rows of different strengths: one image each, as alone.
    both = served(triton, rows)
    assert [b.tobytes() for b in both] == [served(triton, [r])[0].tobytes() for r in rows]


def queued_behind_a_hold(triton: Triton, rows: list[GenerationRequest]) -> tuple[list, dict]:
    """Each row's image, sent as one request each while the model is held busy (so that they
    queue, in order), and the executions by batch size Triton ran them in."""
    answers: dict[int, Any] = {}
    before = settle(triton)
    with grpcclient.InferenceServerClient(triton.grpc_url) as client, Hold(triton) as hold:
        for i, r in enumerate(rows):
            client.async_infer(
                MODEL,
                infer_inputs([r]),
                callback=lambda result, error, i=i: answers.update({i: error or result}),
            )
            wait_pending(triton, 2 + i, "the requests, queued in order behind the hold")
        hold.release()
        wait_until("every answer", lambda: len(answers) == len(rows))
    batches = settle(triton).since(before).batches
    return [answers[i].as_numpy("generated_image")[0] for i in range(len(rows))], batches


def test_queued_image_requests_of_any_size_batch_and_keep_their_bytes(
    triton: Triton, core: StableDiffusionCore
) -> None:
    rows = [
        request(),
        request(seed=2, image=sketch(height=96, width=160, seed=2)),  # another size
        request(seed=3, strength=0.8),
        request(seed=6, image=sketch(height=96, width=160, seed=6)),
        request(seed=4, image=None, strength=None),
        request(seed=5, image=None, strength=None, guidance_scale=1.0),
    ]
    expected = [core.generate([core.row(r)])[0] for r in rows]
    images, batches = queued_behind_a_hold(triton, rows)
    print(f"{len(rows)} requests queued: executions by batch size {batches}")
    # The image requests of both sizes ran in one execution (`image` is a ragged input); the
    # text requests, which send other inputs, in another.
    assert batches.get(4) == 1 and batches.get(2) == 1
    for i, (image, want) in enumerate(zip(images, expected, strict=True)):
        assert want is not None and image.tobytes() == want.tobytes(), f"row {i}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image": np.zeros((128, 128, 4), np.uint8)}, "unexpected shape for input 'image'"),
        ({"image": sketch(height=72)}, "image height 72 is not a multiple of 16"),
        ({"width": 256}, "width 256 differs from the image's width 128"),
        ({"strength": 1.5}, "strength 1.5 is outside [0.0, 1.0]"),
        ({"image": None}, "strength 0.5 applies to an input image"),
        ({"steps": 4, "strength": 0.2}, "strength 0.2 with steps 4 leaves no denoising step"),
    ],
    ids=["shape", "size", "width", "strength", "no-image", "no-step"],
)
def test_triton_answers_a_bad_image_request_with_invalid_arg(
    triton: Triton, overrides: dict[str, Any], message: str
) -> None:
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, infer_inputs([request(**overrides)]))
        assert client.is_server_ready() and client.is_model_ready(MODEL)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in caught.value.message()


def test_the_streaming_model_takes_an_image_and_counts_its_own_steps(
    triton: Triton,
) -> None:
    req = request(scheduler="euler", strength=0.5)
    results: list[Any] = []
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        client.start_stream(lambda result, error: results.append(error or result))
        client.async_stream_infer(STREAM_MODEL, infer_inputs([req]))
        client.stop_stream()  # waits for the stream's responses
    assert not [r for r in results if isinstance(r, Exception)], results
    *progress, final = results
    steps = [(p.as_numpy("step")[0, 0], p.as_numpy("total_steps")[0, 0]) for p in progress]
    assert steps == [(1, 3), (2, 3), (3, 3)]  # int(6 x 0.5) steps
    (plain,) = served(triton, [req])
    assert final.as_numpy("generated_image")[0].tobytes() == plain.tobytes()
