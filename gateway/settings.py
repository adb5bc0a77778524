"""Gateway and worker settings: environment variables with the prefix FORGE_."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every setting of the gateway and the worker; FORGE_<NAME> sets <name>."""

    model_config = SettingsConfigDict(env_prefix="FORGE_", extra="ignore")

    # Where things are
    host: str = "127.0.0.1"
    port: int = 8080
    triton_grpc_url: str = "127.0.0.1:8001"
    redis_url: str = "redis://127.0.0.1:6379/0"
    asset_dir: Path = Path("var/assets")
    asset_s3_bucket: str | None = None
    asset_s3_prefix: str = "assets/"
    asset_s3_endpoint: str | None = None
    public_base_url: str = Field("", description="prefix of asset URLs, e.g. a CDN; '' = relative")
    weapon_templates: Path = Path(__file__).parent / "weapon_templates.yaml"

    # Keys
    dev_api_key: str | None = Field(None, description="created at start with every scope")
    api_keys_file: Path | None = Field(None, description="YAML of hashed keys (a Secret)")

    # Generation
    triton_timeout_s: float = 120.0
    retry_after_s: int = 5
    # Above the largest valid body (a job of max_job_items entries with the longest prompts).
    max_body_bytes: int = 1_048_576
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
    worker_metrics_port: int = 9300
    # Longer than the longest job (a poll gap past it makes the broker drop the worker).
    max_poll_interval_ms: int = 900_000
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    fetch_max_wait_ms: int = 50  # how long an idle poll waits: the floor of queueing latency
    max_attempts: int = 5
    retry_backoff_s: float = 1.0
    retry_backoff_max_s: float = 30.0
    webhook_secret: str | None = Field(None, description="whsec_... (Standard Webhooks)")
    webhook_attempts: int = 5
    webhook_timeout_s: float = 10.0

    # Cache and idempotency
    idempotency_ttl_s: int = 86_400
    cache_ttl_s: int = 30 * 86_400
