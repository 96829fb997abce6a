"""The page itself (index.html, dashboard.js, dashboard.css next to this file) and the
response shapes both servers of the dashboard share: JSON errors and thumbnails."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import hdrs, web

DASHBOARD_DIR = Path(__file__).resolve().parent
ASSETS = {
    "/": ("index.html", "text/html"),
    "/dashboard.js": ("dashboard.js", "text/javascript"),
    "/dashboard.css": ("dashboard.css", "text/css"),
}
# Everything the page loads comes from the server itself: no CDN (networks may be
# closed), and nothing injected can load or send anywhere else.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def page_headers() -> dict[str, str]:
    return {
        "Content-Security-Policy": CSP,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        # The page is small and changes with the package: always revalidate.
        hdrs.CACHE_CONTROL: "no-cache",
    }


def _asset_handler(
    filename: str, content_type: str
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.FileResponse(DASHBOARD_DIR / filename, headers=page_headers())
        resp.content_type = content_type
        return resp

    return handler


def add_static_routes(router: web.UrlDispatcher) -> None:
    """GET / and the page's script and style."""
    for route, (filename, content_type) in ASSETS.items():
        router.add_get(route, _asset_handler(filename, content_type))


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def thumb_response(path: Path) -> web.FileResponse:
    # URLs carry a content version (?v=...), so a browser may keep a thumbnail a while.
    return web.FileResponse(
        path,
        headers={
            hdrs.CONTENT_TYPE: "image/jpeg",
            hdrs.CACHE_CONTROL: "private, max-age=86400",
            "X-Content-Type-Options": "nosniff",
        },
    )
