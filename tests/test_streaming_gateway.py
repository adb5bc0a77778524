"""Server-sent events from the real gateway, read by a real streaming client (httpx)."""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
from PIL import Image

from gateway.triton_client import GeneratedImage
from launcher.gateway import GatewayServer
from launcher.triton import Triton
from tests.polling import wait_until
from tests.test_gateway import client, gateway_metric, marked
from tests.test_streaming_model import AXE, stream
from tests.triton_state import steps_done

EVENTS = {"Accept": "text/event-stream"}
SMALL = {"steps": 6, "width": 64, "height": 64, "scheduler": "euler"}


def read_sse(reply: httpx.Response) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(id, event, JSON data) per server-sent event, as they arrive; comments skipped."""
    event_id, event, data = "", "message", []
    for line in reply.iter_lines():
        if line == "":
            if data:
                yield event_id, event, json.loads("\n".join(data))
            event_id, event, data = "", "message", []
        elif line.startswith("id:"):
            event_id = line[len("id:") :].strip()
        elif line.startswith("event:"):
            event = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].strip())


def read_events(reply: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, JSON data) per server-sent event, as they arrive."""
    return ((event, data) for _, event, data in read_sse(reply))


def streamed(
    gateway: GatewayServer, body: dict[str, Any], *, path: str = "/v1/images", **kw: Any
) -> tuple[httpx.Response, list[tuple[str, dict[str, Any]]]]:
    headers = {**EVENTS, **kw.pop("headers", {})}
    with client(gateway) as c, c.stream("POST", path, json=body, headers=headers, **kw) as reply:
        assert reply.status_code == 200, reply.read()
        assert reply.headers["content-type"].startswith("text/event-stream")
        return reply, list(read_events(reply))


def test_a_streamed_image_sends_progress_and_previews_then_the_result(
    gateway: GatewayServer,
) -> None:
    body = {"prompt": marked("a rune-etched spear"), "seed": 11, **SMALL}
    reply, events = streamed(gateway, body, params={"preview_every": 2})
    names = [name for name, _ in events]
    assert names[-1] == "result" and "error" not in names
    # Progress at most every FORGE_STREAM_PROGRESS_INTERVAL_S, but always the first and
    # last steps and every preview, in order.
    steps = [data for name, data in events if name in ("progress", "preview")]
    total = steps[0]["total_steps"]
    done = [s["step"] for s in steps]
    assert done == sorted(set(done)) and done[0] == 1 and done[-1] == total >= SMALL["steps"]
    previews = [data for name, data in events if name == "preview"]
    assert [p["step"] for p in previews] == [s for s in range(1, total) if s % 2 == 0]
    for preview in previews:
        header, encoded = preview["image"].split(",", 1)
        assert header == "data:image/png;base64"
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert image.size == (preview["width"], preview["height"]) == (8, 8)
    result = events[-1][1]
    assert result["cached"] is False and result["seed"] == 11
    assert reply.headers["x-cache"] == "miss" and "ratelimit-remaining" in reply.headers
    with client(gateway) as c:
        asset = c.get(result["asset_url"])
        as_json = c.post("/v1/images", json=body)
    assert asset.status_code == 200 and asset.content.startswith(b"\x89PNG")
    # The JSON form of the same request is the same image (a cache hit now).
    assert as_json.status_code == 200
    assert as_json.json()["id"] == result["id"] and as_json.json()["cached"] is True


def test_a_cache_hit_streams_one_result_event(gateway: GatewayServer) -> None:
    body = {"prompt": marked("a gilded mace"), "seed": 5, **SMALL}
    with client(gateway) as c:
        made = c.post("/v1/images", json=body)
    assert made.status_code == 200
    reply, events = streamed(gateway, body, params={"preview_every": 1})
    assert [name for name, _ in events] == ["result"]
    assert events[0][1]["id"] == made.json()["id"] and events[0][1]["cached"] is True
    assert reply.headers["x-cache"] == "hit"


def test_an_idempotent_retry_of_a_stream_replays_its_result(gateway: GatewayServer) -> None:
    body = {"prompt": marked("a sunsteel dagger"), **SMALL}
    key = {"Idempotency-Key": str(uuid.uuid4())}
    _, first = streamed(gateway, body, headers=key)
    reply, again = streamed(gateway, body, headers=key)
    assert [name for name, _ in again] == ["result"]
    assert again[0][1]["id"] == first[-1][1]["id"]
    assert reply.headers["idempotent-replayed"] == "true"


def test_weapons_stream_too(gateway: GatewayServer) -> None:
    body = {
        "weapon_type": "axe",
        "material": "iron",
        "element": "frost",
        "rarity": "legendary",
        "text": marked("runes"),
        **SMALL,
    }
    _, events = streamed(gateway, body, path="/v1/weapons")
    assert events[0][0] == "progress" and events[-1][0] == "result"
    assert "battle axe" in events[-1][1]["prompt"]


def test_a_request_the_model_refuses_ends_with_an_error_event(gateway: GatewayServer) -> None:
    words = " ".join(f"word{i}" for i in range(90))  # over the text encoder's 77 tokens
    _, events = streamed(gateway, {"prompt": words, **SMALL})
    ((name, problem),) = events
    assert name == "error"
    assert problem["status"] == 422 and "tokens" in problem["detail"]
    assert problem["instance"] == "/v1/images"


def test_bad_input_is_refused_before_the_stream(gateway: GatewayServer) -> None:
    with client(gateway) as c:
        bad_size = c.post("/v1/images", json={"prompt": "x", "width": 72}, headers=EVENTS)
        bad_every = c.post(
            "/v1/images", json={"prompt": "x"}, headers=EVENTS, params={"preview_every": -1}
        )
    assert bad_size.status_code == bad_every.status_code == 422
    assert bad_size.headers["content-type"] == "application/problem+json"


def test_a_client_that_disconnects_stops_the_models_work(
    gateway: GatewayServer, triton: Triton
) -> None:
    """What happened, not how fast: the model ran fewer of the request's 150 steps than it
    would have, and the gateway counted a cancelled stream."""
    slow = {"prompt": marked("an abandoned halberd"), "steps": 150, "width": 768, "height": 768}
    cancelled_before = gateway_metric(gateway, "forge_streams_cancelled_total")
    before = steps_done(triton)
    with client(gateway) as c, c.stream("POST", "/v1/images", json=slow, headers=EVENTS) as reply:
        first = next(read_events(reply))
    assert first[0] == "progress" and first[1]["total_steps"] >= 150
    wait_until(
        "the gateway to count the cancelled stream",
        lambda: gateway_metric(gateway, "forge_streams_cancelled_total") > cancelled_before,
    )
    # One model instance: this request runs once the abandoned one has stopped.
    *progress, final = stream(triton, AXE, 0)
    assert isinstance(final, GeneratedImage)
    ran = steps_done(triton) - before - len(progress)
    assert 1 <= ran < 150, f"the abandoned request ran {ran} of its 150 steps"
