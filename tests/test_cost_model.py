"""perf/cost_model.py: the seed's $435/month rebuilt line by line, and the arithmetic."""

from __future__ import annotations

import pytest

from perf import cost_model as cm


def test_the_seed_total_is_reproduced_line_by_line() -> None:
    lines = cm.seed_breakdown()
    assert round(cm.total(lines), 2) == cm.SEED_MONTHLY_TOTAL == 435.00
    items = " ".join(line.item for line in lines)
    for part in (
        "EKS",
        "t3.medium",
        "g4dn.xlarge",
        "Kafka",
        "Redis",
        "EBS gp3",
        "ALB",
        "monitoring",
    ):
        assert part in items
    # Exactly one line balances the total, and it says so; it implies a discounted GPU.
    (gpu,) = [line for line in lines if line.basis == "implied by the seed's total"]
    assert "g4dn.xlarge" in gpu.item
    assert cm.SPOT_G4DN_XLARGE < gpu.unit_price < cm.G4DN_XLARGE_RESERVED_1Y
    assert gpu.unit_price == pytest.approx(0.2743, abs=1e-4)


def test_line_arithmetic() -> None:
    by_item = {line.item: line.dollars for line in cm.seed_breakdown()}
    assert by_item["EKS control plane"] == pytest.approx(0.10 * 730)
    assert by_item["worker nodes, 2x t3.medium"] == pytest.approx(2 * 0.0416 * 730)
    assert by_item["EBS gp3, 100 GB"] == pytest.approx(100 * 0.08)
    assert by_item["monitoring extras (CloudWatch, SNS)"] == pytest.approx(10.0)
    on_demand = cm.total(cm.stack("on-demand"))
    assert on_demand == pytest.approx(cm.total(cm.fixed_lines()) + 0.526 * 730)
    assert round(on_demand, 2) == 618.72
    assert cm.total(cm.stack("spot")) < cm.total(cm.stack("1-year reserved")) < on_demand


def test_dollars_per_1000_images() -> None:
    # 1,000 images/hour at 50% load for 730 h = 365,000 images; $365 -> $1.00 per 1,000.
    assert cm.images_per_month(1000, 0.5) == pytest.approx(365_000)
    assert cm.dollars_per_1000(365.0, 1000, 0.5) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="utilization 0"):
        cm.dollars_per_1000(365.0, 1000, 0)


def test_gpu_throughput_is_not_measured_until_the_gpu_benchmark_runs() -> None:
    rows = {t.kind: t for t in cm.throughputs()}
    assert rows["not measured"].images_per_hour is None
    assert rows["published reference (not ours)"].images_per_hour == pytest.approx(1500)
    table = cm.render(0.7)
    assert "| not measured | not measured |" in table
    assert "**435.00**" in table
    assert "projection" in {t.kind for t in cm.throughputs(measured_t4=1600.0)}
