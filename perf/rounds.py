"""Overhead ratios measured as rounds of alternating calls: a median and its spread.

A shared 2-core machine drifts: other work comes and goes, caches warm and cool. So a ratio
is never one long run of A then B. Each round alternates the two calls pair by pair (which
goes first alternates too), and gives one ratio of medians; the benchmark reports the median
of the rounds' ratios and their spread (lowest, highest), and the targets hold on the median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

ROUNDS = 9  # enough rounds that one run's median stands against the VM's drift


def timed(call: Callable[[], object]) -> float:
    """Seconds one call takes."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


@dataclass(frozen=True)
class Round:
    """One round: the medians of its baseline and served calls, in seconds."""

    baseline_p50_s: float
    served_p50_s: float

    @property
    def ratio(self) -> float:
        """Served over baseline."""
        return self.served_p50_s / self.baseline_p50_s


def alternating(
    baseline: Callable[[], object],
    served: Callable[[], object],
    *,
    pairs: int,
    rounds: int = ROUNDS,
    warm_up: int = 3,
) -> list[Round]:
    """`rounds` rounds of `pairs` pairs, after `warm_up` untimed pairs."""
    for _ in range(warm_up):
        baseline()
        served()
    results = []
    for _ in range(rounds):
        base: list[float] = []
        serve: list[float] = []
        for i in range(pairs):
            if i % 2:
                serve.append(timed(served))
                base.append(timed(baseline))
            else:
                base.append(timed(baseline))
                serve.append(timed(served))
        results.append(Round(statistics.median(base), statistics.median(serve)))
    return results


def summary(rounds: list[Round]) -> dict[str, Any]:
    """Median and spread of the ratio and of the added milliseconds, and every round."""
    ratios = [r.ratio for r in rounds]
    added = [(r.served_p50_s - r.baseline_p50_s) * 1000 for r in rounds]
    return {
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
        "added_ms_median": round(statistics.median(added), 1),
        "baseline_p50_ms_median": round(
            statistics.median(r.baseline_p50_s for r in rounds) * 1000, 1
        ),
        "rounds": [{**asdict(r), "ratio": round(r.ratio, 4)} for r in rounds],
    }
