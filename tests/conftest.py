"""Fixtures that build the tiny model, export it, and run the real services on free ports."""

from __future__ import annotations

import base64
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from launcher.gateway import GatewayServer, WorkerServer
from launcher.kafka import KafkaBroker
from launcher.redis import RedisServer
from launcher.triton import MODEL_SOURCE, Triton, copy_model_repository

ROOT = Path(__file__).resolve().parents[1]

# The pipeline core is a plain module beside model.py; tests import it without Triton.
sys.path.insert(0, str(MODEL_SOURCE / "1"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("models") / "forge-tiny-sd")


@pytest.fixture(scope="session")
def repository(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.onnx_export import export_onnx

    repo = copy_model_repository(tmp_path_factory.mktemp("model_repository"))
    export_onnx(str(tiny_model), repo)
    return repo


@pytest.fixture(scope="session")
def weights(repository: Path) -> Path:
    return repository / "stable_diffusion" / "1" / "weights"


def core_config(weights: Path, **overrides: str) -> tuple[dict[str, str], int]:
    """What Triton hands the model for `weights`: the committed config.pbtxt's parameters with
    the values `python -m export config` copies from the weights' manifest and `overrides`;
    and the config's max_batch_size."""
    import json

    from export.triton_config import config_parameters, manifest_parameters, read_config

    config = read_config(MODEL_SOURCE / "config.pbtxt")
    manifest_file = weights / "manifest.json"
    copied = manifest_parameters(json.loads(manifest_file.read_text()), manifest_file)
    return {**config_parameters(config), **copied, **overrides}, config.max_batch_size


def make_core(weights: Path, *, max_batch_size: int | None = None, **overrides: str) -> Any:
    """The pipeline core on `weights` under the committed config (parameters `overrides`)."""
    from sd_pipeline import StableDiffusionCore

    parameters, batch = core_config(weights, **overrides)
    return StableDiffusionCore(weights, parameters, max_batch_size=max_batch_size or batch)


@pytest.fixture(scope="session")
def triton(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    server = Triton(repository, tmp_path_factory.mktemp("triton")).start()
    try:
        server.load_served()
        yield server
    finally:
        server.stop()


def model_parameters(triton: Triton) -> dict[str, str]:
    """The parameters of the model config Triton serves (the generation contract)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        config = client.get_model_config("stable_diffusion", as_json=True)["config"]
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


# A narrower contract than the committed config.pbtxt's, set without changing any code.
NARROW_CONTRACT = {
    "max_size": "256",
    "max_steps": "40",
    "schedulers": "euler,ddim",
    "default_scheduler": "euler",
}


@pytest.fixture(scope="session")
def narrow_triton(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    """The tiny model in its own Triton, its config rewritten by `python -m export config`."""
    import shutil
    import subprocess

    narrow = tmp_path_factory.mktemp("narrow") / "model_repository"
    shutil.copytree(repository, narrow, symlinks=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "config",
            "--repository",
            str(narrow),
            *(f"--parameter={k}={v}" for k, v in NARROW_CONTRACT.items()),
        ],
        check=True,
        cwd=ROOT,
    )
    server = Triton(narrow, tmp_path_factory.mktemp("narrow-triton")).start()
    try:
        server.load()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def narrow_gateway(
    narrow_triton: Triton,
    redis_server: RedisServer,
    broker: KafkaBroker,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayServer]:
    """A gateway in front of `narrow_triton`; a one-year rate-limit window (exact charges)."""
    workdir = tmp_path_factory.mktemp("narrow-gateway")
    env = gateway_env(
        narrow_triton,
        redis_server,
        workdir / "assets",
        FORGE_RATE_LIMIT="1000000 per 1 year",
        FORGE_KAFKA_BOOTSTRAP=broker.bootstrap,
        FORGE_TOPIC_PREFIX="narrow.",
    )
    server = GatewayServer(workdir, env).start()
    try:
        yield server
    finally:
        server.stop()


def serve_one_size(weights: Path, size: int) -> None:
    """Make the exported UNet serve size x size images only, as a static-shape export does:
    its output gets a zero tensor of that size's latents added, which ONNX Runtime cannot
    broadcast to other latents (and which leaves the served size's bytes as they were)."""
    import onnx
    from onnx import helper, numpy_helper

    path = weights / "unet.onnx"
    model = onnx.load(path, load_external_data=False)  # the weights file stays as it is
    graph = model.graph
    output = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{output}_any_size" if o == output else o for o in node.output]
    zeros = np.zeros((1, 4, size // 8, size // 8), dtype=np.float32)
    graph.initializer.append(numpy_helper.from_array(zeros, "zeros"))
    name = f"only_{size}x{size}"
    graph.node.append(helper.make_node("Add", [f"{output}_any_size", "zeros"], [output], name=name))
    onnx.save(model, path)


@contextmanager
def one_size_server(
    repository: Path, factory: pytest.TempPathFactory, name: str, *config_args: str
) -> Iterator[Triton]:
    """The tiny model in its own Triton, its UNet serving 128x128 only (`serve_one_size`);
    with `config_args`, its config rewritten by `export config` with them."""
    import shutil

    from export.__main__ import main as export_main

    copy = factory.mktemp(name) / "model_repository"
    shutil.copytree(repository, copy, symlinks=True)
    weights = (copy / "stable_diffusion" / "1" / "weights").resolve()
    assert copy in weights.parents  # the shared repository stays untouched
    serve_one_size(weights, 128)
    if config_args:
        assert export_main(["config", "--repository", str(copy), *config_args]) == 0
    server = Triton(copy, factory.mktemp(f"{name}-triton")).start()
    try:
        server.load_served()  # the warm-ups run at the default size, 128x128
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def failing_triton(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    """The tiny model in its own Triton, its UNet serving 128x128 only: any other size fails
    inside the model (INTERNAL), as a model that breaks on some inputs does."""
    with one_size_server(repository, tmp_path_factory, "failing") as server:
        yield server


@pytest.fixture(scope="session")
def diffusers_pipe(tiny_model: Path):  # type: ignore[no-untyped-def]
    """The tiny model in diffusers' own StableDiffusionPipeline: the reference for parity."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_reference(pipe, request) -> np.ndarray:  # type: ignore[no-untyped-def]
    """diffusers' uint8 image for a GenerationRequest, with the request's scheduler and seed."""
    import torch
    from sd_requests import SCHEDULERS

    pipe.scheduler = SCHEDULERS[request.scheduler](pipe.scheduler.config)
    image = pipe(
        request.prompt,
        negative_prompt=request.negative_prompt,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        width=request.width,
        height=request.height,
        generator=torch.Generator().manual_seed(request.seed),
        output_type="np",
    ).images[0]
    return (image * 255).round().astype(np.uint8)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


DEV_KEY = "fk_test_dev_key"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"crafterse-forge-test-secret-32b!").decode()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    server = KafkaBroker(tmp_path_factory.mktemp("broker")).start()
    try:
        yield server
    finally:
        server.stop()


def gateway_env(triton: Triton, redis: RedisServer, assets: Path, **extra: str) -> dict[str, str]:
    return {
        "FORGE_TRITON_GRPC_URL": triton.grpc_url,
        "FORGE_REDIS_URL": redis.url,
        "FORGE_ASSET_DIR": str(assets),
        "FORGE_DEV_API_KEY": DEV_KEY,
        "FORGE_TRITON_TIMEOUT_S": "60",
        "FORGE_RETRY_AFTER_S": "3",
        "FORGE_DEV_WEBHOOK_SECRET": WEBHOOK_SECRET,
        # Fast group membership for tests; production keeps the defaults.
        "FORGE_SESSION_TIMEOUT_MS": "6000",
        "FORGE_HEARTBEAT_INTERVAL_MS": "1000",
        **extra,
    }


@pytest.fixture(scope="session")
def gateway(
    triton: Triton,
    redis_server: RedisServer,
    broker: KafkaBroker,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayServer]:
    workdir = tmp_path_factory.mktemp("gateway")
    # Small limits for the "bulk" tier so that the rate-limit test can exhaust one.
    env = gateway_env(
        triton,
        redis_server,
        workdir / "assets",
        FORGE_RATE_LIMIT_BY_TIER='{"bulk": "10/minute"}',
        FORGE_KAFKA_BOOTSTRAP=broker.bootstrap,
    )
    server = GatewayServer(workdir, env).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class JobsStack:
    """A gateway and its workers on topics of their own (a fresh prefix per test)."""

    triton: Triton
    redis: RedisServer
    broker: KafkaBroker
    workdir: Path
    prefix: str
    gateway: GatewayServer | None = None
    workers: list[WorkerServer] = field(default_factory=list)

    @property
    def assets(self) -> Path:
        return self.workdir / "assets"

    def env(self, **extra: str) -> dict[str, str]:
        stack = {
            "FORGE_KAFKA_BOOTSTRAP": self.broker.bootstrap,
            "FORGE_TOPIC_PREFIX": self.prefix,
            "FORGE_TOPIC_PARTITIONS": "2",
            "FORGE_CONSUMER_GROUP": f"{self.prefix}workers",
        }
        return gateway_env(self.triton, self.redis, self.assets, **(stack | extra))

    def start_gateway(self, **extra: str) -> GatewayServer:
        self.gateway = GatewayServer(self.workdir, self.env(**extra)).start()
        return self.gateway

    def start_worker(self, **extra: str) -> WorkerServer:
        worker = WorkerServer(self.workdir, self.env(**extra)).start()
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for server in [*self.workers, self.gateway]:
            if server is not None:
                server.kill()


@pytest.fixture
def jobs_stack(
    triton: Triton, redis_server: RedisServer, broker: KafkaBroker, tmp_path: Path
) -> Iterator[JobsStack]:
    stack = JobsStack(triton, redis_server, broker, tmp_path, f"t{uuid.uuid4().hex[:8]}.")
    try:
        yield stack
    finally:
        stack.stop()
