"""Cost model: dollars per month and per 1,000 images for the seed's EKS stack on g4dn.xlarge.

`python perf/cost_model.py [--utilization 0.7] [--images-per-hour N]` prints the tables that
perf/RESULTS.md shows. Nothing here is measured: prices are assumptions (below, with their
source and date), and the throughput rows say where each figure comes from.

Prices (ASSUMPTIONS): AWS public list prices for us-east-1 (N. Virginia), Linux, as published
on aws.amazon.com/ec2/pricing/on-demand, /ec2/pricing/reserved-instances (1-year standard,
no upfront), /eks/pricing, /elasticloadbalancing/pricing and /ebs/pricing, as known in 2025.
They were NOT re-checked on 2026-11-26 (this machine has no route to AWS); spot prices move
hourly by availability zone, so SPOT_G4DN_XLARGE is a typical figure, not a quote. Check them
before quoting a customer.

The seed promises "$435/month (optimized)" without a breakdown. `stack(pricing)` prices the
seed's stack from list prices alone (the seed's counts, a few assumed quantities: EBS size,
ALB load, monitoring extras) for each way of paying for the GPU node; `seed_gpu_price()` says
what GPU price the seed's total would imply, and `seed_pricing()` between which published
prices that falls. Nothing is made to balance: on demand the stack costs $618.72/month, and
$435 lies between the spot and the 1-year reserved totals, so the seed's figure assumes a
discounted GPU.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

HOURS_PER_MONTH = 730.0  # AWS's own monthly convention (8,760 h / 12)
SEED_MONTHLY_TOTAL = 435.00  # the seed: "Cost: $435/month (optimized)"
SEED_IMAGES_PER_HOUR = (500.0, 1000.0)  # the seed: 500 to 1,000 images/hour on one T4

# Hourly list prices, us-east-1, USD (assumptions; see the module docstring).
EKS_CONTROL_PLANE = 0.10
T3_MEDIUM = 0.0416
T3_SMALL = 0.0208
G4DN_XLARGE_ON_DEMAND = 0.526
G4DN_XLARGE_RESERVED_1Y = 0.329  # 1-year standard reserved, no upfront (approximate)
SPOT_G4DN_XLARGE = 0.21  # typical us-east-1 spot; moves hourly, interruptible
ALB_HOUR = 0.0225
ALB_LCU_HOUR = 0.008
EBS_GP3_GB_MONTH = 0.08  # 3,000 IOPS and 125 MB/s are included in the base price

# Assumed quantities (the seed does not give them).
EBS_GB = 100  # model weights (~5 GB per exported version), assets, Prometheus data
ALB_AVERAGE_LCU = 1.0  # a game back end's API traffic: well under one LCU's 25 new conn/s
MONITORING_EXTRAS = 10.00  # CloudWatch logs, SNS for AlertManager; Prometheus/Grafana run
# on the worker nodes, so their compute is in the t3.medium line

# A published figure, not measured here: a T4 makes a 512x512 SD 1.5 image in ~2.4 s at
# 25 steps (fp16, one image at a time).
T4_PUBLISHED_SECONDS_PER_IMAGE = 2.4


@dataclass(frozen=True)
class Line:
    """One line of the monthly bill: a quantity at a unit price, and where the price is from."""

    item: str
    quantity: float
    unit_price: float  # USD per unit per hour, or per month where `monthly` is set
    basis: str  # "list price", "assumed quantity", "implied by the seed's total"
    monthly: bool = False

    @property
    def dollars(self) -> float:
        """Dollars a month."""
        hours = 1.0 if self.monthly else HOURS_PER_MONTH
        return self.quantity * self.unit_price * hours


def fixed_lines() -> list[Line]:
    """Everything but the GPU node, the same in every pricing scenario."""
    return [
        Line("EKS control plane", 1, EKS_CONTROL_PLANE, "list price"),
        Line("worker nodes, 2x t3.medium", 2, T3_MEDIUM, "list price"),
        Line("Kafka brokers, 2x t3.small", 2, T3_SMALL, "list price"),
        Line("Redis, 2x t3.small (replication)", 2, T3_SMALL, "list price"),
        Line(f"EBS gp3, {EBS_GB} GB", EBS_GB, EBS_GP3_GB_MONTH, "assumed quantity", True),
        Line("ALB, hours", 1, ALB_HOUR, "list price"),
        Line(f"ALB, {ALB_AVERAGE_LCU:g} LCU average", ALB_AVERAGE_LCU, ALB_LCU_HOUR, "assumed"),
        Line("monitoring extras (CloudWatch, SNS)", 1, MONITORING_EXTRAS, "assumed", True),
    ]


def total(lines: list[Line]) -> float:
    """Dollars a month for all `lines`."""
    return sum(line.dollars for line in lines)


GPU_PRICES = {
    "on-demand": G4DN_XLARGE_ON_DEMAND,
    "1-year reserved": G4DN_XLARGE_RESERVED_1Y,
    "spot": SPOT_G4DN_XLARGE,
}


def stack(pricing: str) -> list[Line]:
    """The whole stack with the GPU node at `pricing` (a key of GPU_PRICES)."""
    return [
        *fixed_lines(),
        Line(f"GPU node, 1x g4dn.xlarge ({pricing})", 1, GPU_PRICES[pricing], "list price"),
    ]


def seed_gpu_price() -> float:
    """The GPU node's hourly price that the seed's total would imply, the rest at list price."""
    return (SEED_MONTHLY_TOTAL - total(fixed_lines())) / HOURS_PER_MONTH


def seed_pricing() -> tuple[str, str]:
    """The two GPU pricings whose stack totals bracket the seed's figure (cheaper, dearer)."""
    by_total = sorted(GPU_PRICES, key=lambda p: total(stack(p)))
    below = [p for p in by_total if total(stack(p)) <= SEED_MONTHLY_TOTAL]
    above = [p for p in by_total if total(stack(p)) > SEED_MONTHLY_TOTAL]
    if not below or not above:
        raise ValueError(f"no published pricing brackets ${SEED_MONTHLY_TOTAL:.2f}")
    return below[-1], above[0]


