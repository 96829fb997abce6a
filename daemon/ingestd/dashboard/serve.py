"""The dashboard's data routes on `ingestd serve`: the store's datasets with their item
counts, and the items of the chosen one with thumbnails made from the stored blobs.

The data routes live outside /v1 but take the same bearer token as the API when the
server has tokens: the page asks for it once and sends it with every request
(thumbnails too), so a server exposed with tokens does not show its items to anyone
who finds the port.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import quote

from aiohttp import hdrs, web

from ingestd.dashboard.page import add_static_routes, json_error, thumb_response
from ingestd.media.thumbs import ThumbCache, cache_key, pick

if TYPE_CHECKING:
    from ingestd.store import Store

T = TypeVar("T")

THUMB_CACHE = web.AppKey("ingestd_dashboard_thumbs", ThumbCache)
ITEMS_MAX = 500


class ServeAuth(Protocol):
    @property
    def enabled(self) -> bool: ...

    def allows(self, authorization: str | None) -> bool: ...


class ServeState(Protocol):
    """What the routes need of `ingestd serve`'s state (ingestd.server.app.ServerState),
    handed in by the server so that the dashboard does not import it."""

    @property
    def auth(self) -> ServeAuth: ...

    @property
    def store(self) -> Store | None: ...

    async def run(self, fn: Callable[..., T], *args: Any) -> T: ...


StateOf = Callable[[web.Request], ServeState]
STATE_OF: web.AppKey[StateOf] = web.AppKey("ingestd_dashboard_state_of")


def _serve_state(request: web.Request) -> ServeState:
    return request.app[STATE_OF](request)


def _authorized(request: web.Request, st: ServeState) -> web.Response | None:
    if st.auth.allows(request.headers.get(hdrs.AUTHORIZATION)):
        return None
    return web.json_response(
        {"error": "this server needs a bearer token: enter one of its tokens on the page"},
        status=401,
        headers={hdrs.WWW_AUTHENTICATE: "Bearer"},
    )


def _limit(request: web.Request, default: int = 60) -> int:
    value = request.query.get("limit", "")
    return min(int(value), ITEMS_MAX) if value.isdigit() and int(value) > 0 else default


def _split_key(key: str) -> tuple[str, str]:
    """(folder path, name) of an item key such as /a/b/c.jpg."""
    path, _, name = key.rpartition("/")
    return path or "/", name


def _thumb_choice(st: ServeState, item: dict[str, Any]) -> tuple[str, str, str] | None:
    """(cache key, kind, blob path) of the file to show for a stored item."""
    assert st.store is not None
    for slot in item.get("slots", []):
        files = [f for f in slot.get("files", []) if isinstance(f, dict) and f.get("digest")]
        if not files or len(files) != len(slot.get("files", [])):
            continue  # remote (URL) files have no bytes here
        chosen = pick(slot.get("type", ""), [f["digest"] for f in files])
        if chosen is None:
            continue
        kind, digest = chosen
        try:
            path = st.store.blobs.path(digest)
        except ValueError:
            continue
        return cache_key(kind, digest), kind, str(path)
    return None


def _thumb_url(dataset: str, item: dict[str, Any], key: str) -> str:
    # Relative, so the page also works behind a proxy that mounts it under a prefix.
    segments = "/".join(quote(s, safe="") for s in item["key"].lstrip("/").split("/"))
    return f"thumbs/{quote(dataset, safe='')}/{segments}?v={key[:16]}"


def _datasets(st: ServeState) -> list[dict[str, Any]]:
    assert st.store is not None
    catalog = st.store.catalog
    return [{"name": n, "items": catalog.count_items(n)} for n in catalog.datasets()]


def _items(st: ServeState, dataset: str, limit: int) -> list[dict[str, Any]] | None:
    assert st.store is not None
    catalog = st.store.catalog
    if not catalog.has_dataset(dataset):
        return None
    out = []
    for item in catalog.list_items(dataset, limit=limit):
        choice = _thumb_choice(st, item)
        out.append(
            {
                "key": item["key"],
                "version": item["version"],
                "slots": [
                    {"name": s.get("name"), "type": s.get("type"), "files": len(s.get("files", []))}
                    for s in item["slots"]
                ],
                "metadata": item["metadata"],
                "thumbnail": _thumb_url(dataset, item, choice[0]) if choice else None,
            }
        )
    return out


async def _info(request: web.Request) -> web.Response:
    st = _serve_state(request)
    return web.json_response({"kind": "serve", "auth": st.auth.enabled, "retry": False})


async def _list_datasets(request: web.Request) -> web.Response:
    st = _serve_state(request)
    if (denied := _authorized(request, st)) is not None:
        return denied
    return web.json_response({"datasets": await st.run(_datasets, st)})


async def _list_items(request: web.Request) -> web.Response:
    st = _serve_state(request)
    if (denied := _authorized(request, st)) is not None:
        return denied
    dataset = request.match_info["dataset"]
    items = await st.run(_items, st, dataset, _limit(request))
    if items is None:
        return json_error(404, f"no dataset {dataset!r}")
    return web.json_response({"dataset": dataset, "items": items})


async def _thumb(request: web.Request) -> web.StreamResponse:
    st = _serve_state(request)
    if (denied := _authorized(request, st)) is not None:
        return denied
    assert st.store is not None
    dataset, key = request.match_info["dataset"], "/" + request.match_info["key"]
    path, name = _split_key(key)
    item = await st.run(st.store.catalog.get_item, dataset, path, name)
    choice = _thumb_choice(st, item) if item is not None else None
    if choice is None:
        return json_error(404, f"no thumbnail for {key} in {dataset!r}")
    made = await request.app[THUMB_CACHE].get(*choice)
    if made is None:
        return json_error(404, f"{key}: its content cannot be shown as a thumbnail")
    return thumb_response(made)


def add_dashboard_routes(app: web.Application, store_dir: Path, state_of: StateOf) -> None:
    """The dashboard on `ingestd serve`: the page, /api/* for it, and thumbnails cached
    under `store_dir/thumbs/` (keyed by blob digest, so they never go stale).
    `state_of` gives the server's state for a request."""
    cache = ThumbCache(Path(store_dir) / "thumbs")
    app[THUMB_CACHE] = cache
    app[STATE_OF] = state_of

    async def close(_: web.Application) -> None:
        cache.close()

    app.on_cleanup.append(close)
    r = app.router
    add_static_routes(r)
    r.add_get("/api/info", _info)
    r.add_get("/api/datasets", _list_datasets)
    r.add_get("/api/datasets/{dataset}/items", _list_items)
    r.add_get(r"/thumbs/{dataset}/{key:[\s\S]+}", _thumb)
