"""The stable_diffusion model served by the real tritonserver, over HTTP and gRPC."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from sd_requests import GenerationRequest
from tritonclient.utils import InferenceServerException

from export.__main__ import main as export_main
from gateway.triton_client import (
    MODEL_NAME,
    GeneratedImage,
    ImageParams,
    ModelError,
    ModelFailed,
    generate,
    make_inputs,
)
from launcher.process import ServiceError
from launcher.triton import Triton
from tests.conftest import one_size_server
from tests.triton_state import (
    Calls,
    Counts,
    Hold,
    Witness,
    counts,
    settle,
    wait_pending,
    wait_until,
)

AXE = ImageParams(
    prompt="a frost-forged legendary axe",
    seed=1234,
    steps=6,
    width=128,
    height=128,
    scheduler="euler_ancestral",
)


def test_http_and_grpc_give_identical_bytes(triton: Triton) -> None:
    (over_grpc,) = generate(triton.grpc_url, [AXE], protocol="grpc")
    (over_http,) = generate(triton.http_url, [AXE], protocol="http")
    assert over_grpc.pixels.shape == (128, 128, 3) and over_grpc.pixels.dtype == np.uint8
    assert over_grpc.seed == over_http.seed == 1234
    assert over_grpc.pixels.tobytes() == over_http.pixels.tobytes()


def test_same_seed_same_image_and_a_missing_seed_is_drawn_and_returned(triton: Triton) -> None:
    (first,) = generate(triton.grpc_url, [AXE])
    (again,) = generate(triton.grpc_url, [AXE])
    assert np.array_equal(first.pixels, again.pixels)
    unseeded = ImageParams(prompt=AXE.prompt, steps=4, width=128, height=128)
    a, b = generate(triton.grpc_url, [unseeded, unseeded])
    assert a.seed != b.seed and 0 <= a.seed < 2**63
    (replay,) = generate(triton.grpc_url, [ImageParams(**{**unseeded.__dict__, "seed": a.seed})])
    assert np.array_equal(replay.pixels, a.pixels)


def test_a_static_batch_returns_one_image_per_row(triton: Triton) -> None:
    rows = [
        ImageParams(prompt=p, seed=s, steps=4, width=128, height=128)
        for p, s in [("an axe", 1), ("a sword", 2), ("a bow", 3)]
    ]
    images = generate(triton.grpc_url, rows)
    assert [i.seed for i in images] == [1, 2, 3]
    (sword,) = generate(triton.grpc_url, [rows[1]])
    assert np.array_equal(images[1].pixels, sword.pixels)


def test_concurrent_requests_are_batched_and_images_do_not_depend_on_batch_mates(
    triton: Triton,
) -> None:
    (alone,) = generate(triton.grpc_url, [AXE])
    before = settle(triton)
    mates = [
        ImageParams(
            prompt=f"weapon {i}",
            seed=i,
            steps=6,
            width=128,
            height=128,
            scheduler="euler_ancestral",
            guidance_scale=1.0 + i,
        )
        for i in range(11)
    ]
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(generate, triton.grpc_url, [p]) for p in [*mates, AXE]]
        results = [f.result()[0] for f in futures]
    traffic = settle(triton).since(before)
    print(f"12 requests in {traffic.executions} executions: {traffic.batches} by batch size")
    assert traffic.inferences == 12
    assert traffic.executions < traffic.inferences  # the dynamic batcher grouped requests
    assert np.array_equal(results[-1].pixels, alone.pixels)


def invalid(triton: Triton, inputs: list[Any]) -> InferenceServerException:
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL_NAME, inputs)
        assert client.is_server_ready() and client.is_model_ready(MODEL_NAME)
    return info.value


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": ""}, "prompt must not be empty"),
        ({"prompt": "x" * 10_000}, "10000 characters"),
        ({"steps": 0}, "steps 0 is outside"),
        ({"steps": 1000}, "steps 1000 is outside"),
        ({"width": 513}, "width 513 is not a multiple of 16"),
        ({"scheduler": "karras_magic"}, "unknown scheduler 'karras_magic'"),
    ],
)
def test_bad_values_get_invalid_arg_naming_the_value(
    triton: Triton, change: dict[str, Any], message: str
) -> None:
    params = ImageParams(**{**AXE.__dict__, **change})
    error = invalid(triton, make_inputs(grpcclient, [params]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in error.message()


def test_wrong_dtype_and_missing_prompt_get_invalid_arg(triton: Triton) -> None:
    prompt, *_ = make_inputs(grpcclient, [AXE])
    seed = grpcclient.InferInput("seed", [1, 1], "FP32")
    seed.set_data_from_numpy(np.array([[1.5]], dtype=np.float32))
    error = invalid(triton, [prompt, seed])
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "seed" in error.message()
    steps = grpcclient.InferInput("steps", [1, 1], "INT32")
    steps.set_data_from_numpy(np.array([[4]], dtype=np.int32))
    error = invalid(triton, [steps])
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "prompt" in error.message()


def test_a_cancelled_request_stops_early_and_frees_the_model(triton: Triton, weights: Path) -> None:
    """Order, not time: a slow request is cancelled while it runs, a quick one waits behind it,
    and the quick one's answer comes before a witness (the same work, 100 steps, started before
    the slow request, running in this process) finishes. Were the cancellation ignored, the
    slow request's 150 steps would end after the witness's 100, and the quick answer later."""
    slow = ImageParams(
        prompt="a huge slow greatsword", seed=1, steps=150, width=768, height=768, scheduler="euler"
    )
    quick = ImageParams(prompt="a dagger", seed=2, steps=2, width=64, height=64)
    witness = Witness(weights, GenerationRequest(**{**slow.__dict__, "steps": 100}))
    start = settle(triton)
    calls = Calls(triton)
    try:
        with Hold(triton) as hold:
            slow_call = calls.send("slow", [slow])
            wait_pending(triton, 2, "the slow request, behind the hold")
            witness.start()
            hold.release()
        wait_pending(triton, 0, "the slow request runs")
        calls.send("quick", [quick], on_arrival=lambda: witness.finished.is_set())
        wait_pending(triton, 1, "the quick request waits for the slow one")
        slow_call.cancel()
        result, error = calls.wait("quick")
    finally:
        witness.stop()
        calls.close()
    traffic = settle(triton).since(start)
    print(
        f"quick answered while the witness was at step {witness.steps_started} of 100; "
        f"Triton ran {traffic.batches} executions by batch size"
    )
    assert error is None and result.as_numpy("generated_image").shape == (1, 64, 64, 3)
    assert calls.at_arrival["quick"] is False, (
        "the witness finished its 100 steps before the quick request was answered: "
        "the cancelled request ran on instead of stopping"
    )
    (_, slow_error) = calls.wait("slow")
    assert slow_error is not None and "CANCELLED" in str(slow_error.status())
    # The slow and the quick request each ran alone (the hold's batches are full ones).
    assert traffic.batches.get(1) == 2


@pytest.fixture(scope="module")
def one_size_triton(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    """The tiny model in its own Triton, its UNet serving 128x128 only. Batches of three rows
    and a long queue delay: three one-row requests run in one execution, whenever each
    arrives, and a three-row request runs at once."""
    batching = ["--max-batch-size", "3", "--max-queue-delay-us", "600000000"]
    with one_size_server(repository, tmp_path_factory, "one-size", *batching) as server:
        yield server


def attempt(url: str, rows: list[ImageParams]) -> list[GeneratedImage] | ModelError:
    """The images of one request, or the error Triton answered it with."""
    try:
        return generate(url, rows)
    except ModelError as exc:
        return exc


def test_a_failing_group_fails_only_its_requests(one_size_triton: Triton, triton: Triton) -> None:
    url = one_size_triton.grpc_url
    dagger = ImageParams(
        prompt="a bone dagger", seed=9, steps=4, width=128, height=128, scheduler="ddim"
    )
    tall = ImageParams(**{**AXE.__dict__, "height": 144})  # latents 18 x 16: the UNet fails
    before = counts(one_size_triton)
    with ThreadPoolExecutor(3) as pool:
        axe, other, failed = pool.map(lambda p: attempt(url, [p]), [AXE, dagger, tall])

    def executed() -> Counts | None:
        now = counts(one_size_triton).minus(before)
        return now if now.executions else None

    ran = wait_until("Triton to count the execution", executed)
    print(f"three requests of three groups: {ran}")
    assert ran.batches == {3: 1}  # one execution held all three
    for answer, params in [(axe, AXE), (other, dagger)]:
        (expected,) = generate(triton.grpc_url, [params])
        assert isinstance(answer, list) and np.array_equal(answer[0].pixels, expected.pixels)
    assert isinstance(failed, ModelFailed) and failed.status == "StatusCode.INTERNAL"
    assert failed.message.startswith("generation failed: euler_ancestral, 6 steps, 128x144: ")
    assert "only_128x128" in failed.message  # the ONNX node that refused the latents
    # A static batch with a row in a failing group fails as a whole; the model serves on.
    mixed = attempt(url, [AXE, tall, dagger])
    assert isinstance(mixed, ModelFailed) and "128x144" in mixed.message
    again = generate(url, [AXE, dagger, AXE])
    assert isinstance(axe, list) and np.array_equal(again[0].pixels, axe[0].pixels)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_command_line_client_writes_the_png(triton: Triton, protocol: str, tmp_path) -> None:
    from PIL import Image

    from gateway.cli import main as cli

    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    out = tmp_path / "axe.png"
    code = cli(
        [
            "generate",
            "--prompt",
            AXE.prompt,
            "--seed",
            "1234",
            "--steps",
            "6",
            "--width",
            "128",
            "--height",
            "128",
            "--scheduler",
            "euler_ancestral",
            "--protocol",
            protocol,
            "--url",
            url,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    (expected,) = generate(triton.grpc_url, [AXE])
    assert np.array_equal(np.asarray(Image.open(out)), expected.pixels)


# Every parameter of the generation contract (version 1) the gateway reads from Triton.
CONTRACT_PARAMETERS = {
    "contract_version",
    "schedulers",
    "default_scheduler",
    "min_size",
    "max_size",
    "min_steps",
    "max_steps",
    "default_steps",
    "min_guidance",
    "max_guidance",
    "default_guidance",
    "unguided_at_most",
    "min_strength",
    "max_strength",
    "default_strength",
    "max_prompt_chars",
    "prompt_overflow",
    "max_seed",
    # copied from the weights' manifest by `python -m export config`
    "model_name",
    "model_version",
    "size_multiple",
    "default_size",
    "max_prompt_tokens",
}


def served_config(triton: Triton) -> dict[str, Any]:
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        return dict(client.get_model_config(MODEL_NAME, as_json=True)["config"])


def test_the_served_config_publishes_the_generation_contract(triton: Triton, weights: Path) -> None:
    config = served_config(triton)
    parameters = {k: v.get("string_value", "") for k, v in config["parameters"].items()}
    assert set(parameters) >= CONTRACT_PARAMETERS
    assert int(config["max_batch_size"]) == 8
    manifest = json.loads((weights / "manifest.json").read_text())
    assert parameters["default_size"] == str(manifest["contract"]["default_size"]) == "128"
    assert parameters["max_prompt_tokens"] == "77" and parameters["size_multiple"] == "16"
    assert parameters["schedulers"].split(",") == [
        "ddim",
        "euler",
        "euler_ancestral",
        "dpmpp_2m",
        "pndm",
    ]
    assert parameters["max_seed"] == str(2**63 - 1)


def test_a_request_with_only_a_prompt_is_resolved_by_the_model(triton: Triton) -> None:
    prompt = grpcclient.InferInput("prompt", [1, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[b"a frost-forged legendary axe"]], dtype=np.object_))
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        results = [client.infer(MODEL_NAME, [prompt]) for _ in range(2)]
    images = [r.as_numpy("generated_image") for r in results]
    seeds = [int(r.as_numpy("seed")[0, 0]) for r in results]
    assert images[0].shape == (1, 128, 128, 3)  # default_size, from the weights
    assert seeds[0] != seeds[1] and all(0 <= s <= 2**63 - 1 for s in seeds)
    # The returned seed is the one used: asked for explicitly, it gives the same image.
    (replay,) = generate(
        triton.grpc_url, [ImageParams(prompt=AXE.prompt, seed=seeds[0], width=128, height=128)]
    )
    assert np.array_equal(replay.pixels, images[0][0])


def test_a_bad_contract_stops_the_model_from_loading_naming_the_parameter(
    repository: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "model_repository"
    shutil.copytree(repository, copy, symlinks=True)
    # Offers two schedulers, but leaves the committed default (dpmpp_2m) out.
    argv = ["config", "--repository", str(copy), "--parameter", "schedulers=euler,ddim"]
    assert export_main([*argv, "--parameter", "max_size=256"]) == 0
    server = Triton(copy, tmp_path / "triton").start()
    try:
        with pytest.raises(ServiceError) as caught:
            server.load()
    finally:
        server.stop()
    message = str(caught.value).splitlines()[0]
    assert "default_scheduler 'dpmpp_2m' is not offered by schedulers (euler, ddim)" in message
