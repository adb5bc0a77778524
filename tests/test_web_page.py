"""The forge page at `/` in a real headless Chromium, against the live local stack.

Triton (tiny model), Redis, the Kafka-protocol broker, a gateway and a worker run as real
processes; Playwright drives Debian's `/usr/bin/chromium`. Screenshots are kept as test
artifacts under `$FORGE_TEST_ARTIFACTS/web` (default `var/test-artifacts/web`).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from export.styles import remove_style
from gateway.settings import Settings
from gateway.weapons import WeaponTemplates
from launcher.gateway import GatewayServer
from launcher.kafka import KafkaBroker
from launcher.process import free_port
from launcher.redis import RedisServer
from launcher.triton import Triton
from tests import test_style_gateway
from tests.conftest import DEV_KEY, NARROW_CONTRACT, ROOT, JobsStack, gateway_env
from tests.polling import wait_until
from tests.test_gateway import gateway_metric
from tests.test_style_gateway import listed

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        "Debian's chromium is not installed (/usr/bin/chromium); `make install` installs it",
        allow_module_level=True,
    )

from playwright.sync_api import (  # noqa: E402
    Browser,
    Page,
    Request,
    Response,
    Route,
    expect,
    sync_playwright,
)

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(os.environ.get("FORGE_TEST_ARTIFACTS", ROOT / "var" / "test-artifacts")) / "web"
# In cost units (one step at 512x512): a 4-step 64x64 image costs 1, so the page's own
# requests pass, and one 150-step 1024x1024 request (600 units) is refused with 429. A short
# window keeps the Retry-After countdown short.
RATE_LIMIT = "200 per 12 seconds"
FAST = {"steps": "4", "size": "64x64"}
AUTH = {"Authorization": f"Bearer {DEV_KEY}"}
# The style tests' fixtures, found by pytest under these names: `ember` and `frost` published
# in the shared Triton's repository, and a gateway serving them (weapons default to ember).
loras = test_style_gateway.loras
styles = test_style_gateway.styles
styled_gateway = test_style_gateway.styled_gateway
TEMPLATES: Path = Settings.model_fields["weapon_templates"].default


@pytest.fixture(scope="module")
def stack(
    triton: Triton,
    redis_server: RedisServer,
    broker: KafkaBroker,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[JobsStack]:
    """A gateway with a small rate limit and one worker, on topics of their own."""
    workdir = tmp_path_factory.mktemp("web-stack")
    stack = JobsStack(triton, redis_server, broker, workdir, f"w{uuid.uuid4().hex[:8]}.")
    try:
        stack.start_gateway(FORGE_RATE_LIMIT=RATE_LIMIT)
        stack.start_worker()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser context (empty local storage) per test; page errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield page
    finally:
        shot(page, f"{request.node.name}-last")
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page: Page, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.evaluate("window.scrollTo(0, 0)")  # the builder is sticky: show it at the top
    page.screenshot(path=str(path), full_page=True)
    return path


def gateway_url(stack: JobsStack) -> str:
    assert stack.gateway is not None
    return stack.gateway.url


def open_forge(page: Page, url: str, key: str = DEV_KEY) -> None:
    page.goto(url)
    key_input = page.get_by_label("API key", exact=True)
    expect(key_input).to_be_focused()
    key_input.fill(key)
    key_input.press("Enter")
    expect(page.locator("#workspace")).to_be_visible()


def choose(page: Page, **values: str) -> None:
    """Weapon choices by their label, image settings by field name (steps, size, seed...)."""
    advanced = page.locator("#advanced")
    if advanced.get_attribute("open") is None:
        page.get_by_text("Image settings").click()
    for name, value in values.items():
        field = page.locator(f"#f-{name}")
        if field.evaluate("e => e.tagName") == "SELECT":
            field.select_option(value)
        else:
            field.fill(value)


def cards(page: Page) -> Any:
    """The gallery's image cards (a running job's cards are not, until their image is in)."""
    return page.locator("#gallery > li[data-asset-id]")


def job_cards(page: Page, job_id: str, **attributes: str) -> Any:
    """A job's cards that are still the job's (an item's image card replaces its job card)."""
    selector = "".join(f'[data-{k}="{v}"]' for k, v in attributes.items())
    return page.locator(f'#gallery > li[data-job-id="{job_id}"]{selector}')


def step(card: Any) -> int:
    """The step a job card's progress bar stands at."""
    return int(card.locator("progress").evaluate("b => b.value"))


def job_id_of(response: Response) -> str:
    """The id of the job a submission's response made."""
    return str(response.json()["id"])


def card_info(page: Page, nth: int = 0) -> dict[str, Any]:
    """The nth card from the top (newest first): asset id, seed, image size as loaded."""
    card = cards(page).nth(nth)
    img = card.locator("img")
    expect(img).to_have_js_property("complete", True)
    return {
        "id": card.get_attribute("data-asset-id"),
        "seed": int(card.get_attribute("data-seed") or -1),
        "natural_width": img.evaluate("i => i.naturalWidth"),
        "src": img.get_attribute("src"),
        "prompt": card.locator(".prompt").text_content(),
    }


def posts(requests: list[Request], path: str, accept: str = "") -> list[dict[str, Any]]:
    """The bodies POSTed to `path` (any query), those that accepted `accept` if given."""
    return [
        json.loads(r.post_data or "{}")
        for r in requests
        if r.method == "POST"
        and urlsplit(r.url).path == path
        and accept in r.headers.get("accept", "")
    ]


def test_page_is_served_outside_the_api_schema(stack: JobsStack) -> None:
    url = gateway_url(stack)
    with httpx.Client(base_url=url) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        again = c.get("/", headers={"If-None-Match": page.headers["etag"]})
        assert again.status_code == 304
        for name in ("app.js", "app.css"):
            assert c.get(f"/static/{name}").status_code == 200
        assert c.get("/static/..%2Fweb.py").status_code == 404
        assert c.get("/static/nothing.js").headers["content-type"] == "application/problem+json"
        paths = c.get("/openapi.json").json()["paths"]
        assert "/" not in paths and not any(p.startswith("/static") for p in paths)
        assert "get" in paths["/v1/weapons/templates"]
        assert c.get("/v1/weapons/templates").status_code == 401
        templates = c.get(
            "/v1/weapons/templates", headers={"Authorization": f"Bearer {DEV_KEY}"}
        ).json()
    loaded = WeaponTemplates.load(TEMPLATES)
    assert templates["fields"] == loaded.fields and templates["prompt"] == loaded.prompt


def test_a_bad_key_is_refused_then_the_builder_follows_the_schema(
    stack: JobsStack, page: Page
) -> None:
    url = gateway_url(stack)
    open_forge_bad = page.goto(url)
    assert open_forge_bad is not None and open_forge_bad.ok
    page.get_by_label("API key", exact=True).fill("fk_not_a_key")
    page.get_by_role("button", name="Use this key").click()
    error = page.locator("#key-error")
    expect(error).to_contain_text("The API key was refused")
    expect(error).to_contain_text("unknown or revoked")
    expect(page.get_by_label("API key", exact=True)).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#workspace")).to_be_hidden()
    shot(page, "01-bad-key")

    page.get_by_label("API key", exact=True).fill(DEV_KEY)
    page.get_by_role("button", name="Use this key").click()
    expect(page.locator("#workspace")).to_be_visible()
    expect(page.locator("#key-hint")).to_have_text("…_key")
    assert page.evaluate("localStorage.getItem('forge.apiKey')") == DEV_KEY

    # The choices are the enums of the OpenAPI document (the studio's template file).
    schema = httpx.get(f"{url}/openapi.json").json()["components"]["schemas"]["WeaponRequest"]
    for name in ("weapon_type", "material", "element", "rarity", "look"):
        options = page.locator(f"#f-{name} option").evaluate_all("os => os.map(o => o.value)")
        assert options == schema["properties"][name]["enum"], name
        expect(page.locator(f"#f-{name}")).to_have_accessible_name(
            re.compile(name.replace("_", " "), re.I)
        )

    # The preview is what the server's templates render, choice by choice.
    templates = WeaponTemplates.load(TEMPLATES)
    weapon = {
        "weapon_type": "axe",
        "material": "obsidian",
        "element": "frost",
        "rarity": "legendary",
        "look": "pixel",
    }
    choose(page, **weapon, text="  chipped   blade ")
    expected, _ = templates.render(SimpleNamespace(**weapon, text="  chipped   blade "))
    expect(page.locator("#f-prompt")).to_have_value(expected)
    expect(page.locator("#prompt-mode")).to_have_text("from the studio template")

    # Every control has a label; the page does not scroll sideways on a phone.
    unlabeled = page.evaluate(
        "[...document.querySelectorAll('input, select, textarea')]"
        ".filter(e => !e.labels || !e.labels.length).map(e => e.id)"
    )
    assert unlabeled == []
    expect(page.locator("#style-section")).to_be_hidden()  # this model serves no style
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shot(page, "02-builder-phone")

    page.get_by_role("button", name="Forget key").click()
    expect(page.locator("#key-panel")).to_be_visible()
    expect(page.locator("#workspace")).to_be_hidden()
    assert page.evaluate("localStorage.getItem('forge.apiKey')") is None


def test_the_builder_offers_what_the_models_contract_allows(
    narrow_gateway: GatewayServer, page: Page
) -> None:
    """The narrow contract (conftest.NARROW_CONTRACT): the page follows it, no code changed."""
    open_forge(page, narrow_gateway.url)
    values = "os => os.map(o => o.value)"
    schedulers = page.locator("#f-scheduler option").evaluate_all(values)
    assert schedulers == NARROW_CONTRACT["schedulers"].split(",")
    expect(page.locator("#f-scheduler")).to_have_value(NARROW_CONTRACT["default_scheduler"])
    # The tiny model: default 128 x 128, multiples of 16; this contract stops at 256.
    assert page.locator("#f-size option").evaluate_all(values) == ["", "64x64", "256x256"]
    expect(page.locator("#f-size option").first).to_have_text("Model default (128 × 128)")
    expect(page.locator("#f-steps")).to_have_attribute("max", NARROW_CONTRACT["max_steps"])


def test_forge_streams_then_same_seed_then_variations_as_an_async_job(
    stack: JobsStack, page: Page
) -> None:
    url = gateway_url(stack)
    requests: list[Request] = []
    page.on("request", lambda r: requests.append(r))
    open_forge(page, url)
    choose(page, weapon_type="sword", material="crystal", element="lightning", **FAST)
    page.get_by_role("button", name="Forge", exact=True).click()
    expect(cards(page)).to_have_count(1, timeout=60_000)
    expect(page.locator("#status")).to_have_text("Forge: done, 1 image added to the gallery.")
    first = card_info(page)
    assert first["natural_width"] == 64, "the image did not load"
    assert first["src"] == f"/assets/{first['id']}"
    expect(page.locator("#tiny-note")).to_be_visible()
    shot(page, "03-forged")

    # One image is streamed (server-sent events), with previews asked for.
    (streamed,) = posts(requests, "/v1/weapons", accept="text/event-stream")
    assert streamed["weapon_type"] == "sword" and "seed" not in streamed
    assert "preview_every=" in next(r.url for r in requests if r.method == "POST")
    expect(page.locator("#progress")).to_be_hidden()  # gone once the image is in

    # The download link saves the very asset.
    download = cards(page).nth(0).locator("a.download")
    expect(download).to_have_attribute("download", f"forge-{first['seed']}.png")
    with page.expect_download() as info:
        download.click()
    saved = Path(info.value.path()).read_bytes()
    assert saved == httpx.get(f"{url}/assets/{first['id']}").content

    # Again with this seed: same parameters and seed, the same image (same content key).
    cards(page).nth(0).get_by_role("button", name=re.compile("^Again with seed")).click()
    expect(cards(page)).to_have_count(2, timeout=60_000)
    again = card_info(page)
    assert again["seed"] == first["seed"] and again["id"] == first["id"]
    expect(cards(page).nth(0).locator(".same")).to_contain_text("Identical to image 1")
    sent = posts(requests, "/v1/weapons")[-1]
    assert sent["seed"] == first["seed"]  # exact, beyond 2**53

    # Variations: the next three seeds, as one async job (followed at the Location it gave);
    # three different images.
    cards(page).nth(0).get_by_role("button", name=re.compile("^Variations")).click()
    expect(cards(page)).to_have_count(5, timeout=90_000)
    (job,) = posts(requests, "/v1/weapons/jobs")
    batch = job["weapons"]
    assert [w["seed"] for w in batch] == [first["seed"] + d for d in (1, 2, 3)]
    assert any(r.method == "GET" and "/v1/jobs/" in r.url for r in requests)
    varied = [card_info(page, i) for i in range(3)]
    assert sorted(v["seed"] for v in varied) == [first["seed"] + d for d in (1, 2, 3)]
    assert len({v["id"] for v in varied} | {first["id"]}) == 4
    expect(page.locator("#gallery-count")).to_have_text("5 images")
    shot(page, "04-gallery")


def test_a_forge_shows_its_progress_and_preview_and_can_be_cancelled(
    stack: JobsStack, page: Page
) -> None:
    url = gateway_url(stack)
    open_forge(page, url)
    choose(page, weapon_type="axe", material="iron", element="frost", steps="150", size="256x256")
    assert stack.gateway is not None
    cancelled_before = gateway_metric(stack.gateway, "forge_streams_cancelled_total")
    page.get_by_role("button", name="Forge", exact=True).click()
    bar = page.locator("#progress-bar")
    expect(page.locator("#progress")).to_be_visible()
    expect(bar).to_have_attribute("max", re.compile(r"^1[5-9]\d$"))
    # The bar advances, and a preview (every second step) is shown.
    expect(page.locator("#preview")).to_be_visible(timeout=60_000)
    expect(page.locator("#preview")).to_have_js_property("complete", True)
    assert page.locator("#preview").evaluate("i => i.naturalWidth") == 256 // 8
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Step ([3-9]|\d\d+) of"))
    shot(page, "05-forging")
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#status")).to_have_text("Forge: cancelled.")
    expect(page.locator("#progress")).to_be_hidden()
    expect(cards(page)).to_have_count(0)
    expect(page.get_by_role("button", name="Forge", exact=True)).to_be_enabled()
    # The gateway saw the stream close and stopped the generation.
    wait_until(
        "the gateway to count the cancelled stream",
        lambda: gateway_metric(stack.gateway, "forge_streams_cancelled_total") > cancelled_before,
    )


def test_a_jobs_cards_show_each_images_progress_and_preview_and_the_job_can_be_cancelled(
    jobs_stack: JobsStack, page: Page
) -> None:
    """Variations are a job the page follows through its event stream: a card per image, with
    its step and its latest preview while the worker makes it. Cancel cancels the job; the
    images made stay. The one worker makes one image at a time, so images are still queued
    when Cancel is pressed."""
    jobs_stack.start_gateway()
    jobs_stack.start_worker(FORGE_WORKER_CONCURRENCY="1")
    url = gateway_url(jobs_stack)
    requests: list[Request] = []
    page.on("request", lambda r: requests.append(r))
    open_forge(page, url)
    choose(page, weapon_type="hammer", material="bronze", steps="150", size="256x256")
    page.get_by_role("button", name="Forge", exact=True).click()
    expect(cards(page)).to_have_count(1, timeout=120_000)
    with page.expect_response(lambda r: urlsplit(r.url).path == "/v1/weapons/jobs") as submitted:
        cards(page).nth(0).get_by_role("button", name=re.compile("^Variations")).click()
    job_id = job_id_of(submitted.value)
    expect(job_cards(page, job_id)).to_have_count(3)
    status = page.locator("#status")
    expect(status).to_have_text(re.compile(r"^Variations of image 1: [0-2] of 3 done…$"))

    # The running image's card: its bar advances, step by step, and a preview comes.
    running = job_cards(page, job_id, status="running")
    expect(running).to_have_count(1, timeout=60_000)
    card = job_cards(page, job_id, index=running.get_attribute("data-index") or "")
    expect(card.locator("progress")).to_have_attribute("max", "150")
    expect(card.locator(".step")).to_have_text(re.compile(r"^Step [1-9]\d* of 150$"))
    first = step(card)
    wait_until(f"the bar to pass step {first}", lambda: step(card) > first)
    preview = card.locator("img.job-preview")
    expect(preview).to_be_visible(timeout=60_000)
    expect(preview).to_have_js_property("complete", True)
    assert (preview.get_attribute("src") or "").startswith("data:image/png")
    assert preview.evaluate("i => i.naturalWidth") > 0
    assert step(card) > first
    shot(page, "09-job-running")

    with page.expect_response(lambda r: r.request.method == "DELETE") as deleted:
        page.get_by_role("button", name="Cancel").click()
    assert deleted.value.status == 200 and urlsplit(deleted.value.url).path == f"/v1/jobs/{job_id}"
    expect(status).to_have_text(
        re.compile(r"^Variations of image 1: cancelled, [0-2] of 3 images made\.$")
    )
    expect(page.get_by_role("button", name="Cancel")).to_be_hidden()
    expect(page.get_by_role("button", name="Forge", exact=True)).to_be_enabled()

    # The gateway and the page agree: cancelled images say so, made ones are image cards.
    job = httpx.get(f"{url}/v1/jobs/{job_id}", headers=AUTH).json()
    assert job["status"] == "cancelled"
    cancelled = [i["index"] for i in job["items"] if i["status"] == "cancelled"]
    made = [i["result"]["id"] for i in job["items"] if i["status"] == "succeeded"]
    assert cancelled and len(cancelled) + len(made) == 3, job["items"]
    said = job_cards(page, job_id, status="cancelled")
    expect(said.locator(".state")).to_have_text(["Cancelled"] * len(cancelled))
    assert sorted(said.evaluate_all("cs => cs.map(c => Number(c.dataset.index))")) == cancelled
    expect(cards(page)).to_have_count(1 + len(made))
    assert sorted(card_info(page, i)["id"] for i in range(len(made))) == sorted(made)
    # Followed through its event stream alone: the page never polled the job.
    paths = [(r.method, urlsplit(r.url).path) for r in requests]
    assert ("GET", f"/v1/jobs/{job_id}/events") in paths
    assert ("GET", f"/v1/jobs/{job_id}") not in paths
    shot(page, "10-job-cancelled")


def test_a_dropped_job_stream_is_resumed_and_a_gateway_without_one_is_polled(
    stack: JobsStack, page: Page
) -> None:
    url = gateway_url(stack)
    requests: list[Request] = []
    page.on("request", lambda r: requests.append(r))
    open_forge(page, url)
    choose(page, weapon_type="spear", material="bone", **FAST)
    page.get_by_role("button", name="Forge", exact=True).click()
    expect(cards(page)).to_have_count(1, timeout=60_000)

    # The first event stream ends after its first event (that much of the real stream);
    # the page opens it again, asking for the events after that one.
    cut: list[str] = []

    def cut_first_stream(route: Route) -> None:
        if cut:
            route.continue_()
            return
        block = first_event(url + urlsplit(route.request.url).path)
        cut.append(re.findall(r"^id: *(.+)$", block, re.M)[0])
        route.fulfill(status=200, content_type="text/event-stream", body=block)

    page.route("**/v1/jobs/*/events", cut_first_stream)
    with page.expect_response(lambda r: urlsplit(r.url).path == "/v1/weapons/jobs") as submitted:
        cards(page).nth(0).get_by_role("button", name=re.compile("^Variations")).click()
    job_id = job_id_of(submitted.value)
    expect(page.locator("#status")).to_have_text(
        "Variations of image 1: done, 3 images added to the gallery.", timeout=90_000
    )
    expect(cards(page)).to_have_count(4)
    expect(job_cards(page, job_id)).to_have_count(0)
    streams = [r for r in requests if urlsplit(r.url).path == f"/v1/jobs/{job_id}/events"]
    assert len(streams) >= 2 and "last-event-id" not in streams[0].headers
    assert streams[1].headers["last-event-id"] == cut[0]

    # A gateway without job event streams (404): the page polls the job instead.
    page.unroute("**/v1/jobs/*/events")
    page.route(
        "**/v1/jobs/*/events",
        lambda route: route.fulfill(
            status=404,
            content_type="application/problem+json",
            body=json.dumps({"title": "Not Found", "status": 404}),
        ),
    )
    with page.expect_response(lambda r: urlsplit(r.url).path == "/v1/weapons/jobs") as submitted:
        cards(page).nth(0).get_by_role("button", name=re.compile("^Variations")).click()
    job_id = job_id_of(submitted.value)
    expect(page.locator("#status")).to_have_text(
        re.compile(r"^Variations of image \d: done, 3 images added"), timeout=90_000
    )
    expect(cards(page)).to_have_count(7)
    assert any(r.method == "GET" and urlsplit(r.url).path == f"/v1/jobs/{job_id}" for r in requests)


def first_event(events_url: str) -> str:
    """The first event of a job's stream that has an id, read from the gateway itself."""
    lines: list[str] = []
    with httpx.stream("GET", events_url, headers=AUTH, timeout=60) as res:
        res.raise_for_status()
        for line in res.iter_lines():
            if line:
                lines.append(line)
            elif any(kept.startswith("id:") for kept in lines):
                return "\n".join(lines) + "\n\n"
            else:
                lines = []
    raise AssertionError(f"{events_url} ended before an event with an id")


def test_an_edited_prompt_is_drawn_as_written(stack: JobsStack, page: Page) -> None:
    requests: list[Request] = []
    page.on("request", lambda r: requests.append(r))
    open_forge(page, gateway_url(stack))
    choose(page, **FAST)
    prompt = page.get_by_label("Prompt", exact=True)
    prompt.fill("a rune-etched bronze trident, game item icon")
    expect(page.locator("#prompt-mode")).to_have_text("edited: drawn as written")
    page.get_by_role("button", name="Forge", exact=True).click()
    expect(cards(page)).to_have_count(1, timeout=60_000)
    assert card_info(page)["prompt"] == "a rune-etched bronze trident, game item icon"
    (sent,) = posts(requests, "/v1/images")
    assert sent["prompt"] == "a rune-etched bronze trident, game item icon"
    assert sent["negative_prompt"]  # the studio's negative prompt goes along
    page.get_by_role("button", name="Back to the template").click()
    expect(page.locator("#prompt-mode")).to_have_text("from the studio template")


def test_an_invalid_field_is_shown_beside_it(stack: JobsStack, page: Page) -> None:
    requests: list[Request] = []
    page.on("request", lambda r: requests.append(r))
    open_forge(page, gateway_url(stack))
    choose(page, size="64x64", steps="500")
    page.locator("#f-steps").press("Enter")  # keyboard submit
    error = page.locator("#err-steps")
    expect(error).to_contain_text("less than or equal to 150")
    steps = page.get_by_label("Steps", exact=True)
    expect(steps).to_have_attribute("aria-invalid", "true")
    expect(steps).to_be_focused()
    expect(page.locator("#problem")).to_contain_text("beside the fields")
    assert posts(requests, "/v1/weapons"), "the server, not the page, judged the field"
    expect(cards(page)).to_have_count(0)
    shot(page, "06-invalid-field")
    steps.fill("4")
    expect(error).to_be_empty()


def drop_file(
    page: Page, name: str, mime: str, *, png_size: tuple[int, int] | None = None, text: str = ""
) -> None:
    """Drop a file made in the page onto the builder's drop zone, as a drag from the desktop
    does: a DataTransfer holding it, on dragover and drop events. With `png_size`, a PNG
    drawn on a canvas of that size (a blade on a dark ground); else a file of `text`."""
    transfer = page.evaluate_handle(
        """async ([name, mime, size, text]) => {
            let blob = new Blob([text], { type: mime });
            if (size) {
              const canvas = document.createElement("canvas");
              [canvas.width, canvas.height] = size;
              const g = canvas.getContext("2d");
              g.fillStyle = "#1b2433";
              g.fillRect(0, 0, size[0], size[1]);
              g.fillStyle = "#d8dde6";
              g.fillRect(size[0] * 0.1, size[1] * 0.45, size[0] * 0.7, size[1] * 0.1);
              g.fillStyle = "#8a5a2b";
              g.fillRect(size[0] * 0.8, size[1] * 0.35, size[0] * 0.05, size[1] * 0.3);
              blob = await new Promise((done) => canvas.toBlob(done, "image/png"));
            }
            const transfer = new DataTransfer();
            transfer.items.add(new File([blob], name, { type: mime }));
            return transfer;
        }""",
        [name, mime, list(png_size) if png_size else None, text],
    )
    zone = page.locator("#drop-zone")
    for event in ("dragenter", "dragover", "drop"):
        zone.dispatch_event(event, {"dataTransfer": transfer})
    transfer.dispose()


def png_bytes(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (120, 90, 60)).save(out, "PNG")
    return out.getvalue()


def strength_schema(url: str) -> dict[str, Any]:
    """The WeaponRequest's `strength` as the OpenAPI document states it: the number's bounds
    and the description that gives the model's default."""
    prop = httpx.get(f"{url}/openapi.json").json()["components"]["schemas"]["WeaponRequest"][
        "properties"
    ]["strength"]
    number = next(s for s in [prop, *prop.get("anyOf", [])] if s.get("type") == "number")
    default = re.search(r"default (\d+(?:\.\d+)?)", prop["description"])
    assert default, prop
    return {"min": number["minimum"], "max": number["maximum"], "default": float(default[1])}


def test_a_dropped_sketch_is_forged_from_and_a_result_refined(stack: JobsStack, page: Page) -> None:
    """Image-to-image: a sketch dropped on the builder is uploaded and shown as stored (fitted
    to an allowed size); the forge starts from it at the slider's strength, keeping its
    aspect ratio (no size sent); Refine makes that result the next forge's input image."""
    url = gateway_url(stack)
    requests: list[Request] = []
    page.on("request", lambda r: requests.append(r))
    open_forge(page, url)
    choose(page, weapon_type="sword", material="crystal", steps="8")  # size: the sketch's
    strength = page.get_by_label("Strength", exact=True)
    expect(strength).to_be_disabled()  # no input image yet
    schema = strength_schema(url)
    expect(strength).to_have_attribute("min", f"{schema['min']:g}")
    expect(strength).to_have_attribute("max", f"{schema['max']:g}")
    expect(strength).to_have_value(f"{schema['default']:g}")
    expect(page.locator("#strength-value")).to_have_text(f"{schema['default']:.2f}")

    # A wide sketch, dropped: stored fitted to the model's area, in its aspect ratio.
    with page.expect_response(lambda r: urlsplit(r.url).path == "/v1/uploads") as uploaded:
        drop_file(page, "blade.png", "image/png", png_size=(320, 160))
    assert uploaded.value.status == 201, uploaded.value.text()
    upload = uploaded.value.json()
    assert upload["width"] > upload["height"], upload
    thumb = page.locator("#sketch-thumb")
    expect(thumb).to_be_visible()
    expect(thumb).to_have_attribute("src", upload["asset_url"])
    expect(thumb).to_have_js_property("complete", True)
    assert thumb.evaluate("i => i.naturalWidth") == upload["width"]
    expect(page.locator("#sketch-info")).to_have_text(
        f"your sketch, {upload['width']} × {upload['height']}"
    )
    expect(page.locator("#f-size option").first).to_have_text("Input image's shape")
    expect(strength).to_be_enabled()
    strength.focus()
    for _ in range(round((schema["default"] - 0.6) * 100)):  # one hundredth a key press
        strength.press("ArrowLeft")
    expect(strength).to_have_value("0.6")
    expect(page.locator("#strength-value")).to_have_text("0.60")
    shot(page, "11-sketch-set")

    page.get_by_role("button", name="Forge", exact=True).click()
    expect(cards(page)).to_have_count(1, timeout=60_000)
    (sent,) = posts(requests, "/v1/weapons")
    assert sent["init_image"] == upload["id"] and sent["strength"] == 0.6
    assert "width" not in sent and "height" not in sent  # the server keeps the sketch's shape
    # The result, as the API gave it: made from the upload at that strength, in its size.
    first = card_info(page)
    card = cards(page).nth(0)
    expect(card).to_have_attribute("data-init-image", upload["id"])
    assert first["natural_width"] == upload["width"]
    expect(card.locator(".meta")).to_contain_text("Froma sketch")
    expect(card.locator(".meta")).to_contain_text("Strength0.6")
    shot(page, "12-forged-from-sketch")

    # Refine: this image is the next forge's input image; the same strength goes along.
    card.get_by_role("button", name=re.compile("^Refine image 1")).click()
    expect(thumb).to_have_attribute("src", first["src"])
    expect(page.locator("#sketch-info")).to_contain_text("image 1,")
    expect(strength).to_be_focused()
    choose(page, text="more ornate")
    page.get_by_role("button", name="Forge", exact=True).click()
    expect(cards(page)).to_have_count(2, timeout=60_000)
    refined = posts(requests, "/v1/weapons")[-1]
    assert refined["init_image"] == first["id"] and refined["strength"] == 0.6
    assert refined["text"] == "more ornate"
    expect(cards(page).nth(0)).to_have_attribute("data-init-image", first["id"])
    expect(cards(page).nth(0).locator(".meta")).to_contain_text("Fromimage 1")
    assert card_info(page)["id"] != first["id"]


def test_a_refused_file_says_why_and_a_sketch_can_be_removed(stack: JobsStack, page: Page) -> None:
    """The file picker (a keyboard's way in) takes a PNG; Remove takes it away. A file that is
    not an image is refused by the server, which reads its bytes: its problem is shown."""
    open_forge(page, gateway_url(stack))
    picker = page.get_by_label("Start from a sketch")
    with page.expect_response(lambda r: urlsplit(r.url).path == "/v1/uploads") as uploaded:
        picker.set_input_files(
            {"name": "square.png", "mimeType": "image/png", "buffer": png_bytes(40, 40)}
        )
    assert uploaded.value.status == 201
    thumb = page.locator("#sketch-thumb")
    expect(thumb).to_be_visible()
    expect(page.get_by_label("Strength", exact=True)).to_be_enabled()
    page.get_by_role("button", name="Remove", exact=True).click()
    expect(thumb).to_be_hidden()
    expect(page.get_by_label("Strength", exact=True)).to_be_disabled()
    expect(picker).to_be_focused()

    # An SVG "sketch", dropped: 415 from the server, its detail on the page, no thumbnail.
    svg = '<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8"/></svg>'
    with page.expect_response(lambda r: urlsplit(r.url).path == "/v1/uploads") as refused:
        drop_file(page, "sketch.svg", "image/svg+xml", text=svg)
    assert refused.value.status == 415
    problem = page.locator("#problem")
    expect(problem).to_be_visible()
    expect(problem).to_contain_text(refused.value.json()["detail"])
    expect(problem).to_contain_text("this is an SVG image")
    expect(thumb).to_be_hidden()
    expect(page.get_by_label("Strength", exact=True)).to_be_disabled()
    shot(page, "13-refused-file")

    # A text file from the picker: refused the same way.
    with page.expect_response(lambda r: urlsplit(r.url).path == "/v1/uploads") as refused:
        picker.set_input_files(
            {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"a sword"}
        )
    assert refused.value.status == 415
    expect(problem).to_contain_text("input images must be PNG, JPEG or WebP")
    expect(thumb).to_be_hidden()


def test_a_rate_limit_shows_a_countdown_then_allows_again(stack: JobsStack, page: Page) -> None:
    """The countdown runs on the page's clock, which the test moves: what it shows after each
    move is exact, however fast or slow this machine is."""
    page.clock.install()  # the page's timers and Date, moved by the test once paused
    open_forge(page, gateway_url(stack))
    choose(page, size="1024x1024", steps="150")  # 600 units against a 200-unit window
    page.clock.pause_at(datetime.now() + timedelta(minutes=1))
    forge = page.locator("#forge")
    with page.expect_response(lambda r: urlsplit(r.url).path == "/v1/weapons") as refused:
        forge.click()
    assert refused.value.status == 429
    retry_after = int(refused.value.headers["retry-after"])
    assert 1 <= retry_after <= 12  # the server's answer, within its 12-second window
    expect(page.locator("#problem")).to_contain_text("Rate limit reached")
    timer = page.locator("#retry-timer")
    expect(timer).to_have_text(f"You can forge again in {retry_after} s")
    expect(forge).to_be_disabled()
    expect(forge).to_have_text(f"Wait {retry_after} s")
    shot(page, "07-rate-limited")
    for left in range(retry_after - 1, 0, -1):  # one second of the page's time at a time
        page.clock.run_for(1000)
        expect(timer).to_have_text(f"You can forge again in {left} s")
        expect(forge).to_be_disabled()
    page.clock.run_for(1000)
    expect(forge).to_be_enabled()
    expect(forge).to_have_text("Forge")
    expect(timer).to_be_hidden()
    expect(page.locator("#status")).to_have_text("You can forge again now.")


def test_service_unavailable_is_said_plainly(triton: Triton, page: Page, tmp_path: Path) -> None:
    """A gateway whose Redis is down: every keyed call is 503 with Retry-After."""
    dead = RedisServer(tmp_path / "no-redis", port=free_port())  # never started
    env = gateway_env(triton, dead, tmp_path / "assets")
    gateway = GatewayServer(tmp_path, env).start()
    try:
        page.goto(gateway.url)
        key_input = page.get_by_label("API key", exact=True)
        key_input.fill(DEV_KEY)
        key_input.press("Enter")
        problem = page.locator("#problem")
        expect(problem).to_contain_text("The forge is unavailable right now", timeout=15_000)
        expect(problem).to_contain_text("It is not your request")
        expect(page.locator("#retry-timer")).to_have_text(re.compile(r"Try again in \d+ s"))
        shot(page, "08-unavailable")
    finally:
        gateway.stop()


Box = tuple[int, int, int, int]  # left, top, right, bottom, in pixels


def screenshot_difference(taken: Path, reference: Path, skip: list[Box]) -> float:
    """The share of pixels that differ by more than `LEVELS` in some channel between two
    screenshots of the same size, the `skip` boxes left out of both."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(taken).convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(reference).convert("RGB"), dtype=np.int16)
    assert a.shape == b.shape, f"{taken.name} is {a.shape}, {reference} is {b.shape}"
    compared = np.ones(a.shape[:2], dtype=bool)
    for left, top, right, bottom in skip:
        compared[max(top, 0) : max(bottom, 0), max(left, 0) : max(right, 0)] = False
    differs = np.abs(a - b).max(axis=2) > LEVELS
    return float(differs[compared].mean())


# The README's picture is stored as an 8-bit palette PNG: its colours are within these levels
# of the screenshot's (anti-aliased text loses the most, up to about 40).
LEVELS = 48
# Share of pixels that may differ: the cards' generation times and the weights' version hash
# (a few words of text) differ from run to run; a changed layout, control or text block
# differs in far more.
TOLERANCE = 0.005
README_SCREENSHOT = ROOT / "docs" / "images" / "forge-page.png"


def test_readme_screenshot(stack: JobsStack, page: Page) -> None:
    """The picture in the README is this page as this test draws it: a forged weapon with its
    variations, on a desktop. The screenshot is compared with docs/images/forge-page.png,
    all but the generated images (the tiny model's noise changes with every export), and fails
    when the page has changed; FORGE_UPDATE_README_SCREENSHOT=1 writes it there instead."""
    page.set_viewport_size({"width": 1440, "height": 960})
    open_forge(page, gateway_url(stack))
    choose(page, weapon_type="axe", material="obsidian", element="frost", rarity="legendary")
    choose(page, steps="20", size="", seed="20261126")  # the model default, 128 x 128
    page.get_by_role("button", name="Forge", exact=True).click()
    expect(cards(page)).to_have_count(1, timeout=60_000)
    cards(page).nth(0).get_by_role("button", name=re.compile("^Variations")).click()
    expect(cards(page)).to_have_count(4, timeout=90_000)
    for i in range(4):
        card_info(page, i)
    page.get_by_text("Image settings").click()  # closed: a shorter page
    page.evaluate("window.scrollTo(0, 0)")
    taken = ARTIFACTS / "readme-forge-page.png"
    page.screenshot(path=str(taken), animations="disabled")  # the cards' entrance ends at once
    images: list[Box] = []
    for img in cards(page).locator("img").all():
        box = img.bounding_box()
        assert box is not None
        x, y, w, h = (round(box[k]) for k in ("x", "y", "width", "height"))
        images.append((x, y, x + w, y + h))
    if os.environ.get("FORGE_UPDATE_README_SCREENSHOT") == "1":
        shutil.copyfile(taken, README_SCREENSHOT)
    differs = screenshot_difference(taken, README_SCREENSHOT, skip=images)
    print(f"README screenshot: {differs:.3%} of the compared pixels differ")
    assert differs <= TOLERANCE, (
        f"{taken} differs from {README_SCREENSHOT} in {differs:.2%} of its pixels: the page "
        "changed since the README's picture was taken. Look at both; rerun this test with "
        "FORGE_UPDATE_README_SCREENSHOT=1 to update the picture"
    )


def style_options(page: Page) -> list[str]:
    """The style picker's option values ("" is None)."""
    return list(page.locator("#f-style option").evaluate_all("os => os.map(o => o.value)"))


def test_a_studio_style_is_picked_with_its_weight_and_forged(
    styled_gateway: GatewayServer, page: Page
) -> None:
    """The picker offers None and the styles the model serves, the weapon templates' default
    style chosen; the weight slider follows the schema's bounds and default and is off with
    None. The style and weight chosen go in the request, and the card names them."""
    url = styled_gateway.url
    requests: list[Request] = []
    page.on("request", lambda r: requests.append(r))
    open_forge(page, url)
    served = httpx.get(f"{url}/v1/styles", headers=AUTH).json()
    picker = page.get_by_label("Studio style", exact=True)
    assert style_options(page) == ["", *(s["name"] for s in served["styles"])]
    expect(page.locator("#f-style option").first).to_have_text("None")
    expect(picker).to_have_value("ember")  # the weapon templates' default style
    weight = page.get_by_label("Style weight", exact=True)
    bounds = served["style_weight"]
    expect(weight).to_have_attribute("min", f"{bounds['min']:g}")
    expect(weight).to_have_attribute("max", f"{bounds['max']:g}")
    expect(weight).to_have_value(f"{bounds['default']:g}")
    expect(page.locator("#style-weight-value")).to_have_text(f"{bounds['default']:.2f}")
    expect(weight).to_be_enabled()
    picker.select_option("")
    expect(weight).to_be_disabled()

    picker.select_option("frost")
    expect(weight).to_be_enabled()
    weight.fill("0.5")
    expect(page.locator("#style-weight-value")).to_have_text("0.50")
    choose(page, weapon_type="axe", material="obsidian", **FAST)
    shot(page, "14-style-picked")
    page.get_by_role("button", name="Forge", exact=True).click()
    expect(cards(page)).to_have_count(1, timeout=60_000)
    (sent,) = posts(requests, "/v1/weapons")
    assert sent["style"] == "frost" and sent["style_weight"] == 0.5
    meta = cards(page).nth(0).locator(".meta")
    expect(meta).to_contain_text("Stylefrost")
    expect(meta).to_contain_text("Style weight0.5")
    shot(page, "15-forged-with-style")


def test_none_turns_the_weapons_default_style_off_and_a_refused_style_is_shown_beside_it(
    styled_gateway: GatewayServer, styles: Path, page: Page
) -> None:
    """Until a style is picked, the picker shows the default of the request the form makes: a
    weapon's (the templates' default style) or an edited prompt's (none). None, picked for a
    weapon, sends an explicit null: the weapon is made without its default style. A style the
    model stopped serving after the page loaded is refused (422), beside the picker."""
    url = styled_gateway.url
    requests: list[Request] = []
    page.on("request", lambda r: requests.append(r))
    open_forge(page, url)
    picker = page.get_by_label("Studio style", exact=True)
    weight = page.get_by_label("Style weight", exact=True)
    expect(picker).to_have_value("ember")
    page.get_by_label("Prompt", exact=True).fill("a frost-forged legendary axe, game item icon")
    expect(picker).to_have_value("")  # an image request's default: no style
    expect(weight).to_be_disabled()
    page.get_by_role("button", name="Back to the template").click()
    expect(picker).to_have_value("ember")

    picker.select_option("")
    choose(page, weapon_type="axe", material="obsidian", **FAST)
    page.get_by_role("button", name="Forge", exact=True).click()
    expect(cards(page)).to_have_count(1, timeout=60_000)
    (sent,) = posts(requests, "/v1/weapons")
    assert sent["style"] is None and "style_weight" not in sent
    expect(cards(page).nth(0).locator(".meta")).not_to_contain_text("Style")

    # The picker still offers frost; the gateway no longer serves it.
    remove_style(styles, "frost")
    listed(styled_gateway, {"ember"})
    picker.select_option("frost")
    with page.expect_response(lambda r: urlsplit(r.url).path == "/v1/weapons") as refused:
        page.get_by_role("button", name="Forge", exact=True).click()
    assert refused.value.status == 422
    error = page.locator("#err-style")
    expect(error).to_contain_text("unknown style 'frost'; styles available: ember")
    expect(picker).to_have_attribute("aria-invalid", "true")
    expect(picker).to_be_focused()
    expect(page.locator("#problem")).to_contain_text("beside the fields")
    expect(cards(page)).to_have_count(1)
    shot(page, "16-style-refused")
    picker.select_option("ember")
    expect(error).to_be_empty()
