"""Image-to-image through the real gateway, Triton, Redis, broker and worker: uploads, input
images by key or multipart, refining an image the forge made, and bad files refused."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from launcher.gateway import GatewayServer
from tests.conftest import JobsStack
from tests.test_gateway import SMALL, assert_problem, client, marked
from tests.test_input_images import BAD_FILES, encoded, gradient
from tests.test_jobs import api, submit, wait_for

SKETCH = encoded(
    gradient(96, 64), "PNG"
)  # fitted by the size rule to 160x112 on the tiny model (size multiple 16)


def upload(c: httpx.Client, data: bytes, name: str = "sketch.png") -> httpx.Response:
    return c.post("/v1/uploads", files={"file": (name, data, "application/octet-stream")})


def uploaded(c: httpx.Client, data: bytes = SKETCH) -> dict[str, Any]:
    reply = upload(c, data)
    assert reply.status_code == 201, reply.text
    return dict(reply.json())


def pixels(c: httpx.Client, url: str) -> np.ndarray:
    reply = c.get(url)
    assert reply.status_code == 200
    return np.asarray(Image.open(io.BytesIO(reply.content)).convert("RGB"))


def test_an_upload_is_stored_once_fitted_and_charged(gateway: GatewayServer) -> None:
    with client(gateway) as c:
        first = upload(c, SKETCH)
        second = upload(c, SKETCH, name="another-name.png")
        assert first.status_code == second.status_code == 201, first.text
        body = first.json()
        assert second.json() == body  # stored once, by content
        assert first.headers["Location"] == body["asset_url"]
        assert (body["width"], body["height"]) == (160, 112)
        stored = c.get(body["asset_url"])
        assert stored.headers["content-type"] == "image/png"
        assert hashlib.sha256(stored.content).hexdigest() + ".png" == body["id"]
        # Each upload took one unit of the key's window.
        remaining = [int(r.headers["RateLimit-Remaining"]) for r in (first, second)]
        assert remaining[0] - remaining[1] == 1


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_get_a_clear_problem_and_the_gateway_keeps_serving(
    gateway: GatewayServer, name: str
) -> None:
    data, status, reason = BAD_FILES[name]
    with client(gateway) as c:
        assert_problem(upload(c, data, name="sketch.png"), status, reason)
        as_multipart = c.post(
            "/v1/images",
            data={"request": '{"prompt": "an axe", "steps": 2}'},
            files={"image": ("sketch.png", data, "image/png")},
        )
        assert_problem(as_multipart, status, reason)
        assert uploaded(c)["width"] == 160  # still serving


def test_image_to_image_by_key_and_by_multipart_make_the_same_image(
    gateway: GatewayServer,
) -> None:
    prompt = marked("a frost-forged axe, from a sketch")
    with client(gateway) as c:
        sketch = uploaded(c)
        request = {"prompt": prompt, "steps": 8, "seed": 11, "strength": 0.5}
        by_key = c.post("/v1/images", json=request | {"init_image": sketch["id"]})
        assert by_key.status_code == 200, by_key.text
        result = by_key.json()
        assert (result["width"], result["height"]) == (160, 112)
        assert (result["init_image"], result["strength"]) == (sketch["id"], 0.5)
        assert by_key.headers["X-Cache"] == "miss"
        multipart = c.post(
            "/v1/images",
            data={"request": json.dumps(request)},
            files={"image": ("sketch.png", SKETCH, "image/png")},
        )
        assert multipart.status_code == 200, multipart.text
        assert multipart.headers["X-Cache"] == "hit"  # the same image: the same cache key
        assert multipart.json()["id"] == result["id"]
        # Another strength, another image; the text-only request differs from both.
        other = c.post("/v1/images", json=request | {"init_image": sketch["id"], "strength": 0.9})
        text_only = c.post("/v1/images", json={"prompt": prompt, "seed": 11, **SMALL})
        assert len({result["id"], other.json()["id"], text_only.json()["id"]}) == 3


def test_the_default_strength_and_a_requested_size(gateway: GatewayServer) -> None:
    with client(gateway) as c:
        sketch = uploaded(c)
        reply = c.post(
            "/v1/images",
            json={"prompt": marked("a mace"), "steps": 4, "init_image": sketch["id"], "width": 128},
        )
        assert reply.status_code == 200, reply.text
        result = reply.json()
        assert result["strength"] == 0.75  # the model's default_strength
        # Width given, height from the sketch's aspect ratio (160:112), to a multiple of 16.
        assert (result["width"], result["height"]) == (128, 96)


def test_refine_an_image_the_forge_made(gateway: GatewayServer) -> None:
    with client(gateway) as c:
        weapon = {"weapon_type": "axe", "material": "iron", "element": "frost", "rarity": "rare"}
        first = c.post("/v1/weapons", json=weapon | {"steps": 4, "seed": 3})
        assert first.status_code == 200, first.text
        made = first.json()
        refined = c.post(
            "/v1/weapons",
            json=weapon | {"steps": 8, "seed": 3, "init_image": made["id"], "strength": 0.6},
        )
        assert refined.status_code == 200, refined.text
        result = refined.json()
        assert result["init_image"] == made["id"]
        assert (result["width"], result["height"]) == (made["width"], made["height"])
        before, after = pixels(c, made["asset_url"]), pixels(c, result["asset_url"])
        assert before.shape == after.shape and not np.array_equal(before, after)


def test_bad_image_to_image_requests_are_refused(gateway: GatewayServer) -> None:
    with client(gateway) as c:
        sketch = uploaded(c)
        missing = "0" * 64 + ".png"
        base = {"prompt": "an axe", "steps": 4}
        assert_problem(c.post("/v1/images", json=base | {"init_image": missing}), 422, "no image")
        assert_problem(
            c.post("/v1/images", json=base | {"init_image": sketch["id"], "strength": 1.5}),
            422,
            "strength",
        )
        assert_problem(c.post("/v1/images", json=base | {"strength": 0.5}), 422, "init_image")
        assert_problem(  # one step of 4 at strength 0.2: no step left, the model says
            c.post("/v1/images", json=base | {"init_image": sketch["id"], "strength": 0.2}),
            422,
            "strength",
        )
        assert_problem(
            c.post("/v1/images", json=base | {"init_image": "../../etc/passwd"}), 422, "pattern"
        )
        both = c.post(
            "/v1/images",
            data={"request": json.dumps({"prompt": "an axe", "init_image": sketch["id"]})},
            files={"image": ("sketch.png", SKETCH, "image/png")},
        )
        assert_problem(both, 422, "not both")
        no_image = c.post("/v1/images", data={"request": '{"prompt": "an axe"}'}, files={})
        assert no_image.status_code == 422


def test_a_job_starts_from_an_upload_and_a_missing_one_is_refused_at_submission(
    jobs_stack: JobsStack,
) -> None:
    jobs_stack.start_gateway()
    jobs_stack.start_worker()
    with api(jobs_stack) as c:
        sketch = uploaded(c)
        job_id = submit(
            c,
            [
                {"prompt": "a sword from a sketch", "steps": 4, "init_image": sketch["id"]},
                {"prompt": "a sword from words", **SMALL},
            ],
        )
        job = wait_for(c, job_id, {"succeeded", "failed"})
        assert job["status"] == "succeeded", job
        first, second = (item["result"] for item in job["items"])
        assert (first["init_image"], first["width"], first["height"]) == (sketch["id"], 160, 112)
        assert second["init_image"] is None
        refused = c.post(
            "/v1/jobs",
            json={
                "images": [
                    {"prompt": "a", **SMALL},
                    {"prompt": "b", "init_image": "1" * 64 + ".png"},
                ]
            },
        )
        assert_problem(refused, 422, "item 1: no image")
