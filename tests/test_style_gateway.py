"""Studio styles through the real gateway, Triton, Redis, broker and worker: the styles the
model serves listed (`GET /v1/styles`, the OpenAPI enum) from its listing model, a style
named on images, weapons and jobs, the weapon templates' default style, the cache keyed on
the style's content version, and the requests refused. A style published or removed while
everything runs is seen without a restart.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from export.styles import add_style, list_styles, remove_style
from export.tiny_lora import write_test_loras
from gateway.contract import BaseModelId, StyleInfo
from gateway.settings import Settings
from launcher.gateway import GatewayServer
from launcher.redis import RedisServer
from launcher.triton import Triton
from tests.conftest import JobsStack, gateway_env
from tests.polling import wait_until
from tests.test_gateway import SMALL, assert_problem, client, marked
from tests.test_input_images import contract
from tests.test_jobs import api, submit, wait_for
from tests.test_uploads import pixels

TEMPLATES: Path = Settings.model_fields["weapon_templates"].default
REFRESH = {"FORGE_CONTRACT_REFRESH_S": "0.5"}  # styles are read again this often
WEAPON = {"weapon_type": "axe", "material": "obsidian", "seed": 7, **SMALL}


@pytest.fixture(scope="module")
def loras(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model, safety_checker=None, requires_safety_checker=False
    )
    folder = tmp_path_factory.mktemp("gateway-loras")
    files = write_test_loras(pipe, folder / "ember", seed=21)
    files["retrained"] = write_test_loras(pipe, folder / "retrained", seed=22)["peft"]
    return files


@pytest.fixture
def styles(repository: Path, loras: dict[str, Path]) -> Iterator[Path]:
    """`ember` (kohya) and `frost` (PEFT) published in the shared Triton's repository; every
    style removed afterwards."""
    add_style(repository, "ember", loras["kohya"])
    add_style(repository, "frost", loras["peft"])
    try:
        yield repository
    finally:
        for style in list_styles(repository):
            remove_style(repository, style["name"])


@pytest.fixture
def styled_gateway(
    triton: Triton, redis_server: RedisServer, styles: Path, tmp_path: Path
) -> Iterator[GatewayServer]:
    """A gateway reading the styles often, with weapon templates whose default style is
    `ember`."""
    templates = yaml.safe_load(TEMPLATES.read_text()) | {"default_style": "ember"}
    (tmp_path / "templates.yaml").write_text(yaml.safe_dump(templates))
    env = gateway_env(
        triton,
        redis_server,
        tmp_path / "assets",
        FORGE_WEAPON_TEMPLATES=str(tmp_path / "templates.yaml"),
        **REFRESH,
    )
    server = GatewayServer(tmp_path, env).start()
    try:
        listed(server, {"ember", "frost"})
        yield server
    finally:
        server.stop()


def listed(gateway: GatewayServer, names: set[str]) -> dict[str, Any]:
    """GET /v1/styles once it lists exactly `names`."""

    def read() -> dict[str, Any] | None:
        with client(gateway) as c:
            body = dict(c.get("/v1/styles").json())
        return body if {s["name"] for s in body["styles"]} == names else None

    return dict(wait_until(f"the gateway lists the styles {sorted(names)}", read))


def forged(c: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = c.post(path, json=body)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def test_the_styles_served_are_listed_with_their_manifests_and_in_the_schema(
    styled_gateway: GatewayServer, styles: Path
) -> None:
    body = listed(styled_gateway, {"ember", "frost"})
    published = {s["name"]: s for s in list_styles(styles)}
    for style in body["styles"]:
        manifest = published[style["name"]]
        for field in ("version", "rank", "source_format", "modules", "base_model"):
            assert style[field] == manifest[field], field
    assert {s["source_format"] for s in body["styles"]} == {"kohya", "peft"}
    assert body["style_weight"] == {"min": 0.0, "max": 2.0, "default": 1.0}  # the config's
    with client(styled_gateway) as c:
        schemas = c.get("/openapi.json").json()["components"]["schemas"]
        templates = c.get("/v1/weapons/templates").json()
    for name in ("ImageRequest", "WeaponRequest"):
        style = schemas[name]["properties"]["style"]
        assert [v for s in style["anyOf"] for v in s.get("enum", [])] == ["ember", "frost"]
        weight = schemas[name]["properties"]["style_weight"]["anyOf"][0]
        assert (weight["minimum"], weight["maximum"]) == (0.0, 2.0)
        assert schemas[name]["dependentRequired"]["style_weight"] == ["style"]
    assert schemas["ImageRequest"]["properties"]["style"]["default"] is None
    assert schemas["WeaponRequest"]["properties"]["style"]["default"] == "ember"
    assert templates["default_style"] == "ember"


def test_a_style_reaches_the_model_and_is_in_the_result(styled_gateway: GatewayServer) -> None:
    base = {"prompt": marked("a frost-forged legendary axe"), "seed": 11, **SMALL}
    with client(styled_gateway) as c:
        plain = forged(c, "/v1/images", base)
        styled = forged(c, "/v1/images", {**base, "style": "ember", "style_weight": 1.5})
        weightless = forged(c, "/v1/images", {**base, "style": "ember", "style_weight": 0})
        default = forged(c, "/v1/images", {**base, "style": "frost"})
        version = {s["name"]: s["version"] for s in c.get("/v1/styles").json()["styles"]}
        assert plain["style"] is None and plain["style_version"] is None
        assert (styled["style"], styled["style_weight"]) == ("ember", 1.5)
        assert styled["style_version"] == version["ember"]
        assert default["style_weight"] == 1.0  # the contract's default
        unstyled = pixels(c, plain["asset_url"])
        assert not np.array_equal(pixels(c, styled["asset_url"]), unstyled)
        assert not np.array_equal(pixels(c, default["asset_url"]), unstyled)
        np.testing.assert_array_equal(pixels(c, weightless["asset_url"]), unstyled)  # weight 0


def test_weapons_take_the_templates_default_style_unless_they_name_one(
    styled_gateway: GatewayServer,
) -> None:
    with client(styled_gateway) as c:
        default = forged(c, "/v1/weapons", {**WEAPON, "text": marked("chipped")})
        other = forged(c, "/v1/weapons", {**WEAPON, "text": marked("chipped"), "style": "frost"})
        # An explicit null is no style: the default's too, and a weight sent with it is moot.
        none = forged(
            c,
            "/v1/weapons",
            {**WEAPON, "text": marked("chipped"), "style": None, "style_weight": 0.5},
        )
    assert (default["style"], other["style"], none["style"]) == ("ember", "frost", None)
    assert none["style_weight"] is None and none["style_version"] is None


def test_the_cache_follows_the_styles_content_version(
    styled_gateway: GatewayServer, styles: Path, loras: dict[str, Path]
) -> None:
    body = {"prompt": marked("an ember-forged spear"), "seed": 5, "style": "ember", **SMALL}
    order = {"Idempotency-Key": marked("order").replace(" ", "-")}
    with client(styled_gateway) as c:
        first = forged(c, "/v1/images", body)
        again = forged(c, "/v1/images", body)
        assert again["cached"] and again["id"] == first["id"]
        assert c.post("/v1/images", json=body, headers=order).status_code == 200
        old = first["style_version"]
        add_style(styles, "ember", loras["retrained"])  # new weights, same name
        wait_until(
            "the gateway sees ember's new version",
            lambda: (
                {s["name"]: s["version"] for s in c.get("/v1/styles").json()["styles"]}["ember"]
                != old
            ),
        )
        retrained = forged(c, "/v1/images", body)
        replayed = c.post("/v1/images", json=body, headers=order)
    assert_problem(replayed, 422, "content version of a style")  # another request now
    assert not retrained["cached"] and retrained["style_version"] != old
    assert retrained["id"] != first["id"]


def test_bad_style_requests_are_refused_naming_what_is_served(
    styled_gateway: GatewayServer, styles: Path
) -> None:
    base = {"prompt": "an axe", **SMALL}
    with client(styled_gateway) as c:
        for body, detail in (
            ({**base, "style": "vapor"}, "unknown style 'vapor'; styles available: ember, frost"),
            ({**base, "style_weight": 0.5}, "style_weight applies to a style"),
            ({**base, "style": "ember", "style_weight": 2.5}, "less than or equal to 2"),
            ({**base, "style": "ember", "style_weight": -1}, "greater than or equal to 0"),
            ({**base, "style": 3}, "style"),
        ):
            assert_problem(c.post("/v1/images", json=body), 422, detail)
        remove_style(styles, "frost")
        listed(styled_gateway, {"ember"})
        assert_problem(
            c.post("/v1/images", json={**base, "style": "frost"}),
            422,
            "unknown style 'frost'; styles available: ember",
        )


def test_a_style_published_just_now_is_served_by_the_next_request(
    triton: Triton,
    redis_server: RedisServer,
    styles: Path,
    loras: dict[str, Path],
    tmp_path: Path,
) -> None:
    """A gateway that reads the contract only hourly: a request naming a style it does not
    list has the contract read again before it is refused, so a style published a moment
    ago is served at once (and a removed one is refused, by the model or the gateway)."""
    env = gateway_env(triton, redis_server, tmp_path / "assets", FORGE_CONTRACT_REFRESH_S="3600")
    server = GatewayServer(tmp_path, env).start()
    try:
        body = {"prompt": marked("a late-forged mace"), "seed": 9, "style": "late", **SMALL}
        with client(server) as c:
            assert [s["name"] for s in c.get("/v1/styles").json()["styles"]] == ["ember", "frost"]
            add_style(styles, "late", loras["retrained"])
            made = forged(c, "/v1/images", body)
            assert (made["style"], made["style_version"]) == (
                "late",
                next(s["version"] for s in list_styles(styles) if s["name"] == "late"),
            )
            remove_style(styles, "late")
            refused = c.post("/v1/images", json={**body, "seed": 10})
        assert_problem(refused, 422, "unknown style 'late'; styles available: ember, frost")
    finally:
        server.stop()


def test_a_style_imported_for_other_weights_is_refused_saying_why() -> None:
    """The listing holds every published style; only those imported for the weights the
    model serves may be named (a unit test of the contract's rule)."""
    old = StyleInfo(
        name="ember",
        version="0123456789ab",
        rank=4,
        alphas=(4.0,),
        source_format="peft",
        modules=8,
        base_model=BaseModelId(name="m", version="older"),
    )
    rules = contract(styles=(old,))
    assert rules.style("ember") is None and rules.servable_styles == ()
    assert rules.style_problem("ember") == (
        "style 'ember' was imported for m version older; this model serves m version v: "
        "import it again"
    )
    assert rules.style_problem("nope") == "unknown style 'nope'; styles available: none"


def test_jobs_carry_a_style_and_refuse_an_unknown_one(jobs_stack: JobsStack, styles: Path) -> None:
    jobs_stack.start_gateway(**REFRESH)
    jobs_stack.start_worker(**REFRESH)
    assert jobs_stack.gateway is not None
    listed(jobs_stack.gateway, {"ember", "frost"})
    with api(jobs_stack) as c:
        job_id = submit(
            c,
            [
                {"prompt": "a styled blade", "seed": 3, "style": "frost", **SMALL},
                {"prompt": "a plain blade", "seed": 3, **SMALL},
            ],
        )
        job = wait_for(c, job_id, {"succeeded", "failed"})
        refused = c.post(
            "/v1/jobs", json={"images": [{"prompt": "a blade", "style": "vapor", **SMALL}]}
        )
        weapons = c.post("/v1/weapons/jobs", json={"weapons": [WEAPON]})
    assert job["status"] == "succeeded", job
    styled, plain = (item["result"] for item in job["items"])
    assert (styled["style"], styled["style_weight"], plain["style"]) == ("frost", 1.0, None)
    assert_problem(refused, 422, "images.0.style")
    assert weapons.status_code == 202, weapons.text  # the default templates name no style
