"""Gateway and worker settings: environment variables with the prefix FORGE_."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.content_policy import Mode


class Settings(BaseSettings):
    """Every setting of the gateway and the worker; FORGE_<NAME> sets <name>."""

    model_config = SettingsConfigDict(env_prefix="FORGE_", extra="ignore")

    # Where things are
    host: str = "127.0.0.1"
    port: int = 8080
    # Who may set X-Forwarded-For/-Proto (the load balancer's addresses: comma-separated IPs
    # or networks, as uvicorn's forwarded_allow_ips takes them); others' are ignored.
    forwarded_allow_ips: str = "127.0.0.1"
    triton_grpc_url: str = "127.0.0.1:8001"
    # Job state, API keys, rate limits, idempotency: nothing here may be evicted (in
    # Kubernetes, a Redis with maxmemory-policy noeviction). The result cache may be evicted:
    # give it its own LRU Redis with cache_redis_url (default: the same Redis).
    redis_url: str = "redis://127.0.0.1:6379/0"
    cache_redis_url: str | None = None
    asset_dir: Path = Path("var/assets")
    asset_s3_bucket: str | None = None
    asset_s3_prefix: str = "assets/"
    asset_s3_endpoint: str | None = None
    public_base_url: str = Field("", description="prefix of asset URLs, e.g. a CDN; '' = relative")
    weapon_templates: Path = Path(__file__).parent / "weapon_templates.yaml"

    # Keys
    dev_api_key: str | None = Field(None, description="created at start with every scope")
    dev_webhook_secret: str | None = Field(
        None, description="whsec_... the dev key signs callbacks with (default: one is made)"
    )
    api_keys_file: Path | None = Field(None, description="YAML of hashed keys (a Secret)")
    dev_key_content_policy: Mode = "strict"

    # The content policy for players' free text (gateway.content_policy); each API key has
    # its mode (strict, review or off).
    content_policy: Path = Path(__file__).parent / "content_policy.yaml"
    # How long a key's previous webhook secret keeps signing after a rotation.
    webhook_secret_overlap_s: float = 86_400.0

    # Generation
    triton_timeout_s: float = 120.0
    # Streamed generations: progress from the model at most this often (the first and last
    # steps and every preview are sent regardless); 0 sends every step.
    stream_progress_interval_s: float = Field(0.1, ge=0)
    retry_after_s: int = 5
    # Above the largest valid body (a job of max_job_items entries with the longest prompts).
    max_body_bytes: int = 1_048_576
    # Input images (uploads and multipart requests): the most bytes, and the most pixels
    # (width x height, read from the header and refused before anything is decoded).
    upload_max_bytes: int = Field(10_485_760, ge=1024)
    upload_max_pixels: int = Field(16_777_216, ge=4096)
    # How often the model's generation contract is read again from Triton.
    contract_refresh_s: float = 10.0
    dependency_check_s: float = 10.0  # how often forge_dependency_up is refreshed

    # Rate limits, in cost units: one unit is one guided step at 512x512 (gateway.ratelimit).
    rate_limit: str = "2000/minute"
    rate_limit_by_tier: dict[str, str] = {"priority": "6000/minute", "bulk": "1000/minute"}

    # Async jobs over Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    topic_prefix: str = "forge.jobs."
    topic_partitions: int = 3
    topic_replication: int = 1
    consumer_group: str = "forge-workers"
    kafka_idempotence: bool = Field(
        False, description="producer idempotence; the local tansu broker lacks InitProducerId v3"
    )
    max_job_items: int = 100
    job_ttl_s: int = 7 * 86_400
    worker_concurrency: int = 4
    # Job progress: a preview every this many steps (0: none), in a job's event stream
    # (GET /v1/jobs/{id}/events) of at most job_events_max events (the oldest trimmed),
    # kept job_events_ttl_s after the job finished (its status is kept job_ttl_s).
    job_preview_every: int = Field(5, ge=0)
    job_events_max: int = Field(1000, ge=10)
    job_events_ttl_s: int = Field(600, ge=1)
    worker_metrics_port: int = 9300
    # Longer than the longest job (a poll gap past it makes the broker drop the worker).
    max_poll_interval_ms: int = 900_000
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    fetch_max_wait_ms: int = 50  # how long an idle poll waits: the floor of queueing latency
    # An item's own failures (not an outage of the image model): attempts and backoff.
    max_attempts: int = 5
    retry_backoff_s: float = 2.0
    retry_backoff_max_s: float = 300.0
    # An item not finished this long after submission fails (e.g. Triton down for hours).
    item_deadline_s: float = 6 * 3600.0
    # The sweeper: how often it runs, and after how long without progress it sends an
    # item's message again (a lost message; a duplicate only costs one generation).
    sweep_every_s: float = 30.0
    stuck_after_s: float = 900.0
    # Callbacks (gateway.callback_urls): on or off, the ports they may use, internal networks
    # admitted on purpose, the DNS servers to ask (empty: the system resolver).
    callbacks: bool = True
    callback_ports: list[int] = [80, 443]
    callback_allow_networks: list[str] = []
    callback_nameservers: list[str] = []
    # Callbacks, from the outbox: backoff between attempts, and when to give up.
    webhook_timeout_s: float = 10.0
    webhook_backoff_s: float = 5.0
    webhook_backoff_max_s: float = 3600.0
    webhook_give_up_after_s: float = 86_400.0
    webhook_max_response_bytes: int = 65_536

    # Cache and idempotency
    idempotency_ttl_s: int = 86_400
    cache_ttl_s: int = 30 * 86_400
