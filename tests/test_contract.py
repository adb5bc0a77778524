"""The gateway follows the model's generation contract: one source for bounds and defaults.

A second Triton serves the tiny model with a narrower contract (written by `python -m export
config --parameter ...`, no code changed); a gateway in front of it states and enforces
those rules (the `narrow_gateway` fixture). Its rate limit has a one-year window, so that
charges can be read exactly from `RateLimit-Remaining` (no window boundary passes during a
test).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx

from launcher.gateway import GatewayServer
from launcher.kafka import KafkaBroker
from launcher.redis import RedisServer
from launcher.triton import Triton
from tests.conftest import NARROW_CONTRACT, gateway_env, model_parameters
from tests.test_gateway import assert_problem, client
from tests.triton_state import settle


def image_schema(gateway: GatewayServer, name: str = "ImageRequest") -> dict[str, Any]:
    with httpx.Client(base_url=gateway.url) as c:
        schemas = c.get("/openapi.json").json()["components"]["schemas"]
    return dict(schemas[name]["properties"])


def remaining(reply: httpx.Response) -> int:
    assert reply.status_code == 200, reply.text
    return int(reply.headers["RateLimit-Remaining"])


def test_openapi_bounds_and_enums_come_from_the_models_config(
    gateway: GatewayServer, triton: Triton, narrow_gateway: GatewayServer, narrow_triton: Triton
) -> None:
    for server, model in ((gateway, triton), (narrow_gateway, narrow_triton)):
        config = model_parameters(model)
        for body in ("ImageRequest", "WeaponRequest"):
            props = image_schema(server, body)
            assert props["scheduler"]["enum"] == config["schedulers"].split(",")
            assert props["scheduler"]["default"] == config["default_scheduler"]
            for axis in ("width", "height"):
                assert props[axis]["maximum"] == int(config["max_size"])
                assert props[axis]["minimum"] == int(config["min_size"])
                assert props[axis]["multipleOf"] == int(config["size_multiple"])
                assert props[axis]["default"] == int(config["default_size"])
            assert props["steps"]["maximum"] == int(config["max_steps"])
            assert props["steps"]["default"] == int(config["default_steps"])
            assert props["guidance_scale"]["maximum"] == float(config["max_guidance"])
    narrow = image_schema(narrow_gateway)
    assert narrow["scheduler"]["enum"] == NARROW_CONTRACT["schedulers"].split(",")
    assert narrow["width"]["maximum"] == int(NARROW_CONTRACT["max_size"])
    assert image_schema(gateway)["width"]["maximum"] != narrow["width"]["maximum"]


def test_a_request_the_model_would_refuse_is_refused_before_any_charge(
    narrow_gateway: GatewayServer, narrow_triton: Triton
) -> None:
    small = {"prompt": "a notched cleaver", "steps": 2, "width": 64, "height": 64}  # 1 unit
    with client(narrow_gateway) as c:
        before = remaining(c.post("/v1/images", json=small))
        calls = settle(narrow_triton)
        for change, field in (
            ({"width": 72}, "multiple of 16"),  # the tiny model's size multiple
            ({"width": 512}, "less than or equal to 256"),  # this contract's max_size
            ({"scheduler": "pndm"}, "'euler' or 'ddim'"),  # not offered by this contract
            ({"steps": 41}, "less than or equal to 40"),
        ):
            problem = assert_problem(c.post("/v1/images", json={**small, **change}), 422)
            assert field in problem["detail"]
        assert settle(narrow_triton).since(calls).inferences == 0  # Triton never saw them
        after = remaining(c.post("/v1/images", json=small))
    assert after == before - 1  # only the two valid requests were charged


def test_a_default_size_request_is_charged_for_the_models_default_size(
    narrow_gateway: GatewayServer, narrow_triton: Triton
) -> None:
    config = model_parameters(narrow_triton)
    size = int(config["default_size"])
    steps = 40  # guided: two UNet passes a step
    expected = -(-steps * 2 * size * size // (2 * 512 * 512))  # ceil, the documented cost
    body = {"prompt": "a default-sized glaive", "steps": steps}
    with client(narrow_gateway) as c:
        before = remaining(c.post("/v1/images", json={**body, "steps": 1, "width": 64}))
        reply = c.post("/v1/images", json=body)
        charged = before - remaining(reply)
    assert (reply.json()["width"], reply.json()["height"]) == (size, size)
    assert charged == expected and expected != -(-steps * 512 * 512 // (512 * 512))


def test_the_gateway_starts_without_triton_after_seeing_the_model_once(
    repository: Path, broker: KafkaBroker, tmp_path: Path
) -> None:
    model_repository = tmp_path / "model_repository"
    shutil.copytree(repository, model_repository, symlinks=True)
    own_triton = Triton(model_repository, tmp_path / "triton").start()
    redis = RedisServer(tmp_path / "redis").start()  # its own: the stored contract is per Redis
    env = gateway_env(
        own_triton,
        redis,
        tmp_path / "assets",
        FORGE_KAFKA_BOOTSTRAP=broker.bootstrap,
        FORGE_TOPIC_PREFIX="offline.",
    )
    servers: list[Any] = [own_triton, redis]
    try:
        never_seen = GatewayServer(tmp_path / "g0", env).start()  # Triton is up, model not
        servers.append(never_seen)
        with client(never_seen) as c:
            reply = c.post("/v1/images", json={"prompt": "an unloaded sword"})
        assert reply.status_code == 503 and int(reply.headers["Retry-After"]) > 0
        never_seen.stop()
        own_triton.load()
        first = GatewayServer(tmp_path / "g1", env).start()
        servers.append(first)
        with client(first) as c:
            asset = c.post("/v1/images", json={"prompt": "a remembered axe", "steps": 2}).json()
        first.stop()
        own_triton.stop()
        offline = GatewayServer(tmp_path / "g2", env).start()
        servers.append(offline)
        with client(offline) as c:
            job = c.post("/v1/jobs", json={"images": [{"prompt": "an axe for later"}]})
            assert job.status_code == 202, job.text
            status = c.get(job.headers["Location"])
            assert status.status_code == 200 and status.json()["status"] == "queued"
            assert c.get(asset["asset_url"]).status_code == 200
            assert_problem(c.post("/v1/images", json={"prompt": "now"}), 503, "unavailable")
    finally:
        for server in reversed(servers):
            server.stop()
