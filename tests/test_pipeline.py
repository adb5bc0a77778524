"""The pipeline core without Triton: parity with diffusers, batching, guidance, cancellation,
and the generation contract (missing values, seeds, the refusal of a bad config)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sd_contract import ConfigError, GenerationContract
from sd_pipeline import StableDiffusionCore
from sd_requests import SCHEDULERS, GenerationRequest, InvalidRequest
from sd_weights import load_manifest

from tests.conftest import core_config, diffusers_reference, make_core

PROMPT = "a frost-forged legendary axe"


@pytest.fixture(scope="module")
def core(weights: Path) -> StableDiffusionCore:
    return make_core(weights)


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
    core = make_core(weights)
    unet = core.components["unet"] = CountingUNet(core.components["unet"])
    core.generate([core.row(request(guidance_scale=1.0)), core.row(request(seed=1))])
    assert unet.batches == [3] * 6  # one call per step: 1 unguided row + 2 rows for the guided


def test_cancellation_is_checked_between_steps(weights: Path) -> None:
    core = make_core(weights)
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


def contract(weights: Path, max_batch_size: int = 8, **changes: str | None) -> GenerationContract:
    """The contract of the committed config for `weights`, parameters changed (None: removed)."""
    parameters, _ = core_config(weights)
    for name, value in changes.items():
        if value is None:
            del parameters[name]
        else:
            parameters[name] = value
    return GenerationContract.from_config(parameters, load_manifest(weights), max_batch_size)


def test_missing_values_are_filled_from_the_contract(core: StableDiffusionCore) -> None:
    c = core.contract
    row = core.row(GenerationRequest(prompt=PROMPT))
    r = row.request
    assert (r.width, r.height) == (c.default_size, c.default_size) == (128, 128)
    assert (r.steps, r.scheduler, r.guidance_scale) == (25, "dpmpp_2m", 7.5)
    assert r.negative_prompt == "" and r.guided
    assert 0 <= r.seed <= c.max_seed
    assert len(row.scheduler.timesteps) == 25
    # Given values are kept; a missing seed is drawn per request.
    given = core.row(request(seed=None)).request
    assert (given.steps, given.scheduler, given.guidance_scale) == (6, "euler_ancestral", 7.5)
    assert len({core.row(GenerationRequest(prompt=PROMPT)).request.seed for _ in range(5)}) == 5
    (image,) = core.generate([core.row(GenerationRequest(prompt=PROMPT, steps=2))])
    assert image is not None and image.shape == (128, 128, 3)


def test_a_missing_seed_is_drawn_uniformly_up_to_max_seed(weights: Path) -> None:
    small = contract(weights, max_seed="3")
    drawn = Counter(small.resolve(GenerationRequest(prompt=PROMPT)).seed for _ in range(400))
    assert set(drawn) == {0, 1, 2, 3}
    assert min(drawn.values()) > 50  # uniform: ~100 each
    assert small.resolve(GenerationRequest(prompt=PROMPT, seed=3)).seed == 3
    with pytest.raises(InvalidRequest, match=r"seed 4 is outside \[0, 3\]"):
        small.resolve(GenerationRequest(prompt=PROMPT, seed=4))


def test_unguided_at_most_decides_the_unconditional_pass(weights: Path) -> None:
    c = contract(weights, unguided_at_most="2.0")
    assert not c.resolve(GenerationRequest(prompt=PROMPT, guidance_scale=2.0)).guided
    assert c.resolve(GenerationRequest(prompt=PROMPT, guidance_scale=2.5)).guided
    core = make_core(weights, unguided_at_most="2.0")
    unet = core.components["unet"] = CountingUNet(core.components["unet"])
    core.generate([core.row(request(guidance_scale=2.0, steps=2))])
    assert unet.batches == [1, 1]


def test_a_contract_offers_fewer_schedulers_and_other_bounds(weights: Path) -> None:
    narrow = contract(weights, schedulers="euler,ddim", default_scheduler="euler", max_steps="40")
    assert narrow.schedulers == ("euler", "ddim")
    assert narrow.resolve(GenerationRequest(prompt=PROMPT)).scheduler == "euler"
    with pytest.raises(InvalidRequest, match="scheduler 'dpmpp_2m'; choose from euler, ddim"):
        narrow.resolve(GenerationRequest(prompt=PROMPT, scheduler="dpmpp_2m"))
    with pytest.raises(InvalidRequest, match=r"steps 41 is outside \[1, 40\]"):
        narrow.resolve(GenerationRequest(prompt=PROMPT, steps=41))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_steps": None}, "parameter max_steps is missing"),
        ({"max_steps": "many"}, "parameter max_steps 'many' is not an integer"),
        ({"max_guidance": "inf"}, "parameter max_guidance 'inf' is not a finite number"),
        ({"contract_version": "2"}, "contract_version is '2'; this model implements '1'"),
        ({"default_scheduler": "heun"}, "default_scheduler 'heun' is not offered by schedulers"),
        ({"schedulers": "euler,ddim"}, "default_scheduler 'dpmpp_2m' is not offered"),
        ({"schedulers": "euler,heun"}, "schedulers 'euler,heun' must name each of ddim, euler"),
        ({"default_steps": "200"}, "min_steps <= default_steps <= max_steps"),
        ({"min_steps": "0"}, "min_steps is 0; it must be at least 1"),
        ({"default_guidance": "31"}, "min_guidance <= default_guidance <= max_guidance"),
        ({"min_size": "256"}, "min_size <= default_size; they are min_size 256, default_size 128"),
        ({"prompt_overflow": "drop"}, "prompt_overflow 'drop': use reject or truncate"),
        ({"max_seed": str(2**63)}, "max_seed <= INT64 max"),
        ({"default_size": "256"}, "default_size is '256' but the weights' manifest says '128'"),
        ({"size_multiple": None}, "size_multiple is missing but the weights' manifest says '16'"),
        ({"model_version": "0123"}, "model_version is '0123' but the weights' manifest says"),
    ],
)
def test_a_bad_contract_refuses_to_load_naming_the_parameter(
    weights: Path, changes: dict[str, str | None], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        contract(weights, **changes)


def test_the_default_size_must_follow_the_size_rules(weights: Path) -> None:
    parameters, _ = core_config(weights, size_multiple="48")
    manifest: dict[str, Any] = load_manifest(weights)
    manifest["contract"]["size_multiple"] = 48
    with pytest.raises(ConfigError, match="default_size 128 is not a multiple of size_multiple 48"):
        GenerationContract.from_config(parameters, manifest, 8)
    with pytest.raises(ConfigError, match="max_batch_size is 0"):
        contract(weights, max_batch_size=0)
