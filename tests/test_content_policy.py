"""The content policy: its matching (table-driven evasions and look-alike words), and per-key
modes, refusals, audit lines, metrics and reloads through the real gateway."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.content_policy import ContentPolicy, PolicyFile
from launcher.gateway import GatewayServer
from launcher.redis import RedisServer
from launcher.triton import Triton
from tests.conftest import gateway_env
from tests.polling import wait_until
from tests.test_gateway import client, gateway_metric, marked

SHIPPED = Path(__file__).resolve().parents[1] / "gateway" / "content_policy.yaml"
ZW = "\u200b"  # zero-width space

# Each hides a term of the shipped policy (category in the second column).
EVASIONS = [
    ("nude", "sexual"),
    ("NUDE", "sexual"),
    ("NuDe", "sexual"),
    ("a Nude elf with a bow", "sexual"),
    ("nüde", "sexual"),
    ("núdé", "sexual"),
    ("nùdè", "sexual"),
    ("n\u0301ude", "sexual"),  # a combining accent
    ("nud\u0435", "sexual"),  # Cyrillic e
    ("\u0578ude", "sexual"),  # Armenian n
    ("n\u03c5de", "sexual"),  # Greek upsilon
    ("ｎｕｄｅ", "sexual"),  # fullwidth
    ("𝐧𝐮𝐝𝐞", "sexual"),  # mathematical bold
    ("ɴᴜᴅᴇ", "sexual"),  # small capitals
    ("n u d e", "sexual"),
    ("n  u   d e", "sexual"),
    ("n.u.d.e", "sexual"),
    ("n-u-d-e", "sexual"),
    ("n_u_d_e", "sexual"),
    ("n*u*d*e", "sexual"),
    ("nu.de", "sexual"),
    ("sword,nude", "sexual"),
    ("nude!", "sexual"),
    ("(nude)", "sexual"),
    ("nud3", "sexual"),
    ("n4ked", "sexual"),
    ("p0rn", "sexual"),
    ("P0RN blade", "sexual"),
    (f"nu{ZW}de", "sexual"),
    (f"n{ZW}u{ZW}d{ZW}e", "sexual"),
    ("nu\u00adde", "sexual"),  # soft hyphen
    ("\ufeffnude", "sexual"),  # byte-order mark
    ("nu\u200dde", "sexual"),  # zero-width joiner
    ("NSFW axe", "sexual"),
    ("$wastika shield", "hate_symbols"),
    ("sw4st1k4", "hate_symbols"),
    ("5WASTIKA", "hate_symbols"),
    ("swаstikа", "hate_symbols"),  # Cyrillic a twice
    ("s w a s t i k a", "hate_symbols"),
    ("self harm", "self_harm"),
    ("self-harm", "self_harm"),
    ("selfharm", "self_harm"),
    ("SELF  HARM", "self_harm"),
    ("5elf h4rm", "self_harm"),
    ("kill yourself", "self_harm"),
    ("k1ll y0urself", "self_harm"),
    ("fuck", "profanity"),
    ("f.u.c.k", "profanity"),
    ("fücк", "profanity"),  # accent, Cyrillic k
    ("a bastard dagger", "profanity"),
]

# Ordinary weapon prompts, some with words that contain a blocked term.
ALLOWED = [
    "assassin's dagger",
    "an assassin's blade of the Scunthorpe guard",
    "Scunthorpe",
    "a glass axe",
    "classic longsword",
    "a passage of embassy swords",
    "bastard sword with a bass-wood grip",
    "Dickens' cane sword",
    "a cockatrice-scale shield",
    "Essex longbow",
    "shitake-dyed leather quiver",
    "a frost-forged legendary axe",
    "titanium warhammer +5",
    "Sussex harpoon, 3 barbs",
    "therapist's staff",
    "grape-vine whip",
    "a spear of pure analysis",
    "kick ass flail",
    "hellfire greatsword",
    "sextant compass dagger",
]


@pytest.fixture(scope="module")
def shipped() -> ContentPolicy:
    return PolicyFile(SHIPPED).current()


@pytest.mark.parametrize(("text", "category"), EVASIONS)
def test_evasions_of_a_blocked_term_are_caught(
    shipped: ContentPolicy, text: str, category: str
) -> None:
    assert shipped.violations([text]) == [category]


@pytest.mark.parametrize("text", ALLOWED)
def test_ordinary_weapon_prompts_pass(shipped: ContentPolicy, text: str) -> None:
    assert shipped.violations([text]) == []


def test_enough_evasions_are_tried() -> None:
    assert len(EVASIONS) >= 40 and len({t for t, _ in EVASIONS}) == len(EVASIONS)


def test_a_broken_edit_keeps_the_policy_in_force(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    shutil.copy(SHIPPED, path)
    policy = PolicyFile(path)
    path.write_text("categories: [not, a, mapping]\n")
    assert policy.current().violations(["nude"]) == ["sexual"]  # the previous one stays
    path.write_text("categories:\n  colour:\n    - mauve\n")
    assert policy.current().violations(["a mauve axe", "nude"]) == ["colour"]


# --- through the gateway -----------------------------------------------------------------


@pytest.fixture
def policy_gateway(
    triton: Triton, redis_server: RedisServer, tmp_path: Path
) -> Iterator[tuple[GatewayServer, Path]]:
    """A gateway of its own with a copy of the shipped policy that the test may edit."""
    policy = tmp_path / "policy.yaml"
    shutil.copy(SHIPPED, policy)
    env = gateway_env(triton, redis_server, tmp_path / "assets", FORGE_CONTENT_POLICY=str(policy))
    server = GatewayServer(tmp_path, env).start()
    try:
        yield server, policy
    finally:
        server.stop()


def key_in_mode(gateway: GatewayServer, mode: str) -> str:
    with client(gateway) as c:
        reply = c.post("/v1/admin/keys", json={"name": f"policy-{mode}", "content_policy": mode})
    assert reply.status_code == 201 and reply.json()["content_policy"] == mode, reply.text
    return str(reply.json()["key"])


SMALL = {"steps": 2, "width": 64, "height": 64}


def refused(reply: httpx.Response, category: str, term: str) -> None:
    """A content-policy problem naming the category and never the matched term."""
    assert reply.status_code == 422, reply.text
    problem = reply.json()
    assert problem["type"] == "/problems/content-policy"
    assert category in problem["detail"] and problem["categories"] == [category]
    assert term not in reply.text.lower()


def audit_lines(gateway: GatewayServer) -> list[dict[str, Any]]:
    assert gateway.service is not None
    found = []
    for line in gateway.service.log_tail(400).splitlines():
        if "content_policy_refusal" in line:
            found.append(json.loads(line[line.index("{") :]))
    return found


def test_each_key_mode_through_the_gateway(policy_gateway: tuple[GatewayServer, Path]) -> None:
    gateway, _ = policy_gateway
    strict, review, off = (key_in_mode(gateway, m) for m in ("strict", "review", "off"))
    prompt = marked("a nüde paladin with a sword")
    refused_before = gateway_metric(
        gateway, "forge_content_policy_total", category="sexual", outcome="refused"
    )
    with client(gateway, strict) as c:
        refused(c.post("/v1/images", json={"prompt": prompt, **SMALL}), "sexual", "nüde")
        weapon = {"weapon_type": "sword", "material": "steel", "text": "n.u.d.e", **SMALL}
        refused(c.post("/v1/weapons", json=weapon), "sexual", "n.u.d.e")
        job = c.post(
            "/v1/jobs",
            json={"images": [{"prompt": "an axe", **SMALL}, {"prompt": "p0rn axe", **SMALL}]},
        )
        refused(job, "sexual", "p0rn")
        assert "item 1" in job.json()["detail"]
        refused(c.post("/v1/weapons/jobs", json={"weapons": [weapon]}), "sexual", "n.u.d.e")
        steered_away = {"prompt": marked("an axe"), "negative_prompt": "nudity, swastika"}
        assert c.post("/v1/images", json={**steered_away, **SMALL}).status_code == 200
        fine = c.post("/v1/images", json={"prompt": marked("an assassin's dagger"), **SMALL})
        assert fine.status_code == 200 and fine.json()["content_flags"] == []
        assert fine.json()["negative_prompt"].startswith("nsfw, nudity")  # the policy's
    with client(gateway, review) as c:
        flagged = c.post("/v1/images", json={"prompt": prompt, **SMALL})
        assert flagged.status_code == 200 and flagged.json()["content_flags"] == ["sexual"]
        assert flagged.json()["negative_prompt"].startswith("nsfw, nudity")
    with client(gateway, off) as c:
        unchecked = c.post("/v1/images", json={"prompt": prompt, **SMALL})
        assert unchecked.status_code == 200 and unchecked.json()["content_flags"] == []
        assert unchecked.json()["negative_prompt"] == ""
    after = gateway_metric(
        gateway, "forge_content_policy_total", category="sexual", outcome="refused"
    )
    assert after - refused_before == 4  # image, weapon, image job item, weapon job item
    assert (
        gateway_metric(gateway, "forge_content_policy_total", category="sexual", outcome="flagged")
        >= 1
    )

    lines = audit_lines(gateway)
    assert len(lines) == 4
    first = lines[0]
    assert first["route"] == "/v1/images" and first["category"] == "sexual"
    assert first["key_id"] == hashlib.sha256(strict.encode()).hexdigest()[:16]
    assert first["text_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()
    assert gateway.service is not None
    log = gateway.service.log_tail(400)
    assert "nüde" not in log and "p0rn" not in log


def test_an_edited_policy_applies_without_a_restart(
    policy_gateway: tuple[GatewayServer, Path],
) -> None:
    gateway, policy = policy_gateway
    strict = key_in_mode(gateway, "strict")
    body = {"prompt": marked("a mauve halberd"), **SMALL}
    with client(gateway, strict) as c:
        assert c.post("/v1/images", json=body).status_code == 200
        text = policy.read_text().replace("categories:\n", "categories:\n  colour:\n    - mauve\n")
        time.sleep(0.01)  # a new mtime even on coarse file systems
        policy.write_text(text)
        wait_until(
            "the edited policy refuses mauve",
            lambda: c.post("/v1/images", json=body).status_code == 422,
        )
        refused(c.post("/v1/images", json=body), "colour", "mauve")


# --- the model's safety check, through the gateway ----------------------------------------


@pytest.fixture(scope="module")
def flagging_gateway(
    repository: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayServer, Path]]:
    """A gateway on a Triton of its own whose safety check flags every image and hands it
    back unchanged (`safety_action=none`: the worst case for the gateway), and its asset
    folder."""
    from export.__main__ import main as export_main

    work = tmp_path_factory.mktemp("flagging-gateway")
    copy = work / "model_repository"
    shutil.copytree(repository, copy, symlinks=True)
    flag_all = ["--parameter=safety_action=none", "--parameter=safety_adjustment=3"]
    assert export_main(["config", "--repository", str(copy), *flag_all]) == 0
    triton = Triton(copy, work / "triton").start()
    try:
        triton.load_served()
        gateway = GatewayServer(work, gateway_env(triton, redis_server, work / "assets")).start()
        try:
            yield gateway, work / "assets"
        finally:
            gateway.stop()
    finally:
        triton.stop()


def stored(assets: Path) -> set[Path]:
    return set(assets.rglob("*.png")) if assets.exists() else set()


def test_strict_keys_get_no_flagged_image_stored_or_served(
    flagging_gateway: tuple[GatewayServer, Path],
) -> None:
    gateway, assets = flagging_gateway
    strict, review = (key_in_mode(gateway, m) for m in ("strict", "review"))
    body = {"prompt": marked("a moonlit glaive"), "seed": 77, **SMALL}
    before = stored(assets)
    with client(gateway, strict) as c:
        refused(c.post("/v1/images", json=body), "unsafe_image", "moonlit")
        with c.stream(
            "POST", "/v1/images", json=body, headers={"Accept": "text/event-stream"}
        ) as reply:
            events = reply.read().decode()
        assert (
            "event: error" in events and "unsafe_image" in events and "event: result" not in events
        )
    assert stored(assets) == before  # nothing kept of the refused originals
    with client(gateway, review) as c:
        served = c.post("/v1/images", json=body)
        assert served.status_code == 200 and served.json()["safety_flagged"] is True
    assert len(stored(assets) - before) == 1
    with client(gateway, strict) as c:  # the same image, cached now: still refused
        refused(c.post("/v1/images", json=body), "unsafe_image", "moonlit")
    lines = [line for line in audit_lines(gateway) if line["category"] == "unsafe_image"]
    assert len(lines) == 3 and {line["route"] for line in lines} == {"/v1/images"}
    assert (
        gateway_metric(
            gateway, "forge_content_policy_total", category="unsafe_image", outcome="flagged"
        )
        == 1
    )


def test_every_evasion_is_refused_to_a_strict_key_and_every_ordinary_prompt_served(
    policy_gateway: tuple[GatewayServer, Path],
) -> None:
    gateway, _ = policy_gateway
    strict = key_in_mode(gateway, "strict")
    with client(gateway, strict) as c:
        for text, category in EVASIONS:
            refused(c.post("/v1/images", json={"prompt": text, **SMALL}), category, text)
        for text in ALLOWED:
            reply = c.post("/v1/images", json={"prompt": marked(text), **SMALL})
            assert reply.status_code == 200 and reply.json()["content_flags"] == [], text
