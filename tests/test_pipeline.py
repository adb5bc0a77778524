"""The pipeline core without Triton: parity with diffusers, batching, the pixel budget,
guidance, cancellation, a failing batch, and the generation contract (missing values, seeds,
the refusal of a bad config)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sd_contract import ConfigError, GenerationContract
from sd_pipeline import GenerationFailed, RowFailure, StableDiffusionCore, pack
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


@pytest.fixture(scope="module")
def every_scheduler(weights: Path) -> StableDiffusionCore:
    """A core offering every supported scheduler (lcm takes at most 50 steps)."""
    return make_core(weights, schedulers=",".join(SCHEDULERS), max_steps="50")


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_each_scheduler_matches_the_diffusers_pipeline(
    every_scheduler: StableDiffusionCore, diffusers_pipe, scheduler: str
) -> None:
    req = request(scheduler=scheduler, negative_prompt="blurry", height=144)
    (ours,) = every_scheduler.generate([every_scheduler.row(req)])
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


class UNetFailingAt:
    """The UNet, except that it raises for latents of one height x width (a network that
    serves no such size), counting the batches it is called with."""

    def __init__(self, inner, latent_size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.latent_size, self.batches = inner, latent_size, []

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        self.batches.append(tuple(inputs[0].shape))
        if tuple(inputs[0].shape[-2:]) == self.latent_size:
            raise RuntimeError(f"no kernel for latents {self.latent_size}")
        return self.inner(*inputs)


def test_a_failing_group_fails_only_its_own_rows(core: StableDiffusionCore, weights: Path) -> None:
    rows = [
        request(),
        request(height=144, seed=3),  # latents 18 x 16: the failing group
        request(seed=5, scheduler="ddim", guidance_scale=1.0),
        request(height=144, seed=4, guidance_scale=1.0),
    ]
    alone = [core.generate([core.row(r)])[0] for r in (rows[0], rows[2])]
    failing = make_core(weights)
    unet = failing.components["unet"] = UNetFailingAt(failing.components["unet"], (18, 16))
    outcomes = failing.generate_outcomes([failing.row(r) for r in rows])
    assert isinstance(outcomes[0], np.ndarray) and isinstance(outcomes[2], np.ndarray)
    assert np.array_equal(outcomes[0], alone[0]) and np.array_equal(outcomes[2], alone[1])
    failure = outcomes[1]
    assert isinstance(failure, RowFailure) and outcomes[3] is failure  # one batch, one failure
    assert failure.error.__traceback__ is None  # keeps no frame of the failed batch alive
    assert str(failure) == (
        "euler_ancestral, 6 steps, 128x144: RuntimeError: no kernel for latents (18, 16)"
    )
    # The failing group stopped at its first UNet call; the other groups ran all 6 steps.
    assert sorted(b[0] for b in unet.batches if b[-2:] == (18, 16)) == [3]
    assert sum(b[-2:] == (16, 16) for b in unet.batches) == 12  # two groups, 6 steps each
    with pytest.raises(GenerationFailed, match=r"generation failed: euler_ancestral, 6 steps"):
        failing.generate([failing.row(r) for r in rows])


def test_a_failure_while_decoding_fails_its_rows_too(weights: Path) -> None:
    core = make_core(weights)
    decoder = core.components["vae_decoder"]

    def decode(latents):  # type: ignore[no-untyped-def]
        if latents.shape[0] == 2:
            raise MemoryError("out of memory decoding 2 images")
        return decoder(latents)

    core.components["vae_decoder"] = decode
    rows = [request(steps=2), request(steps=2, seed=1), request(steps=3)]
    outcomes = core.generate_outcomes([core.row(r) for r in rows])
    assert isinstance(outcomes[0], RowFailure) and outcomes[1] is outcomes[0]
    assert "MemoryError: out of memory decoding 2 images" in str(outcomes[0])
    assert isinstance(outcomes[2], np.ndarray) and outcomes[2].shape == (128, 128, 3)


@pytest.mark.parametrize(
    ("costs", "budget", "bins"),
    [
        ([2, 2, 2, 2, 1, 1], 3, [[0, 4], [1, 5], [2], [3]]),
        ([1, 2, 1, 2], 3, [[0, 1], [2, 3]]),  # costliest first, then the gaps
        ([2, 2, 1], 4, [[0, 1], [2]]),
        ([2, 1], 1, [[0], [1]]),  # over the budget: alone
        ([1] * 5, 10, [[0, 1, 2, 3, 4]]),
        ([], 3, []),
    ],
)
def test_pack_fills_the_fewest_batches(
    costs: list[int], budget: int, bins: list[list[int]]
) -> None:
    assert pack(costs, budget) == bins


def split_core(weights: Path, budget: int) -> tuple[StableDiffusionCore, CountingUNet]:
    core = make_core(weights, max_batch_pixels=str(budget))
    unet = core.components["unet"] = CountingUNet(core.components["unet"])
    return core, unet


def test_the_pixel_budget_splits_a_group_and_guided_rows_count_twice(
    core: StableDiffusionCore, weights: Path
) -> None:
    pixels = 128 * 128
    rows = [request(seed=s) for s in range(4)]  # guided: 2 x pixels each
    rows += [request(seed=10 + s, guidance_scale=1.0) for s in range(2)]  # unguided: pixels
    rows.insert(2, request(seed=20, steps=4))  # another group
    whole = core.generate([core.row(r) for r in rows])
    split, unet = split_core(weights, 3 * pixels)  # one guided and one unguided row per call
    assert split.batches([split.row(r) for r in rows]) == [[0, 5], [1, 6], [3], [4], [2]]
    images = split.generate([split.row(r) for r in rows])
    assert unet.batches == [3] * 6 + [3] * 6 + [2] * 6 + [2] * 6 + [2] * 4
    assert all(n * pixels <= 3 * pixels for n in unet.batches)
    for a, b in zip(whole, images, strict=True):
        assert a is not None and b is not None and a.tobytes() == b.tobytes()


def test_a_row_over_the_pixel_budget_runs_alone(core: StableDiffusionCore, weights: Path) -> None:
    rows = [request(), request(seed=1, guidance_scale=1.0)]
    whole = core.generate([core.row(r) for r in rows])
    split, unet = split_core(weights, 100)
    images = split.generate([split.row(r) for r in rows])
    assert unet.batches == [2] * 6 + [1] * 6  # the guided row is two UNet rows, alone
    assert [a.tobytes() for a in whole] == [b.tobytes() for b in images]  # type: ignore[union-attr]


def test_the_committed_pixel_budget_splits_only_large_images(core: StableDiffusionCore) -> None:
    assert core.max_batch_pixels == 16 * 512 * 512
    full = [core.row(request(seed=s, steps=1)) for s in range(8)]
    assert core.batches(full) == [list(range(8))]  # the tiny model's default size: one call
    large = [core.row(request(seed=s, steps=1, width=1024, height=1024)) for s in range(8)]
    assert core.batches(large) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    unguided = [
        core.row(request(seed=s, steps=1, width=1024, height=1024, guidance_scale=1.0))
        for s in range(8)
    ]
    assert core.batches(unguided) == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("value", [None, "0", "-4", "lots", "1.5", ""])
def test_the_pixel_budget_must_be_a_positive_integer(weights: Path, value: str | None) -> None:
    parameters, batch = core_config(weights)
    if value is None:
        del parameters["max_batch_pixels"]
        message = "parameter max_batch_pixels is missing"
    else:
        parameters["max_batch_pixels"] = value
        message = f"parameter max_batch_pixels {value!r} is not a positive integer"
    with pytest.raises(ConfigError, match=message):
        StableDiffusionCore(weights, parameters, max_batch_size=batch)


def test_a_scheduler_that_cannot_take_the_step_range_is_not_offered(weights: Path) -> None:
    with pytest.raises(ConfigError, match="offers scheduler lcm, which cannot take 150 steps"):
        make_core(weights, schedulers="euler,lcm", default_scheduler="euler")


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
