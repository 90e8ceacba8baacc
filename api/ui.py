"""``GET /ui``: a read-only status page (HTML, CSS and vanilla JavaScript, no build step).

The page itself holds no data and needs no token; its script asks for a
bearer token (kept in ``sessionStorage``, or taken from the URL fragment
``#token=…``, which browsers never send to servers) and reads everything from
``GET /v1/status``, which requires the ``query`` scope.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.errors import ApiError

router = APIRouter(tags=["ui"], include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The only files served, by name: nothing else under (or outside) the directory is reachable.
STATIC_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@router.get("/ui")
async def page() -> FileResponse:
    """The status page's HTML shell (no data: the script fetches ``/v1/status``)."""
    return FileResponse(
        STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS
    )


@router.get("/ui/static/{name}")
async def static(name: str) -> FileResponse:
    """The page's script and style sheet."""
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", f"no static file {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=SECURITY_HEADERS)
