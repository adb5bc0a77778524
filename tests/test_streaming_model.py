"""The streaming model (`stable_diffusion_stream`) in the real Triton, over gRPC streaming."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from gateway.triton_client import (
    STREAM_MODEL_NAME,
    AsyncTriton,
    GeneratedImage,
    ImageParams,
    ModelError,
    ModelRejected,
    Progress,
    generate,
    make_inputs,
)
from launcher.triton import Triton
from tests.polling import wait_until
from tests.triton_state import steps_done

AXE = ImageParams(
    prompt="a frost-forged legendary axe", seed=7, steps=7, width=64, height=64, scheduler="euler"
)


async def events(
    triton: Triton,
    row: ImageParams,
    preview_every: int,
    *,
    cancel_after: int = 0,
    interval_s: float = 0.0,
) -> list[Progress | GeneratedImage | ModelError]:
    """What the streaming model sends for `row`, in order; with `cancel_after`, the stream
    is left (cancelled) once that step's progress arrived."""
    client = AsyncTriton(triton.grpc_url, timeout_s=120, progress_interval_s=interval_s)
    seen: list[Progress | GeneratedImage | ModelError] = []
    try:
        async for event in client.stream(row, preview_every):
            seen.append(event)
            if cancel_after and isinstance(event, Progress) and event.step == cancel_after:
                break
    except ModelError as exc:
        seen.append(exc)
    finally:
        await client.close()
    return seen


def stream(triton: Triton, row: ImageParams, preview_every: int, **kw: float) -> list:
    return asyncio.run(events(triton, row, preview_every, **kw))


@pytest.mark.parametrize("preview_every", [2, 3, 0])
def test_a_step_by_step_stream_ends_with_the_plain_models_image(
    triton: Triton, preview_every: int
) -> None:
    seen = stream(triton, AXE, preview_every)
    *progress, final = seen
    assert isinstance(final, GeneratedImage), final
    assert all(isinstance(p, Progress) for p in progress)
    assert [p.step for p in progress] == list(range(1, len(progress) + 1))
    total = progress[0].total_steps
    assert total >= AXE.steps and len(progress) == total
    assert all(p.total_steps == total for p in progress)
    elapsed = [p.elapsed_s for p in progress]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    # A preview every `preview_every` steps, never on the last (the image follows it).
    with_preview = [p.step for p in progress if p.preview is not None]
    expected = [s for s in range(1, total) if preview_every and s % preview_every == 0]
    assert with_preview == expected
    for p in progress:
        if p.preview is not None:
            assert p.preview.shape == (AXE.height // 8, AXE.width // 8, 3)
            assert p.preview.dtype == np.uint8
    (plain,) = generate(triton.grpc_url, [AXE])
    assert final.seed == plain.seed == AXE.seed
    assert final.pixels.tobytes() == plain.pixels.tobytes()


def test_a_progress_interval_keeps_the_first_and_last_steps_and_the_previews(
    triton: Triton,
) -> None:
    *progress, final = stream(triton, AXE, 3, interval_s=3600)
    assert isinstance(final, GeneratedImage)
    assert progress[0].total_steps == AXE.steps == 7  # euler: one UNet call per step
    assert [p.step for p in progress] == [1, 3, 6, 7]
    assert [p.step for p in progress if p.preview is not None] == [3, 6]


def test_previews_change_as_the_image_forms(triton: Triton) -> None:
    *progress, last, _image = stream(triton, AXE, 1)
    assert last.preview is None  # the last step is followed by the image itself
    previews = [p.preview for p in progress]
    assert len(previews) >= 3 and all(p is not None for p in previews)
    assert not np.array_equal(previews[0], previews[-1])


def test_a_drawn_seed_is_returned_and_reproduces_the_image(triton: Triton) -> None:
    *_, final = stream(triton, replace(AXE, seed=None), 0)
    assert isinstance(final, GeneratedImage)
    (again,) = generate(triton.grpc_url, [replace(AXE, seed=final.seed)])
    assert again.pixels.tobytes() == final.pixels.tobytes()


@pytest.mark.parametrize(
    ("row", "preview_every", "named"),
    [
        (replace(AXE, width=72), 0, "width 72"),
        (replace(AXE, scheduler="heun"), 0, "heun"),
        (AXE, -1, "preview_every"),
    ],
)
def test_bad_values_end_the_stream_with_invalid_arg_naming_them(
    triton: Triton, row: ImageParams, preview_every: int, named: str
) -> None:
    (error,) = stream(triton, row, preview_every)
    assert isinstance(error, ModelRejected), error
    assert named in error.message and not error.message.startswith("INVALID_ARG")


def test_a_streamed_request_holds_one_image(triton: Triton) -> None:
    inputs = make_inputs(grpcclient, [AXE, AXE])
    errors: list[str] = []
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        client.start_stream(lambda result, error: errors.append(str(error)))
        client.async_stream_infer(STREAM_MODEL_NAME, inputs)
        client.stop_stream()  # waits for the stream's responses
    assert len(errors) == 1 and "one image, not 2" in errors[0]


def test_a_cancelled_stream_stops_within_one_step(triton: Triton) -> None:
    before = steps_done(triton)
    seen = stream(triton, replace(AXE, steps=150), 0, cancel_after=2)
    assert [p.step for p in seen] == [1, 2]
    # One instance: the next request runs once the cancelled one has stopped.
    *_, final = stream(triton, replace(AXE, steps=1), 0)
    assert isinstance(final, GeneratedImage)
    done = steps_done(triton) - before - 1
    assert 2 <= done <= 3, f"the cancelled request ran {done} of its 150 steps"


def test_the_plain_model_counts_its_steps_too(triton: Triton) -> None:
    before = steps_done(triton, "stable_diffusion")
    generate(triton.grpc_url, [replace(AXE, steps=3), replace(AXE, steps=3, seed=8)])
    # Added once per execution, in the background, after the response has gone (an earlier
    # test's work may land in the count too: the exact count is the streaming tests').
    wait_until(
        "the model to count its 2 x 3 steps",
        lambda: steps_done(triton, "stable_diffusion") - before >= 6,
    )
