"""Application metrics of the gateway and the workers.

HTTP request metrics come from prometheus-fastapi-instrumentator.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from gateway.keys import TIERS

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120)

# The outcomes the objectives and alerts read (others, like cancelled, appear when seen).
GENERATION_OUTCOMES = ("success", "error", "invalid", "unavailable")
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
    "1 when the gateway's last check of a dependency (triton, redis, broker) succeeded",
    ["dependency"],
)
OPEN_STREAMS = Gauge("forge_open_streams", "Server-sent event streams of generations open now")
FIRST_PREVIEW_SECONDS = Histogram(
    "forge_time_to_first_preview_seconds",
    "Time from the start of a streamed response to its first preview event",
    buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30),
)
STREAMS_CANCELLED = Counter(
    "forge_streams_cancelled_total",
    "Streamed generations stopped because the client disconnected",
)
JOB_ITEMS_CANCELLED = Counter(
    "forge_job_items_cancelled_total",
    "Job items cancelled by their client (DELETE /v1/jobs/{id}), by the state they were in",
    ["state"],
)
CONTENT_POLICY = Counter(
    "forge_content_policy_total",
    "Images whose players' text the content policy checked, by category (none: nothing "
    "matched) and outcome (allowed, refused: strict keys, flagged: review keys)",
    ["category", "outcome"],
)
TRITON_ERRORS = Counter("forge_triton_errors_total", "Failed Triton calls by status", ["status"])

# Kafka workers (served on the worker's metrics port, 9300 by default)
JOBS = Counter(
    "forge_jobs_total",
    "Job items handled by workers, by topic and outcome "
    "(succeeded, failed, retried, dead_lettered, duplicate, cancelled, orphaned: its job is gone)",
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
WORKER_PAUSED = Gauge(
    "forge_worker_paused",
    "1 while the worker takes no work because the image model is unavailable",
)
COMMIT_FAILURES = Counter(
    "forge_commit_failures_total",
    "Offset commits refused by the broker or withheld because a rebalance revoked the "
    "batch's partitions while it ran; their items are read again",
)
CALLBACKS = Counter(
    "forge_callbacks_total",
    "Callback attempts from the outbox, by outcome (delivered, retried, gave_up)",
    ["outcome"],
)
SWEPT = Counter(
    "forge_swept_total",
    "What the sweeper did, by action (requeued, expired, results_sent)",
    ["action"],
)


def start_gateway_series() -> None:
    """Export the gateway's labelled counters at 0 from the start, so that a rate or a ratio
    sees their first event (a series born at 1 shows no increase)."""
    for result in ("hit", "miss"):
        CACHE_REQUESTS.labels(result)
    for tier in TIERS:
        RATE_LIMITED.labels(tier)
    for state in ("queued", "running"):
        JOB_ITEMS_CANCELLED.labels(state)
    for outcome in GENERATION_OUTCOMES:
        GENERATION_SECONDS.labels("sync", outcome)


def start_worker_series() -> None:
    """Export the worker's labelled counters at 0 from the start, so that a rate or an
    increase sees their first event (a series born at 1 shows no increase)."""
    for outcome in GENERATION_OUTCOMES:
        GENERATION_SECONDS.labels("job", outcome)
    for reason in ("malformed", "invalid", "exhausted"):
        DEAD_LETTERS.labels(reason)
    for outcome in ("delivered", "retried", "gave_up"):
        CALLBACKS.labels(outcome)
    for action in ("requeued", "expired", "results_sent"):
        SWEPT.labels(action)
