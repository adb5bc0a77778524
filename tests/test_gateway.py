"""The gateway as a real process, in front of the real Triton and Redis."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from sd_requests import GenerationRequest

from launcher.gateway import GatewayServer
from launcher.triton import Triton
from tests.conftest import DEV_KEY
from tests.triton_state import Hold, Witness, settle, wait_pending

SMALL = {"steps": 4, "width": 64, "height": 64}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def client(gateway: GatewayServer, key: str | None = DEV_KEY, **kw: Any) -> httpx.Client:
    return httpx.Client(base_url=gateway.url, headers=auth(key) if key else {}, timeout=120, **kw)


def make_key(gateway: GatewayServer, scopes: list[str], tier: str = "standard") -> dict[str, Any]:
    with client(gateway) as c:
        reply = c.post(
            "/v1/admin/keys", json={"name": f"test-{tier}", "scopes": scopes, "tier": tier}
        )
    assert reply.status_code == 201, reply.text
    return dict(reply.json())


def marked(text: str) -> str:
    """`text` with a marker of this run: no earlier request shares its cache entry."""
    return f"{text} {uuid.uuid4().hex[:8]}"


def gateway_metric(gateway: GatewayServer, name: str, **labels: str) -> float:
    """The sum of a metric's samples with `labels`, as the gateway exposes it now."""
    text = httpx.get(f"{gateway.url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def assert_problem(reply: httpx.Response, status: int, detail: str = "") -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/problem+json"
    body = reply.json()
    assert body["status"] == status and body["title"] and detail in body["detail"]
    return dict(body)


def test_generate_returns_a_stored_asset_with_model_and_timings(gateway: GatewayServer) -> None:
    with client(gateway) as c:
        reply = c.post("/v1/images", json={"prompt": "a frost-forged legendary axe", **SMALL})
        assert reply.status_code == 200, reply.text
        result = reply.json()
        assert reply.headers["X-Cache"] == "miss"
        assert result["model"] == {"name": "forge-tiny-sd", "version": result["model"]["version"]}
        assert (result["width"], result["height"], result["format"]) == (64, 64, "png")
        assert 0 <= result["seed"] < 2**63 and result["timings"]["total_ms"] > 0
        image = c.get(result["asset_url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert hashlib.sha256(image.content).hexdigest() + ".png" == result["id"]
        from PIL import Image

        assert Image.open(io.BytesIO(image.content)).size == (64, 64)


def test_accept_image_png_returns_the_bytes(gateway: GatewayServer) -> None:
    body = {"prompt": "a bone dagger", "seed": 5, **SMALL}
    with client(gateway) as c:
        as_json = c.post("/v1/images", json=body).json()
        as_png = c.post("/v1/images", json=body, headers={"Accept": "image/png"})
        webp = c.post(
            "/v1/images", json={**body, "format": "webp"}, headers={"Accept": "image/png"}
        )
    assert as_png.status_code == 200 and as_png.headers["content-type"] == "image/png"
    assert hashlib.sha256(as_png.content).hexdigest() + ".png" == as_json["id"]
    assert_problem(webp, 406, "webp")


def test_weapons_are_written_by_the_templates(gateway: GatewayServer) -> None:
    weapon = {
        "weapon_type": "axe",
        "material": "iron",
        "element": "frost",
        "rarity": "legendary",
        "text": "runes of the north",
        **SMALL,
    }
    with client(gateway) as c:
        reply = c.post("/v1/weapons", json=weapon)
        assert reply.status_code == 200, reply.text
        prompt = reply.json()["prompt"]
        assert "battle axe made of forged iron" in prompt and "frost" in prompt
        assert prompt.count("runes of the north") == 1
        assert "watermark" in reply.json()["negative_prompt"]
        bad = c.post("/v1/weapons", json={**weapon, "weapon_type": "banana"})
    problem = assert_problem(bad, 422, "weapon_type")
    assert "sword" in problem["detail"]  # the choices are named


def test_auth_matrix(gateway: GatewayServer) -> None:
    body = {"prompt": "a sword", **SMALL}
    generate_only = make_key(gateway, ["generate"])
    admin_only = make_key(gateway, ["admin"])
    revoked = make_key(gateway, ["generate"])
    with client(gateway) as c:
        assert c.delete(f"/v1/admin/keys/{revoked['id']}").status_code == 204
    with client(gateway, key=None) as anonymous:
        missing = anonymous.post("/v1/images", json=body)
        assert_problem(missing, 401, "Authorization: Bearer")
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        wrong = anonymous.post("/v1/images", json=body, headers=auth("fk_not_a_key"))
        assert_problem(wrong, 401, "unknown or revoked")
        gone = anonymous.post("/v1/images", json=body, headers=auth(revoked["key"]))
        assert_problem(gone, 401, "unknown or revoked")
        assert_problem(
            anonymous.get("/v1/admin/keys", headers=auth(generate_only["key"])),
            403,
            "'admin' scope",
        )
        assert_problem(
            anonymous.post("/v1/images", json=body, headers=auth(admin_only["key"])),
            403,
            "'generate' scope",
        )
        assert (
            anonymous.post("/v1/images", json=body, headers=auth(generate_only["key"])).status_code
            == 200
        )
        listed = anonymous.get("/v1/admin/keys", headers=auth(admin_only["key"])).json()
    assert {"id": revoked["id"], "revoked": True}.items() <= next(
        k for k in listed if k["id"] == revoked["id"]
    ).items()
    assert all("sha256" not in k and "key" not in k for k in listed)


def test_parallel_requests_against_a_limit_pass_exactly_that_many(gateway: GatewayServer) -> None:
    bulk = make_key(gateway, ["generate"], tier="bulk")  # 10 units a minute in this test stack
    body = {"prompt": "a spear", "steps": 1, "width": 64, "height": 64}  # costs 1 unit
    with client(gateway, key=bulk["key"]) as c, ThreadPoolExecutor(25) as pool:
        replies = list(pool.map(lambda _: c.post("/v1/images", json=body), range(25)))
    codes = sorted(r.status_code for r in replies)
    assert codes == [200] * 10 + [429] * 15
    limited = next(r for r in replies if r.status_code == 429)
    assert_problem(limited, 429, "units")
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert limited.headers["RateLimit-Limit"] == "10"
    assert limited.headers["RateLimit-Remaining"] == "0"
    assert limited.headers["RateLimit-Policy"] == "10;w=60"


def test_a_cache_hit_does_not_call_triton(gateway: GatewayServer, triton: Triton) -> None:
    body = {"prompt": marked("a crystal bow"), "seed": 777, **SMALL}
    with client(gateway) as c:
        first = c.post("/v1/images", json=body)
        before = settle(triton)
        again = c.post("/v1/images", json=body)
        other_seed = c.post("/v1/images", json={**body, "seed": 778})
    assert first.headers["X-Cache"] == "miss" and again.headers["X-Cache"] == "hit"
    assert again.json()["id"] == first.json()["id"] and again.json()["cached"] is True
    assert other_seed.headers["X-Cache"] == "miss"
    assert settle(triton).since(before).inferences == 1  # only the new seed


def test_idempotency_keys(gateway: GatewayServer, triton: Triton) -> None:
    body = {"prompt": marked("an obsidian hammer"), **SMALL}
    order_1, order_2 = marked("order-1").replace(" ", "-"), marked("order-2").replace(" ", "-")
    other = make_key(gateway, ["generate"])
    with client(gateway) as c:
        first = c.post("/v1/images", json=body, headers={"Idempotency-Key": order_1})
        before = settle(triton)
        replay = c.post("/v1/images", json=body, headers={"Idempotency-Key": order_1})
        assert replay.json() == first.json() and replay.headers["Idempotent-Replayed"] == "true"
        assert_problem(
            c.post("/v1/images", json={**body, "steps": 5}, headers={"Idempotency-Key": order_1}),
            422,
            "different",
        )
        assert_problem(
            c.post("/v1/images", json=body, headers={"Idempotency-Key": "bad key"}),
            422,
            "Idempotency-Key",
        )
        assert settle(triton).since(before).inferences == 0  # neither replay nor refusals ran
    with client(gateway, key=other["key"]) as c2:  # keys are scoped to the API key
        mine = c2.post("/v1/images", json=body, headers={"Idempotency-Key": order_1})
        assert mine.status_code == 200 and "Idempotent-Replayed" not in mine.headers
    # While the first request with a key is in flight (held in Triton's queue), the same key
    # gets 409; released, the first one completes.
    settle(triton)  # nothing of earlier tests left in Triton's queue
    again = {"prompt": marked("a held greatsword"), **SMALL}
    with client(gateway) as c, ThreadPoolExecutor(1) as pool, Hold(triton) as hold:
        running = pool.submit(
            c.post, "/v1/images", json=again, headers={"Idempotency-Key": order_2}
        )
        wait_pending(triton, 2, "the first request with the key, behind the hold")
        assert_problem(
            c.post("/v1/images", json=again, headers={"Idempotency-Key": order_2}),
            409,
            "in progress",
        )
        hold.release()
        assert running.result().status_code == 200


def test_assets_have_etags_and_304_and_no_path_escapes(gateway: GatewayServer) -> None:
    with client(gateway) as c:
        url = c.post("/v1/images", json={"prompt": "a rune staff", **SMALL}).json()["asset_url"]
        first = c.get(url)
        etag = first.headers["ETag"]
        assert first.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        cached = c.get(url, headers={"If-None-Match": etag})
        assert cached.status_code == 304 and cached.content == b""
        for bad in ("..%2F..%2Fetc%2Fpasswd", "%2e%2e", "abc.png", "a" * 64 + ".exe"):
            assert c.get(f"/assets/{bad}").status_code == 404
        assert_problem(c.get(f"/assets/{'0' * 64}.png"), 404, "no asset")


def test_bad_input_gets_clear_errors(gateway: GatewayServer) -> None:
    with client(gateway) as c:
        assert_problem(c.post("/v1/images", json={"prompt": "x", "bogus": 1}), 422, "bogus")
        assert_problem(c.post("/v1/images", json={"prompt": "", **SMALL}), 422, "prompt")
        assert_problem(c.post("/v1/images", json={"prompt": "x", "steps": 0}), 422, "steps")
        # The model's size multiple (16 for the tiny model), from its contract.
        assert_problem(
            c.post("/v1/images", json={"prompt": "x", "width": 520, "steps": 1, "height": 64}),
            422,
            "width: Input should be a multiple of 16",
        )
        long_prompt = c.post("/v1/images", json={"prompt": "axe " * 80, **SMALL})
        assert_problem(long_prompt, 422, "82 tokens long")
        huge = c.post(
            "/v1/images",
            content=b'{"prompt": "' + b"x" * 1_100_000 + b'"}',
            headers={"content-type": "application/json"},
        )
        assert_problem(huge, 413)
        assert_problem(
            c.post(
                "/v1/images", content=b"{not json", headers={"content-type": "application/json"}
            ),
            422,
        )


def test_a_client_that_disconnects_cancels_its_triton_request(
    gateway: GatewayServer, triton: Triton, weights: Path
) -> None:
    """Order, not time (as in test_triton_model's cancellation test): the slow request runs in
    Triton when its client goes away; a quick request waits behind it, and is answered before
    a witness (the same work, 100 steps, started before the slow one) finishes. Were the slow
    request left running, its 150 steps would end after the witness's 100."""
    slow = {
        "prompt": "a cancelled claymore",
        "steps": 150,
        "width": 768,
        "height": 768,
        "scheduler": "euler",
    }
    witness = Witness(weights, GenerationRequest(**{**slow, "steps": 100}))
    cancelled = {"source": "sync", "outcome": "cancelled"}
    start = settle(triton)
    cancelled_before = gateway_metric(gateway, "forge_generation_seconds_count", **cancelled)
    payload = json.dumps(slow).encode()
    connection = socket.create_connection((gateway.host, gateway.port))
    try:
        with Hold(triton) as hold:
            connection.sendall(
                b"POST /v1/images HTTP/1.1\r\n"
                + f"Host: {gateway.host}:{gateway.port}\r\n".encode()
                + f"Authorization: Bearer {DEV_KEY}\r\n".encode()
                + b"Content-Type: application/json\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            wait_pending(triton, 2, "the slow request, behind the hold")
            witness.start()
            hold.release()
        wait_pending(triton, 0, "the slow request runs")
        with client(gateway) as c, ThreadPoolExecutor(1) as pool:
            quick = pool.submit(
                lambda: (
                    c.post("/v1/images", json={"prompt": marked("a quick knife"), **SMALL}),
                    witness.finished.is_set(),
                )
            )
            wait_pending(triton, 1, "the quick request waits for the slow one")
            connection.shutdown(socket.SHUT_RDWR)  # the client goes away
            connection.close()
            reply, witness_done = quick.result()
    finally:
        connection.close()
        witness.stop()
    traffic = settle(triton).since(start)
    print(f"quick answered while the witness was at step {witness.steps_started} of 100")
    assert reply.status_code == 200, reply.text
    assert witness_done is False, (
        "the witness finished its 100 steps before the quick request was answered: "
        "the abandoned request ran on instead of being cancelled"
    )
    # The gateway cancelled its call, and the slow request had reached the model (it and the
    # quick one each ran alone; the hold's batches are full ones).
    after = gateway_metric(gateway, "forge_generation_seconds_count", **cancelled)
    assert after == cancelled_before + 1
    assert traffic.batches.get(1) == 2


def test_health_readiness_and_metrics(gateway: GatewayServer) -> None:
    with client(gateway) as c:  # one generation, so that its histogram has samples
        assert c.post("/v1/images", json={"prompt": "a metered mace", **SMALL}).status_code == 200
    with client(gateway, key=None) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        checks = ready.json()["checks"]
        assert ready.status_code == 200 and {"triton", "redis", "broker"} <= set(checks)
        assert set(checks.values()) == {"ok"}, checks
        metrics = c.get("/metrics").text
    for name in (
        "forge_generation_seconds_bucket",
        "forge_cache_requests_total",
        "http_requests_total",
        "forge_rate_limited_total",
        'forge_dependency_up{dependency="redis"} 1.0',
        'forge_dependency_up{dependency="triton"} 1.0',
    ):
        assert name in metrics


def test_concurrent_identical_requests_store_one_asset(gateway: GatewayServer) -> None:
    body = {"prompt": "a twin blade", "seed": 4242, **SMALL}
    barrier = threading.Barrier(4)

    def post(_: int) -> str:
        with client(gateway) as c:
            barrier.wait()
            return str(c.post("/v1/images", json=body).json()["id"])

    with ThreadPoolExecutor(4) as pool:
        assert len(set(pool.map(post, range(4)))) == 1


def test_key_command_creates_and_revokes_keys(gateway: GatewayServer, redis_server) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    env = {**os.environ, "FORGE_REDIS_URL": redis_server.url}

    def cli(*args: str) -> str:
        run = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "keys", *args],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return run.stdout

    created = json.loads(
        cli("create", "--name", "studio-a", "--scopes", "generate", "--tier", "bulk")
    )
    assert created["key"].startswith("fk_") and created["tier"] == "bulk"
    body = {"prompt": "a cli sword", **SMALL}
    with client(gateway, key=created["key"]) as c:
        assert c.post("/v1/images", json=body).status_code == 200
        assert created["id"] in cli("list")
        assert cli("revoke", created["id"]).strip() == f"revoked {created['id']}"
        assert_problem(c.post("/v1/images", json=body), 401, "revoked")
