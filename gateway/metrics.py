"""Application metrics of the gateway and the workers.

HTTP request metrics come from prometheus-fastapi-instrumentator.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
DEPENDENCY_UP = Gauge(
    "forge_dependency_up",
    "1 when the gateway's last check of a dependency (triton, redis) succeeded",
    ["dependency"],
)
TRITON_ERRORS = Counter("forge_triton_errors_total", "Failed Triton calls by status", ["status"])

# Kafka workers (served on the worker's metrics port, 9300 by default)
JOBS = Counter(
    "forge_jobs_total",
    "Job items handled by workers, by topic and outcome "
    "(succeeded, failed, retried, dead_lettered, duplicate)",
    ["topic", "outcome"],
)
JOB_QUEUE_WAIT = Histogram(
    "forge_job_queue_wait_seconds",
    "Time from submission to a worker starting the item",
    ["topic"],
    buckets=LATENCY_BUCKETS,
)
JOB_RETRIES = Counter("forge_job_retries_total", "Items sent to the retry topic", ["topic"])
DEAD_LETTERS = Counter(
    "forge_dead_letters_total", "Items sent to the dead-letter topic", ["reason"]
)
JOBS_IN_FLIGHT = Gauge("forge_jobs_in_flight", "Items a worker is generating now")
CONSUMER_LAG = Gauge(
    "forge_consumer_lag",
    "Messages not yet consumed, by topic and partition",
    ["topic", "partition"],
)
JOBS_SUBMITTED = Counter(
    "forge_jobs_submitted_total", "Job items accepted by the gateway", ["topic"]
)
