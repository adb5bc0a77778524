"""perf/cost_model.py: the seed's $435/month against published prices, and the arithmetic.

The prices below are the test's own inputs, taken from AWS's public pages (us-east-1, Linux,
on demand; aws.amazon.com/ec2/pricing/on-demand, /eks/pricing, /ebs/pricing), not from the
module under test, so that a total the module balances by construction cannot pass.
"""

from __future__ import annotations

import pytest

from perf import cost_model as cm

HOURS = 730  # AWS's monthly convention
ON_DEMAND_HOURLY = {
    "EKS control plane": 0.10,
    "t3.medium": 0.0416,
    "t3.small": 0.0208,
    "g4dn.xlarge": 0.526,
}
EBS_GP3_GB_MONTH = 0.08
EBS_GB = 100  # the seed names no size: model versions, assets and Prometheus data

# The seed's stack: (a word of its line, what it runs on, how many).
SEED_STACK = [
    ("EKS", "EKS control plane", 1),
    ("worker", "t3.medium", 2),
    ("GPU", "g4dn.xlarge", 1),
    ("Kafka", "t3.small", 2),
    ("Redis", "t3.small", 2),
]


def published_monthly() -> float:
    """The seed's stack at published on-demand prices, dollars a month."""
    compute = sum(ON_DEMAND_HOURLY[kind] * count * HOURS for _, kind, count in SEED_STACK)
    return compute + EBS_GB * EBS_GP3_GB_MONTH


def test_published_prices_give_the_stack_586_45_a_month() -> None:
    assert round(published_monthly(), 2) == 586.45


def test_every_machine_line_is_at_its_published_price() -> None:
    for line in cm.stack("on-demand"):
        kinds = [kind for kind in ON_DEMAND_HOURLY if kind in line.item]
        if not kinds:
            continue
        (kind,) = kinds
        assert line.unit_price == pytest.approx(ON_DEMAND_HOURLY[kind]), (
            f"{line.item}: ${line.unit_price:.4f}/hour, published ${ON_DEMAND_HOURLY[kind]}"
        )
        assert line.basis == "list price"


def test_the_stack_holds_the_seeds_machines() -> None:
    lines = cm.stack("on-demand")
    for word, kind, count in SEED_STACK:
        (line,) = [line for line in lines if word in line.item and kind in line.item]
        assert line.quantity == count, line
    (ebs,) = [line for line in lines if "EBS gp3" in line.item]
    assert ebs.quantity == EBS_GB and ebs.unit_price == pytest.approx(EBS_GP3_GB_MONTH)


def test_the_seeds_435_implies_a_discounted_gpu() -> None:
    """From independent inputs: the seed's total, less everything but the GPU at published
    prices (the test's own table, plus the module's stated ALB and monitoring assumptions),
    leaves a GPU price below on demand, between the module's spot and reserved prices."""
    not_gpu = published_monthly() - ON_DEMAND_HOURLY["g4dn.xlarge"] * HOURS
    not_gpu += (0.0225 + 0.008) * HOURS + 10.0  # ALB hours, one LCU, monitoring extras
    implied = (435.0 - not_gpu) / HOURS
    assert cm.seed_gpu_price() == pytest.approx(implied)
    assert round(implied, 3) == 0.274 < ON_DEMAND_HOURLY["g4dn.xlarge"]
    assert cm.seed_pricing() == ("spot", "1-year reserved")
    assert cm.total(cm.stack("spot")) < 435.0 < cm.total(cm.stack("1-year reserved"))


def test_line_arithmetic() -> None:
    by_item = {line.item: line.dollars for line in cm.stack("on-demand")}
    assert by_item["EKS control plane"] == pytest.approx(0.10 * 730)
    assert by_item["worker nodes, 2x t3.medium"] == pytest.approx(2 * 0.0416 * 730)
    assert by_item["EBS gp3, 100 GB"] == pytest.approx(100 * 0.08)
    assert by_item["monitoring extras (CloudWatch, SNS)"] == pytest.approx(10.0)
    on_demand = cm.total(cm.stack("on-demand"))
    assert on_demand == pytest.approx(cm.total(cm.fixed_lines()) + 0.526 * 730)
    # The module's on-demand stack is the seed's stack at published prices, plus the load
    # balancer (0.0225 $/h and one LCU at 0.008 $/h) and $10 of monitoring extras.
    assert on_demand == pytest.approx(published_monthly() + (0.0225 + 0.008) * 730 + 10.0)
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
    assert f"**{cm.total(cm.fixed_lines()):.2f}**" in table
    assert "between spot and 1-year reserved" in table
    assert "projection" in {t.kind for t in cm.throughputs(measured_t4=1600.0)}
