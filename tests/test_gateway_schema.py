"""schemathesis against the gateway's OpenAPI document: no 5xx, every response as documented."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.gateway import GatewayServer
from launcher.kafka import KafkaBroker
from launcher.redis import RedisServer
from launcher.triton import Triton
from tests.conftest import gateway_env

FUZZ_KEY = "fk_test_schemathesis"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fuzzed_gateway(
    triton: Triton,
    redis_server: RedisServer,
    broker: KafkaBroker,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayServer]:
    workdir: Path = tmp_path_factory.mktemp("fuzzed-gateway")
    # A small budget: large generated requests are refused by the real rate limiter (429)
    # before they reach Triton, which keeps the run short on a CPU.
    env = gateway_env(
        triton,
        redis_server,
        workdir / "assets",
        FORGE_DEV_API_KEY=FUZZ_KEY,
        FORGE_RATE_LIMIT="40/minute",
        FORGE_KAFKA_BOOTSTRAP=broker.bootstrap,
        FORGE_TOPIC_PREFIX="fuzz.",  # jobs queue here; no worker reads them
        # Generated text may read as a blocked term once normalised ("Ãß"): the content
        # policy flags it instead of refusing it (its refusals: tests/test_content_policy.py).
        FORGE_DEV_KEY_CONTENT_POLICY="review",
    )
    server = GatewayServer(workdir, env).start()
    try:
        yield server
    finally:
        server.stop()


def schemathesis(url: str, tmp_path: Path, *options: str, hooks: bool = False) -> str:
    """One schemathesis run against the live gateway; its output (the test fails on any
    failure it finds)."""
    argv = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{url}/openapi.json",
        "--max-examples",
        "25",
        "--seed",
        "20261126",
        "--header",
        f"Authorization: Bearer {FUZZ_KEY}",
        "--request-timeout",
        "120",
        "--workers",
        "1",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
        *options,
    ]
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if hooks:
        env["SCHEMATHESIS_HOOKS"] = "tests.schemathesis_hooks"
    run = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "passed" in run.stdout
    return run.stdout


def test_api_conforms_to_its_schema(fuzzed_gateway: GatewayServer, tmp_path: Path) -> None:
    """Every check schemathesis has, on every operation, with positive and negative data.

    Two runs: the generated phases (examples, fuzzing, stateful) with every check,
    positive data acceptance included, and generated Idempotency-Keys made unique
    (tests/schemathesis_hooks.py: a key names one request, a rule between requests that no
    schema states); then the coverage phase's fixed boundary values, which send one key
    with many bodies and which no hook reaches, with every check but that one.
    """
    schemathesis(
        fuzzed_gateway.url,
        tmp_path / "generated",
        "--checks",
        "all",
        "--phases",
        "examples,fuzzing,stateful",
        hooks=True,
    )
    schemathesis(
        fuzzed_gateway.url,
        tmp_path / "coverage",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--phases",
        "coverage",
    )