def images_per_month(images_per_hour: float, utilization: float) -> float:
    """Images a month from a node's capacity (images/hour at full load) at `utilization`."""
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization {utilization} must be in (0, 1]")
    return images_per_hour * utilization * HOURS_PER_MONTH


def dollars_per_1000(monthly: float, images_per_hour: float, utilization: float) -> float:
    """Dollars per 1,000 images for a `monthly` bill and a node's capacity at `utilization`."""
    return 1000 * monthly / images_per_month(images_per_hour, utilization)


@dataclass(frozen=True)
class Throughput:
    """A GPU node's images per hour, where the figure comes from, and what kind it is."""

    source: str
    images_per_hour: float | None  # None: not measured
    kind: str  # "seed claim", "published reference", "target", "measured", "not measured"


def throughputs(measured_t4: float | None = None) -> list[Throughput]:
    """The throughput rows of the cost table; `measured_t4` fills this system's T4 row."""
    return [
        Throughput("seed, low end", SEED_IMAGES_PER_HOUR[0], "seed claim"),
        Throughput("seed, high end", SEED_IMAGES_PER_HOUR[1], "seed claim"),
        Throughput(
            "published T4 figure, ~2.4 s/image at 25 steps, one at a time",
            3600 / T4_PUBLISHED_SECONDS_PER_IMAGE,
            "published reference (not ours)",
        ),
        Throughput("this system's goal on a T4", 1400.0, "target"),
        Throughput(
            "this system on a T4 (perf/gpu_bench.py, projected from the GPU machine)",
            measured_t4,
            "projection" if measured_t4 else "not measured",
        ),
    ]


def render(utilization: float, measured_t4: float | None = None) -> str:
    """The Markdown tables perf/RESULTS.md shows."""
    out = ["### The seed's stack at list prices", ""]
    out += ["| line | $/month | basis |", "|---|---:|---|"]
    for line in fixed_lines():
        out.append(f"| {line.item} | {line.dollars:.2f} | {line.basis} |")
    out.append(f"| **all but the GPU node** | **{total(fixed_lines()):.2f}** | |")
    out += ["", "### Monthly cost by GPU pricing, and the seed's figure", ""]
    out += ["| GPU pricing | GPU $/hour | stack $/month |", "|---|---:|---:|"]
    for pricing, hourly in GPU_PRICES.items():
        out.append(f"| {pricing} | {hourly:.3f} | {total(stack(pricing)):.2f} |")
    cheaper, dearer = seed_pricing()
    out.append(
        f"| the seed's figure (implies {seed_gpu_price():.3f} $/hour: between {cheaper} and "
        f"{dearer}) | {seed_gpu_price():.3f} | {SEED_MONTHLY_TOTAL:.2f} |"
    )
    out += ["", f"### Dollars per 1,000 images at {utilization:.0%} utilization", ""]
    header = "| throughput source | images/hour | kind | " + " | ".join(GPU_PRICES) + " |"
    out += [header, "|---|---:|---|" + "---:|" * len(GPU_PRICES)]
    for t in throughputs(measured_t4):
        if t.images_per_hour is None:
            out.append(f"| {t.source} | not measured | {t.kind} |" + " — |" * len(GPU_PRICES))
            continue
        costs = " | ".join(
            f"{dollars_per_1000(total(stack(p)), t.images_per_hour, utilization):.2f}"
            for p in GPU_PRICES
        )
        out.append(f"| {t.source} | {t.images_per_hour:,.0f} | {t.kind} | {costs} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Print the tables for --utilization (and --t4-images-per-hour, once projected)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--utilization", type=float, default=0.7, help="share of capacity used")
    parser.add_argument(
        "--t4-images-per-hour",
        type=float,
        default=None,
        help="this system's T4 throughput, once perf/gpu_bench.py has projected it",
    )
    args = parser.parse_args(argv)
    print(render(args.utilization, args.t4_images_per_hour))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
