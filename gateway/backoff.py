"""Exponential backoff with jitter, for retries that must spread out and slow down."""

from __future__ import annotations

import random


def jittered(attempts: int, base_s: float, max_s: float) -> float:
    """Seconds to wait after `attempts` failures: base x 2^attempts, capped at max_s, times a
    random factor in [0.5, 1] so that many waiters do not retry in step."""
    return min(max_s, base_s * 2**attempts) * random.uniform(0.5, 1.0)
