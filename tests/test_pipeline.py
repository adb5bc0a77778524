"""The pipeline core without Triton: parity with diffusers, batching, guidance, cancellation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sd_pipeline import StableDiffusionCore
from sd_requests import SCHEDULERS, GenerationRequest, InvalidRequest

from tests.conftest import diffusers_reference

PROMPT = "a frost-forged legendary axe"


@pytest.fixture(scope="module")
def core(weights: Path) -> StableDiffusionCore:
    return StableDiffusionCore(weights)


def request(**overrides) -> GenerationRequest:  # type: ignore[no-untyped-def]
    fields = dict(
        prompt=PROMPT,
        seed=42,
        steps=6,
        guidance_scale=7.5,
        width=128,
        height=128,
        scheduler="euler_ancestral",
    )
    return GenerationRequest(**{**fields, **overrides})


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_each_scheduler_matches_the_diffusers_pipeline(
    core: StableDiffusionCore, diffusers_pipe, scheduler: str
) -> None:
    req = request(scheduler=scheduler, negative_prompt="blurry", height=144)
    (ours,) = core.generate([core.row(req)])
    reference = diffusers_reference(diffusers_pipe, req)
    assert ours is not None and ours.shape == reference.shape == (144, 128, 3)
    diff = np.abs(ours.astype(int) - reference.astype(int))
    print(f"{scheduler}: max diff {diff.max()} levels, {np.mean(diff > 0):.4%} pixels differ")
    # Stated tolerance: at most one 8-bit level (ONNX Runtime vs torch rounding).
    assert diff.max() <= 1
    assert ours.std() > 10  # an image, not a flat fill


def test_a_row_does_not_depend_on_its_batch_mates(core: StableDiffusionCore) -> None:
    alone = core.generate([core.row(request())])[0]
    mates = [
        request(prompt="a rusty sword", seed=7, guidance_scale=1.0),
        request(),
        request(prompt="a bone dagger", seed=9, guidance_scale=3.0),
        request(steps=4),
    ]  # a different group: its own UNet calls
    together = core.generate([core.row(r) for r in mates])
    assert together[1] is not None and alone is not None
    assert np.array_equal(together[1], alone)
    assert not np.array_equal(together[0], alone)


class CountingUNet:
    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.batches = inner, []

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        self.batches.append(inputs[0].shape[0])
        return self.inner(*inputs)


def test_rows_of_a_group_share_unet_calls_and_guidance_one_skips_the_unconditional_pass(
    weights: Path,
) -> None:
    core = StableDiffusionCore(weights)
    unet = core.components["unet"] = CountingUNet(core.components["unet"])
    core.generate([core.row(request(guidance_scale=1.0)), core.row(request(seed=1))])
    assert unet.batches == [3] * 6  # one call per step: 1 unguided row + 2 rows for the guided


def test_cancellation_is_checked_between_steps(weights: Path) -> None:
    core = StableDiffusionCore(weights)
    unet = core.components["unet"] = CountingUNet(core.components["unet"])
    calls = iter(range(100))
    cancel_after_three = core.row(request(steps=20), is_cancelled=lambda: next(calls) >= 3)
    other = core.row(request(seed=5, steps=20))
    images = core.generate([cancel_after_three, other])
    assert images[0] is None and images[1] is not None
    assert unet.batches[:3] == [4, 4, 4] and set(unet.batches[3:]) == {2}
    assert len(unet.batches) == 20


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"prompt": ""}, "prompt must not be empty"),
        ({"prompt": "x" * 10_000}, "10000 characters"),
        ({"steps": 0}, "steps 0"),
        ({"steps": 1000}, "steps 1000"),
        ({"width": 513}, "width 513"),
        ({"height": 4096}, "height 4096"),
        ({"scheduler": "heun"}, "unknown scheduler 'heun'"),
        ({"guidance_scale": float("nan")}, "guidance_scale nan"),
        ({"seed": -1}, "seed -1"),
        ({"scheduler": "lcm", "steps": 120}, "scheduler 'lcm' with steps 120"),
        ({"prompt": "axe " * 80}, "prompt is 82 tokens long; the text encoder reads at most 77"),
        ({"negative_prompt": "dull " * 76}, "negative_prompt is 78 tokens long"),
    ],
)
def test_invalid_requests_name_the_bad_value(
    core: StableDiffusionCore, overrides: dict, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(")):
        core.row(request(**overrides))
