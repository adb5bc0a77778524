"""The weapon forge web page at `/`, its static files, and the template data it previews from.

The page is plain HTML, CSS and ES modules in `gateway/static/` (no build step). Its files are
read once, served from memory with a content ETag and `Cache-Control: no-cache` (a reload is a
304), and kept out of the OpenAPI document: they are not API. `GET /v1/weapons/templates` is
API: it gives clients the loaded weapon templates so that they can show the prompt a weapon
will produce (the page renders it as `WeaponTemplates.render` does).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from gateway.api.deps import GenerateKey, ServicesDep
from gateway.api.http import IfNoneMatch, etag_matches, problems
from gateway.problems import Problem

STATIC_DIR = Path(__file__).parents[1] / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The page's own headers: it loads only its own scripts and styles, and images from its origin
# (or a CDN in front of the assets, hence `https:`); nothing may frame it.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' https: data: blob:; style-src 'self'; "
        "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class StaticFile:
    """A file of the page, held in memory with its content ETag."""

    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()
        self.media_type = MEDIA_TYPES[path.suffix]
        self.etag = f'"{hashlib.sha256(self.data).hexdigest()[:20]}"'

    def response(self, if_none_match: str | None) -> Response:
        """The file, or 304 when the client has this version."""
        headers = {"ETag": self.etag, "Cache-Control": "no-cache", **PAGE_HEADERS}
        if etag_matches(if_none_match, self.etag):
            return Response(status_code=304, headers=headers)
        return Response(self.data, media_type=self.media_type, headers=headers)


FILES = {
    p.name: StaticFile(p)
    for p in sorted(STATIC_DIR.iterdir())
    if p.is_file() and p.suffix in MEDIA_TYPES
}
router = APIRouter()


@router.get("/", include_in_schema=False)
async def index(if_none_match: IfNoneMatch = None) -> Response:
    """The forge page."""
    return FILES["index.html"].response(if_none_match)


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str, if_none_match: IfNoneMatch = None) -> Response:
    """One of the page's scripts, styles or icons."""
    file = FILES.get(name)  # only the files listed at start: no paths, no traversal
    if file is None:
        raise Problem(404, "Not Found", f"no static file {name}")
    return file.response(if_none_match)


class WeaponTemplatesInfo(BaseModel):
    """The loaded weapon templates (`weapon_templates.yaml`), as the server renders them."""

    prompt: str = Field(
        description="format string: `{weapon_type}` etc. are replaced by the phrase of the "
        "chosen value; `{text}` by ', ' and the free text, or nothing; whitespace runs are "
        "then collapsed to one space and the ends trimmed"
    )
    negative_prompt: str
    fields: dict[str, dict[str, str]] = Field(
        description="for each field, its allowed values and the phrase each puts in the prompt"
    )
    defaults: dict[str, str] = Field(description="the value of an optional field left out")
    default_style: str | None = Field(
        description="the studio style a weapon is made in unless it names one (while the "
        "model serves it)"
    )


@router.get(
    "/v1/weapons/templates",
    response_model=WeaponTemplatesInfo,
    tags=["generate"],
    responses=problems(401, 403, 503),
)
async def weapon_templates(svc: ServicesDep, _: GenerateKey) -> WeaponTemplatesInfo:
    """The studio's weapon templates, to preview the prompt a weapon request will produce."""
    t = svc.weapons
    return WeaponTemplatesInfo(
        prompt=t.prompt,
        negative_prompt=t.negative_prompt.strip(),
        fields=t.fields,
        defaults=t.defaults,
        default_style=t.default_style,
    )
