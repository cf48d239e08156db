"""The dashboard: `/dashboard` and its assets (`/dashboard/assets/…`), served from the
package (`static/`, uPlot vendored under `static/vendor/`: no CDN, works offline); `/`
redirects there. The page is static and open; the data it shows comes from the documented
`/v1` API (`/v1/overview`, `/v1/pipeline`, `/v1/quality`) with the read token the page asks
for when the API answers 401.

`standalone_html(data)` is the same page as one self-contained file (`edgepipe report`):
every stylesheet and script inlined, and the data embedded as JSON, which the page reads
instead of calling the API.
"""

from __future__ import annotations

import mimetypes
import re
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from pipeline.http.errors import ApiError

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).parent / "static"
PAGE = "index.html"
ASSET_PREFIX = "/dashboard/assets/"
DATA_ID = "edgepipe-data"  # the element holding a report's embedded JSON
# What the page may load and call: its own origin only (uPlot sets element styles).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
_LINK = re.compile(r'<link rel="stylesheet" href="' + re.escape(ASSET_PREFIX) + r'([^"]+)">')
_SCRIPT = re.compile(r'<script src="' + re.escape(ASSET_PREFIX) + r'([^"]+)"></script>')


def _assets() -> dict[str, str]:
    """Every file under static/ but the page itself: name → content type."""
    out = {}
    for p in sorted(STATIC.rglob("*")):
        name = p.relative_to(STATIC).as_posix()
        if p.is_file() and name != PAGE:
            out[name] = _TYPES.get(p.suffix) or mimetypes.guess_type(name)[0] or "text/plain; charset=utf-8"
    return out


ASSETS = _assets()


@router.get("/")
def root(request: Request) -> Response:
    query = request.url.query
    return RedirectResponse("/dashboard" + (f"?{query}" if query else ""), status_code=302)


@router.get("/dashboard")
def page() -> Response:
    headers = {"Cache-Control": "no-cache", "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}
    return FileResponse(STATIC / PAGE, media_type="text/html; charset=utf-8", headers=headers)


@router.get(ASSET_PREFIX + "{name:path}")
def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:  # only the files listed at start-up: no path leaves static/
        raise ApiError(404, "not_found", f"no dashboard asset {name!r}")
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    return FileResponse(STATIC / name, media_type=media_type, headers=headers)


def _inline(name: str, closing: str) -> str:
    text = (STATIC / name).read_text(encoding="utf-8")
    # The text ends where `</script` or `</style` appears: never let it.
    return re.sub("</(" + closing + ")", r"<\\/\1", text, flags=re.IGNORECASE)


def standalone_html(data: dict[str, Any]) -> str:
    """The dashboard page with its assets inlined and `data` embedded (see the module)."""
    html = (STATIC / PAGE).read_text(encoding="utf-8")
    html = _LINK.sub(lambda m: f"<style>\n{_inline(m.group(1), 'style')}\n</style>", html)
    html = _SCRIPT.sub(lambda m: f"<script>\n{_inline(m.group(1), 'script')}\n</script>", html)
    if ASSET_PREFIX in html:
        raise AssertionError(f"{PAGE} refers to an asset that was not inlined")
    # `<` only occurs inside JSON strings, where \u003c is the same character.
    payload = orjson.dumps(data).decode().replace("<", "\\u003c")
    embedded = f'<script id="{DATA_ID}" type="application/json">{payload}</script>\n'
    return html.replace("<script>", embedded + "<script>", 1)
