"""perf/t4_projection.py: the T4 projection from counted work, on made-up counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from perf import t4_projection as t4

GB = 1e9


def work(unet_flops: float = 1.3e12, unet_bytes: float = 8 * GB) -> dict[str, Any]:
    """Counts shaped like perf/unet_work.py's, linear in the batch size."""
    return {
        "weights_bytes": {"unet": 1.7 * GB, "text_encoder": 0.25 * GB, "vae": 0.17 * GB},
        "unet_per_call": {
            str(b): {
                "flops": b * unet_flops,
                "operand_bytes": 1.7 * GB + b * (unet_bytes - 1.7 * GB),
                "peak_activation_bytes": b * 0.5 * GB,
            }
            for b in (1, 2, 4, 8)
        },
        "text_encoder_per_image": {
            "flops": 2.7e10,
            "operand_bytes": 0.5 * GB,
            "peak_activation_bytes": 0.01 * GB,
        },
        "vae_decoder_per_image": {
            "flops": 2.5e12,
            "operand_bytes": 10 * GB,
            "peak_activation_bytes": 3 * GB,
        },
    }


def test_a_call_takes_its_slower_bound() -> None:
    seconds, bound = t4.call_seconds(
        65e12, 1.0, t4.T4, compute_efficiency=1.0, memory_efficiency=1.0
    )
    assert (seconds, bound) == (pytest.approx(1.0), "compute")
    seconds, bound = t4.call_seconds(
        1.0, 320e9, t4.T4, compute_efficiency=0.5, memory_efficiency=0.5
    )
    assert (seconds, bound) == (pytest.approx(2.0), "memory")
    with pytest.raises(ValueError, match="efficiencies"):
        t4.call_seconds(1.0, 1.0, t4.T4, compute_efficiency=0, memory_efficiency=1)


def test_an_image_costs_its_steps_and_its_share_of_the_other_networks() -> None:
    projection = t4.project(work(), 25, compute_efficiency=0.5, memory_efficiency=1.0)
    row = projection["per_batch_size"][4]
    unet_s = max(4 * 1.3e12 / (0.5 * 65e12), (1.7 * GB + 4 * 6.3 * GB) / 320e9)
    text_s = max(2.7e10 / (0.5 * 65e12), 0.5 * GB / 320e9)
    vae_s = max(2.5e12 / (0.5 * 65e12), 10 * GB / 320e9)
    assert row["unet_call_s"] == pytest.approx(unet_s)
    assert row["seconds_per_image"] == pytest.approx((25 * unet_s + 4 * (text_s + vae_s)) / 4)
    assert row["images_per_hour"] == pytest.approx(3600 / row["seconds_per_image"])
    assert projection["kind"].startswith("PROJECTION")
    assert projection["assumptions"]["compute_efficiency"] == 0.5


def test_batch_sizes_that_do_not_fit_16_gb_are_not_the_best() -> None:
    projection = t4.project(work(), 25)
    rows = projection["per_batch_size"]
    # weights 2.12 GB + max(UNet b x 0.5 GB, b x 3 GB of VAE decodes): batch 4 needs 14.1 GB
    assert rows[4]["fits"] and not rows[8]["fits"]
    assert projection["best_batch_size"] in (1, 2, 4)
    assert projection["images_per_hour"] == rows[projection["best_batch_size"]]["images_per_hour"]


def test_the_bytes_basis_and_efficiencies_move_the_projection() -> None:
    pessimistic = t4.project(work(), 25, bytes_basis="operands", compute_efficiency=0.25)
    optimistic = t4.project(work(), 25, bytes_basis="weights", compute_efficiency=0.5)
    assert optimistic["batch1_seconds_per_image"] < pessimistic["batch1_seconds_per_image"]
    with pytest.raises(ValueError, match="bytes_basis"):
        t4.project(work(), 25, bytes_basis="guess")
    slower = t4.project(work(), 25, overhead_s_per_call=0.01)
    assert slower["batch1_seconds_per_image"] == pytest.approx(
        t4.project(work(), 25)["batch1_seconds_per_image"] + 25 * 0.01
    )


def test_the_command_prints_the_table_of_a_results_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "gpu-bench.json"
    results.write_text(
        json.dumps({"settings": {"steps": 25}, "unet_work": {"status": "ok", **work()}})
    )
    assert t4.main([str(results), "--compute-efficiency", "0.3"]) == 0
    table = capsys.readouterr().out
    assert "PROJECTION" in table and "compute efficiency 30%" in table
    assert table.count("\n| ") == 5  # header and four batch sizes
    results.write_text(json.dumps({"settings": {"steps": 25}, "unet_work": {"status": "failed"}}))
    with pytest.raises(SystemExit):
        t4.main([str(results)])
