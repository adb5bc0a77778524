"""perf/bench_styles.py's measurements, run at the smallest counts on the tiny model: what they
record and how many samples, never how fast anything was."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from export.styles import add_style, list_styles, remove_style
from export.tiny_lora import write_test_loras
from perf import bench_styles
from tests.conftest import make_core

PAIR = ("bench-a", "bench-b")
COLD = ("bench-cold",)


@pytest.fixture(scope="module")
def bench_repository(repository: Path, tiny_model: Path) -> Iterator[Path]:
    """The session's repository with a PEFT and a kohya style and a third one; every style
    removed afterwards."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    pipe = SimpleNamespace(
        unet=UNet2DConditionModel.from_pretrained(tiny_model / "unet"),
        text_encoder=CLIPTextModel.from_pretrained(tiny_model / "text_encoder"),
    )
    out = repository.parent / "bench-loras"
    add_style(repository, "bench-a", write_test_loras(pipe, out / "a", seed=31)["peft"])
    add_style(repository, "bench-b", write_test_loras(pipe, out / "b", seed=32)["kohya"])
    add_style(repository, "bench-cold", write_test_loras(pipe, out / "c", seed=33)["peft"])
    yield repository
    for style in list_styles(repository):
        remove_style(repository, style["name"])


@pytest.mark.parametrize("runtime", bench_styles.RUNTIMES)
def test_one_round_records_every_figure_and_its_samples(
    bench_repository: Path, weights: Path, runtime: str
) -> None:
    core = make_core(weights, runtime=runtime)
    with bench_styles.torch_threads(bench_styles.TORCH_THREADS):
        figures: dict[str, Any] = bench_styles.measure_runtime(
            core,
            bench_styles.Shape(rows=1, steps=2),
            pair=PAIR,
            cold=COLD,
            rounds_count=1,
            pairs=1,
            timed_batches=2,
        )
    assert set(figures) == {"memory", "switch", "first_use", "seconds"}

    switch = figures["switch"]
    assert switch["samples_per_condition"] == {"none": 2, "same": 2, "alternating": 2}
    assert set(switch["batch_p50_ms"]) == set(bench_styles.CONDITIONS)
    assert set(switch["activate_p50_ms"]) == set(bench_styles.CONDITIONS)
    for comparison in ("alternating_over_same", "same_over_none"):
        assert len(switch[comparison]["rounds"]) == 1
    assert {"switch_cost_ms_median", "style_cost_ms_median"} <= set(switch)

    first = figures["first_use"]
    assert first["samples"] == 1
    for figure in ("batch_ms", "activate_ms", "added_over_same_ms"):
        assert len(first[figure]) == 1
    assert {"batch_p50_ms", "activate_p50_ms", "added_over_same_p50_ms"} <= set(first)
    assert set(core.styles.resident) == {core.styles.find(n).key for n in (*PAIR, *COLD)}

    memory = figures["memory"]
    assert memory["samples_per_state"] == 1
    none, one, two, two_idle = memory["states"]
    assert [s["resident_styles"] for s in memory["states"]] == [0, 1, 2, 2]
    assert two["resident_bytes"] > one["resident_bytes"] > none["resident_bytes"] == 0
    assert two_idle["resident_bytes"] == two["resident_bytes"]
    assert none["rss_growth_bytes"] == none["traced_growth_bytes"] == 0
    held = {s["state"]: sum(s["runtime_held_bytes"].values()) for s in memory["states"]}
    assert held[none["state"]] == 0
    if runtime == "torch":  # adapters stay in the networks while their styles are resident
        assert held[two["state"]] > held[one["state"]] > 0
        assert held[two_idle["state"]] == held[two["state"]]
    else:  # the active style's merged weights only
        assert held[one["state"]] > 0 and held[two["state"]] > 0
        assert held[two_idle["state"]] == 0
    assert memory["first_styled_batch"]["samples"] == 1
    assert {"batch_ms", "activate_ms"} <= set(memory["first_styled_batch"])
