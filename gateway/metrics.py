"""Application metrics of the gateway and the workers.

HTTP request metrics come from prometheus-fastapi-instrumentator.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120)

GENERATION_SECONDS = Histogram(
    "forge_generation_seconds",
    "Time to produce an image result (Triton call, encoding, storing), by source and outcome",
    ["source", "outcome"],
    buckets=LATENCY_BUCKETS,
)
CACHE_REQUESTS = Counter(
    "forge_cache_requests_total", "Result cache lookups (explicit-seed requests)", ["result"]
)
RATE_LIMITED = Counter("forge_rate_limited_total", "Requests refused with 429", ["tier"])
TRITON_ERRORS = Counter("forge_triton_errors_total", "Failed Triton calls by status", ["status"])
