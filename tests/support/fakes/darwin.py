"""A fake V7 Darwin API on 127.0.0.1, for the darwin sink's contract and e2e tests.

It implements the requests and answers of V7's public API as documented in V7's API
reference (docs.v7labs.com: slots, register_upload, external storage troubleshooting)
and as darwin-py 3.6 (`darwin/backend_v2.py`, `darwin/dataset/upload_manager.py`,
`darwin/dataset/remote_dataset_v2.py`, `darwin/item.py`) sends and reads them; the facts
are collected in docs/platforms.md. What it follows:

- Auth: every API route needs `Authorization: ApiKey <key>` (401 otherwise); the team
  in `/v2/teams/{team}/...` must be the key's team (403). `GET /users/token_info`
  names the key's team (darwin-py's `Client.from_api_key` asks it first).
- Routes answer with or without the `/api` prefix and a trailing slash: darwin-py
  joins `"/datasets/"` onto its API URL, which drops `/api`.
- `GET /datasets` lists `{id, name, slug, num_items, progress}`; `POST /datasets {"name"}` creates
  one, slugged as V7 documents (lower-case, spaces to hyphens), and answers 422
  `{"errors": {"name": ["has already been taken"]}}` for a slug that exists.
- `POST /v2/teams/{team}/items/register_upload {"dataset_slug", "items", "options"?}`
  answers `{"items": [...], "blocked_items": [...]}`; each item lists its slots with
  `slot_name`, `file_name`, `type` and (registered) `upload_id` or (blocked) `reason`.
  A slot name that the same path + name already holds is blocked `ALREADY_EXISTS`; a
  *new* slot name is merged into the existing item (the behaviour darwin-py #937
  guards against). Several entries with one slot name make one slot with several
  files. Unknown keys, bad layouts and more than 500 items are 422. A relative `path`
  (darwin-py sends `d0000` with `preserve_folders`) is taken from the dataset root.
- `GET .../items/uploads/{id}/sign` -> `{"upload_url"}` (a pre-signed URL on this
  server); `PUT` there takes the raw bytes like S3: no Authorization header (400),
  Content-Length required (411), no chunked transfer encoding (501).
  `POST .../items/uploads/{id}/confirm {}`; once every upload of an item is confirmed
  the item leaves status `uploading` for `new`.
- `POST .../items/register_existing {"dataset_slug", "storage_slug", "items"}`: at
  most 100 items (422 beyond; V7's API reference: "up to 100 items per request";
  darwin-py sends 10), a known storage slug (422), each item either the
  single-slot form `{name, path, type, storage_key, fps?}` or `{name, path, slots:
  [{slot_name, file_name, type, storage_key, fps?}], layout?}`; `type` is required.
- `GET .../items?dataset_ids[]=&item_names[]=&item_paths[]=&statuses[]=&page[size]=&
  page[from]=` -> `{"items": [...], "page": {"count", "next", "previous"}}`; archived
  items are listed (`archived: true`, status `archived`) unless `statuses[]` says
  otherwise. Item JSON: `id, name, path, status, archived, dataset_id, layout,
  processing_status, slots: [{slot_name, type, file_name, fps?, size_bytes,
  source_files: [{file_name, size_bytes}]}]`.
- `PUT /datasets/{id}/archive` archives a dataset (darwin-py's `remove_remote`).
- `POST .../items/archive` and `DELETE .../items` take `{"filters": {"item_ids",
  "dataset_ids"}}`; filters selecting no item explicitly (dataset_ids alone) are 422.
- A per-key limit (`rate_limit` requests a minute, V7's is 1,000) answered with 429 and
  Retry-After; `storm(n, retry_after)` and `fail_next(n, status)` inject 429s and 5xx.
  Only API requests count (what V7 limits per key); PUTs to storage are not API
  requests.

Run it in-process (`await fake.start()` on the test's loop) or in a thread for the
daemon's subprocess (`with FakeDarwinThread(...) as fake:`). All state lives behind one
lock; tests read it through the snapshot helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import math
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.ports import listen

TEAM = "test-team"
API_KEY = "v7-fake-key-7f3a91c2d8e4b6a0"
STORAGE = "ext-store"

_TYPES = ("image", "video", "pdf", "dicom")
_EXT_TYPES = {
    **dict.fromkeys(("jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp"), "image"),
    **dict.fromkeys(("mp4", "avi", "mov", "wmv", "mkv", "webm"), "video"),
    **dict.fromkeys(("dcm", "nii"), "dicom"),
    "pdf": "pdf",
}
_UPLOAD_SLOT_KEYS = {
    "slot_name",
    "file_name",
    "type",
    "fps",
    "as_frames",
    "extract_views",
    "tags",
    "metadata",
}
_EXISTING_SLOT_KEYS = _UPLOAD_SLOT_KEYS | {"storage_key"}
_ITEM_KEYS = {"name", "path", "slots", "layout", "tags", "description"}


class Reject(Exception):
    def __init__(self, status: int, message: Any, retry_after: float | None = None) -> None:
        super().__init__(str(message))
        self.status = status
        self.message = message
        self.retry_after = retry_after


def slug_of(name: str) -> str:
    return name.strip().lower().replace(" ", "-")


def type_of(file_name: str, given: Any) -> str:
    if given is not None:
        return str(given)
    ext = file_name.rsplit(".", 1)[-1].lower() if "." in file_name else ""
    return _EXT_TYPES.get(ext, "image")


@dataclass
class Upload:
    id: str
    item_id: str
    slot_name: str
    file_name: str
    data: bytes | None = None
    confirmed: bool = False
    puts: int = 0  # PUTs that stored bytes


@dataclass
class Hold:
    """Holds PUTs of one file name until released (the daemon can be killed meanwhile)."""

    file_name: str
    release: threading.Event = field(default_factory=threading.Event)
    held: int = 0  # PUTs that arrived and are (or were) held


@dataclass
class Call:
    at: float  # time.monotonic()
    method: str
    path: str
    status: int
    headers: dict[str, str]
    body: bytes = b""  # API requests' bodies (storage PUTs: not kept)


class FakeDarwin:
    def __init__(
        self,
        *,
        api_key: str = API_KEY,
        team: str = TEAM,
        storages: tuple[str, ...] = (STORAGE,),
        rate_limit: int | None = None,
    ) -> None:
        self.api_key = api_key
        self.team = team
        self.storages = set(storages)
        self.rate_limit = rate_limit
        self.lock = threading.RLock()
        self.datasets: dict[int, dict[str, Any]] = {}
        self.items: dict[str, dict[str, Any]] = {}
        self._live: dict[tuple[int, str, str], str] = {}  # (dataset, path, name) -> item id
        self.uploads: dict[str, Upload] = {}
        self.signed: dict[str, str] = {}  # storage token -> upload id
        self.calls: list[Call] = []  # API calls (not storage PUTs)
        self.puts: list[Call] = []  # storage PUTs
        self.holds: dict[str, Hold] = {}
        self._storm: list[float] = []  # Retry-After of each scripted 429
        self._failures: list[tuple[int, float | None]] = []
        self._drop_puts = 0
        self._blocks: list[str] = []  # reasons for the next registered items' slots
        self._seq = 0
        self._recent: list[float] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle --------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 34)
        app.router.add_route("*", r"/{tail:[\s\S]*}", self._handle)
        self._runner, self.port = await listen(
            app, self.port, handler_cancellation=True, shutdown_timeout=0.2
        )

    async def stop(self) -> None:
        for h in self.holds.values():
            h.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- scripting --------------------------------------------------------------------

    def storm(self, n: int, retry_after: float = 1.0) -> None:
        """The next `n` API requests are answered 429 with this Retry-After."""
        with self.lock:
            self._storm.extend([retry_after] * n)

    def fail_next(self, n: int, status: int = 503, retry_after: float | None = None) -> None:
        """The next `n` API requests are answered `status` (with Retry-After if given)."""
        with self.lock:
            self._failures.extend([(status, retry_after)] * n)

    def block_next(self, reason: str, n: int = 1) -> None:
        """The next `n` items registered are blocked with `reason` (e.g.
        ITEM_COUNT_LIMIT_EXCEEDED), as V7 reports in `blocked_items`."""
        with self.lock:
            self._blocks.extend([reason] * n)

    def drop_puts(self, n: int) -> None:
        """The next `n` storage PUTs lose their connection halfway through the body."""
        with self.lock:
            self._drop_puts += n

    def hold(self, file_name: str) -> Hold:
        """Hold every PUT of `file_name` until `.release` is set."""
        with self.lock:
            h = self.holds[file_name] = Hold(file_name)
            return h

    def add_dataset(self, name: str) -> dict[str, Any]:
        with self.lock:
            return self._create_dataset(name)

    # --- views for tests ----------------------------------------------------------------

    def dataset(self, name: str) -> dict[str, Any] | None:
        with self.lock:
            for d in self.datasets.values():
                if d["name"] == name or d["slug"] == slug_of(name):
                    return dict(d)
        return None

    def all_items(self, dataset: str) -> list[dict[str, Any]]:
        """Every item of the dataset, archived ones too, as the API lists them."""
        d = self.dataset(dataset)
        if d is None:
            return []
        with self.lock:
            rows = [i for i in self.items.values() if i["dataset_id"] == d["id"]]
            return [self._item_json(i) for i in sorted(rows, key=lambda i: i["seq"])]

    def live(self, dataset: str) -> dict[str, dict[str, Any]]:
        """Items that are not archived, by `path/name`; fails on a duplicate key."""
        out: dict[str, dict[str, Any]] = {}
        for i in self.all_items(dataset):
            if i["archived"]:
                continue
            key = f"{i['path'].rstrip('/')}/{i['name']}"
            assert key not in out, f"duplicate item {key} on the fake V7"
            out[key] = i
        return out

    def archived(self, dataset: str) -> list[dict[str, Any]]:
        return [i for i in self.all_items(dataset) if i["archived"]]

    def content(self, item_id: str, slot_name: str) -> list[tuple[str, bytes | None]]:
        """(file name, bytes) of a slot's files, in registration order."""
        with self.lock:
            item = self.items[item_id]
            slot = next(s for s in item["slots"] if s["slot_name"] == slot_name)
            out = []
            for f in slot["files"]:
                up = self.uploads.get(f.get("upload_id") or "")
                out.append((f["file_name"], up.data if up is not None else None))
            return out

    def bodies(self, route: str) -> list[bytes]:
        """The bodies of the API requests to `route` that were answered 2xx."""
        return [c.body for c in self.api_calls(route=route) if 200 <= c.status < 300]

    def api_calls(self, method: str | None = None, route: str | None = None) -> list[Call]:
        with self.lock:
            return [
                c
                for c in self.calls
                if (method is None or c.method == method) and (route is None or route in c.path)
            ]

    # --- dispatch ---------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith("/_storage/"):
            return await self._storage_put(request)
        status = 500
        body = await request.read() if request.can_read_body else b""
        try:
            resp = await self._api(request)
            status = resp.status
            return resp
        except Reject as e:
            status = e.status
            headers = {}
            if e.status == 429:
                headers["Retry-After"] = str(e.message)
                return web.json_response(
                    {"errors": {"message": "Too Many Requests"}}, status=429, headers=headers
                )
            body = e.message if isinstance(e.message, dict) else {"errors": {"message": e.message}}
            if e.retry_after is not None:
                headers["Retry-After"] = _fmt(e.retry_after)
            return web.json_response(body, status=e.status, headers=headers)
        finally:
            with self.lock:
                self.calls.append(
                    Call(
                        time.monotonic(), request.method, path, status, dict(request.headers), body
                    )
                )

    async def _api(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"ApiKey {self.api_key}":
            raise Reject(401, "Unauthorized: a valid API key is required")
        with self.lock:
            if self._storm:
                raise Reject(429, _fmt(self._storm.pop(0)))
            if self._failures:
                status, after = self._failures.pop(0)
                if status == 429:
                    raise Reject(429, _fmt(after if after is not None else 1))
                raise Reject(status, "Internal Server Error", after)
            if self.rate_limit is not None:
                now = time.monotonic()
                self._recent = [t for t in self._recent if t > now - 60.0]
                if len(self._recent) >= self.rate_limit:
                    raise Reject(429, _fmt(math.ceil(self._recent[0] + 60.0 - now)))
                self._recent.append(now)
        parts = [p for p in request.path.split("/") if p]
        if parts[:1] == ["api"]:
            parts = parts[1:]
        m = request.method
        if parts == ["users", "token_info"] and m == "GET":
            return web.json_response({"selected_team": {"slug": self.team}})
        if parts == ["datasets"]:
            if m == "GET":
                return self._list_datasets()
            if m == "POST":
                return self._post_dataset(await _json(request))
        if len(parts) == 3 and parts[0] == "datasets" and parts[2] == "archive" and m == "PUT":
            return self._archive_dataset(parts[1])
        if len(parts) >= 4 and parts[:2] == ["v2", "teams"] and parts[3] == "items":
            if parts[2] != self.team:
                raise Reject(403, f"the API key does not belong to team {parts[2]}")
            rest = parts[4:]
            if rest == [] and m == "GET":
                return self._list_items(request)
            if rest == [] and m == "DELETE":
                return self._remove(await _json(request), archive=False)
            if rest == ["archive"] and m == "POST":
                return self._remove(await _json(request), archive=True)
            if rest == ["register_upload"] and m == "POST":
                return self._register(await _json(request), existing=False)
            if rest == ["register_existing"] and m == "POST":
                return self._register(await _json(request), existing=True)
            if len(rest) == 3 and rest[0] == "uploads" and rest[2] == "sign" and m == "GET":
                return self._sign(request, rest[1])
            if len(rest) == 3 and rest[0] == "uploads" and rest[2] == "confirm" and m == "POST":
                body = await _json(request)
                if not isinstance(body, dict):
                    raise Reject(422, "body must be an object")
                return self._confirm(rest[1])
        raise Reject(404, "Not found")

    # --- datasets -----------------------------------------------------------------------

    def _create_dataset(self, name: str) -> dict[str, Any]:
        slug = slug_of(name)
        if any(d["slug"] == slug for d in self.datasets.values()):
            raise Reject(422, {"errors": {"name": ["has already been taken"]}})
        self._seq += 1
        d = {"id": 1000 + self._seq, "name": name, "slug": slug, "num_items": 0, "progress": 0}
        self.datasets[d["id"]] = d
        return d

    def _dataset_json(self, d: dict[str, Any]) -> dict[str, Any]:
        live = sum(1 for k in self._live if k[0] == d["id"])
        return {**d, "num_items": live}

    def _list_datasets(self) -> web.Response:
        with self.lock:
            return web.json_response([self._dataset_json(d) for d in self.datasets.values()])

    def _post_dataset(self, body: Any) -> web.Response:
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"]:
            raise Reject(422, {"errors": {"name": ["can't be blank"]}})
        with self.lock:
            return web.json_response(self._dataset_json(self._create_dataset(body["name"])))

    def _archive_dataset(self, dataset_id: str) -> web.Response:
        """`PUT /datasets/{id}/archive` (darwin-py's remove_remote): the dataset is gone
        from listings and its slug is free again."""
        with self.lock:
            d = self.datasets.pop(int(dataset_id) if dataset_id.isdigit() else -1, None)
            if d is None:
                raise Reject(404, "dataset not found")
            for item_id in [i for i, it in self.items.items() if it["dataset_id"] == d["id"]]:
                self._drop(self.items[item_id])
        return web.json_response({})

    def _dataset_by_slug(self, slug: Any) -> dict[str, Any]:
        for d in self.datasets.values():
            if d["slug"] == slug:
                return d
        raise Reject(404, f"dataset {slug!r} not found")

    # --- registration -------------------------------------------------------------------

    def _register(self, body: Any, *, existing: bool) -> web.Response:
        if not isinstance(body, dict):
            raise Reject(422, "body must be an object")
        allowed = (
            {"dataset_slug", "items", "storage_slug"}
            if existing
            else {
                "dataset_slug",
                "items",
                "options",
            }
        )
        unknown = set(body) - allowed
        if unknown:
            raise Reject(422, f"unknown keys {sorted(unknown)}")
        items = body.get("items")
        limit = 100 if existing else 500
        if not isinstance(items, list) or not items:
            raise Reject(422, "items must be a non-empty list")
        if len(items) > limit:
            raise Reject(422, f"at most {limit} items a request")
        if existing and body.get("storage_slug") not in self.storages:
            raise Reject(422, f"storage {body.get('storage_slug')!r} not found")
        options = body.get("options", {})
        if not isinstance(options, dict) or set(options) - {
            "handle_as_slices",
            "force_tiling",
            "ignore_dicom_layout",
        }:
            raise Reject(422, "bad options")
        with self.lock:
            ds = self._dataset_by_slug(body.get("dataset_slug"))
            specs = [self._item_spec(i, existing) for i in items]
            out_items: list[dict[str, Any]] = []
            blocked: list[dict[str, Any]] = []
            for name, path, slots, layout in specs:
                current = self.items.get(self._live.get((ds["id"], path, name), ""))
                if self._blocks:
                    reason = self._blocks.pop(0)
                    blocked.append(
                        {
                            "name": name,
                            "path": path,
                            "slots": [
                                {
                                    "slot_name": s["slot_name"],
                                    "file_name": f["file_name"],
                                    "type": s["type"],
                                    "reason": reason,
                                }
                                for s in slots
                                for f in s["files"]
                            ],
                        }
                    )
                    continue
                taken = {s["slot_name"] for s in current["slots"]} if current else set()
                new_slots = [s for s in slots if s["slot_name"] not in taken]
                old_slots = [s for s in slots if s["slot_name"] in taken]
                if old_slots:
                    blocked.append(
                        {
                            "id": current["id"] if current else None,
                            "name": name,
                            "path": path,
                            "slots": [
                                {
                                    "slot_name": s["slot_name"],
                                    "file_name": f["file_name"],
                                    "type": s["type"],
                                    "reason": "ALREADY_EXISTS",
                                }
                                for s in old_slots
                                for f in s["files"]
                            ],
                        }
                    )
                if not new_slots:
                    continue
                if current is None:
                    self._seq += 1
                    current = {
                        "id": str(uuid.uuid4()),
                        "seq": self._seq,
                        "name": name,
                        "path": path,
                        "dataset_id": ds["id"],
                        "archived": False,
                        "layout": layout,
                        "slots": [],
                    }
                    self.items[current["id"]] = current
                    self._live[(ds["id"], path, name)] = current["id"]
                answer_slots = []
                for s in new_slots:
                    current["slots"].append(s)
                    for f in s["files"]:
                        if not existing:
                            up = Upload(
                                uuid.uuid4().hex, current["id"], s["slot_name"], f["file_name"]
                            )
                            self.uploads[up.id] = up
                            f["upload_id"] = up.id
                        entry = {
                            "slot_name": s["slot_name"],
                            "file_name": f["file_name"],
                            "type": s["type"],
                        }
                        if not existing:
                            entry["upload_id"] = f["upload_id"]
                        answer_slots.append(entry)
                out_items.append(
                    {"id": current["id"], "name": name, "path": path, "slots": answer_slots}
                )
            return web.json_response({"items": out_items, "blocked_items": blocked})

    def _item_spec(
        self, item: Any, existing: bool
    ) -> tuple[str, str, list[dict[str, Any]], dict[str, Any] | None]:
        if not isinstance(item, dict):
            raise Reject(422, "each item must be an object")
        flat = existing and "slots" not in item
        keys = _ITEM_KEYS | ({"type", "storage_key", "fps"} if flat else set())
        unknown = set(item) - keys
        if unknown:
            raise Reject(422, f"unknown item keys {sorted(unknown)}")
        name = item.get("name")
        if not isinstance(name, str) or not name or "/" in name:
            raise Reject(422, f"bad item name {name!r}")
        path = item.get("path", "/")
        if not isinstance(path, str):
            raise Reject(422, f"bad path {path!r}")
        path = "/" + path.strip("/") if path.strip("/") else "/"
        if flat:
            raw = [
                {
                    "slot_name": "0",
                    "file_name": str(item.get("storage_key") or name).rsplit("/", 1)[-1],
                    **{k: item[k] for k in ("type", "storage_key", "fps") if k in item},
                }
            ]
        else:
            raw = item.get("slots")
            if not isinstance(raw, list) or not raw:
                raise Reject(422, "slots must be a non-empty list")
        slots: dict[str, dict[str, Any]] = {}
        for s in raw:
            if not isinstance(s, dict):
                raise Reject(422, "each slot must be an object")
            bad = set(s) - (_EXISTING_SLOT_KEYS if existing else _UPLOAD_SLOT_KEYS)
            if bad:
                raise Reject(422, f"unknown slot keys {sorted(bad)}")
            sn, fn = s.get("slot_name"), s.get("file_name")
            if not isinstance(sn, str) or not sn or not isinstance(fn, str) or not fn:
                raise Reject(422, "slot_name and file_name are required")
            kind = s.get("type")
            if kind is not None and kind not in _TYPES:
                raise Reject(422, f"bad slot type {kind!r}")
            if existing and (kind is None or not isinstance(s.get("storage_key"), str)):
                raise Reject(422, "type and storage_key are required to register existing files")
            fps = s.get("fps")
            if (
                fps is not None
                and fps != "native"
                and not (isinstance(fps, int | float) and fps >= 0)
            ):
                raise Reject(422, f"bad fps {fps!r}")
            slot = slots.setdefault(
                sn, {"slot_name": sn, "type": type_of(fn, kind), "files": [], "fps": fps}
            )
            f: dict[str, Any] = {"file_name": fn}
            if existing:
                f["storage_key"] = s["storage_key"]
            slot["files"].append(f)
        layout = item.get("layout")
        if layout is not None:
            _check_layout(layout, set(slots))
        return name, path, list(slots.values()), layout

    # --- uploads ------------------------------------------------------------------------

    def _sign(self, request: web.Request, upload_id: str) -> web.Response:
        with self.lock:
            if upload_id not in self.uploads:
                raise Reject(404, "upload not found")
            token = secrets.token_hex(12)
            self.signed[token] = upload_id
        host = request.host
        return web.json_response(
            {"upload_url": f"http://{host}/_storage/{token}?X-Amz-Signature={secrets.token_hex(8)}"}
        )

    async def _storage_put(self, request: web.Request) -> web.StreamResponse:
        token = request.path.rsplit("/", 1)[-1]
        status = 200
        try:
            if request.method != "PUT":
                status = 405
                return web.Response(status=405, text="MethodNotAllowed")
            if "Authorization" in request.headers:
                status = 400
                return web.Response(
                    status=400, text="InvalidArgument: Only one auth mechanism allowed"
                )
            if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
                status = 501
                return web.Response(status=501, text="NotImplemented: Transfer-Encoding")
            if request.content_length is None:
                status = 411
                return web.Response(status=411, text="MissingContentLength")
            with self.lock:
                upload_id = self.signed.get(token)
                up = self.uploads.get(upload_id or "")
                drop = False
                if self._drop_puts > 0:
                    self._drop_puts -= 1
                    drop = True
                hold = self.holds.get(up.file_name) if up is not None else None
                if hold is not None:
                    hold.held += 1
            if up is None:
                status = 403
                return web.Response(status=403, text="SignatureDoesNotMatch")
            if hold is not None:
                while not hold.release.is_set():
                    await asyncio.sleep(0.02)
            if drop:
                await request.content.read(max(1, request.content_length // 2))
                status = -1
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=500)
            data = await request.read()
            if len(data) != request.content_length:
                status = 400
                return web.Response(status=400, text="IncompleteBody")
            with self.lock:
                up.data = data
                up.puts += 1
            return web.Response(status=200)
        finally:
            with self.lock:
                self.puts.append(
                    Call(
                        time.monotonic(),
                        request.method,
                        request.path,
                        status,
                        dict(request.headers),
                    )
                )

    def _confirm(self, upload_id: str) -> web.Response:
        with self.lock:
            up = self.uploads.get(upload_id)
            if up is None or up.item_id not in self.items:
                raise Reject(404, "upload not found")
            if up.data is None:
                raise Reject(422, "no file was uploaded for this upload id")
            up.confirmed = True
        return web.json_response({})

    # --- listing and removal -------------------------------------------------------------

    def _status(self, item: dict[str, Any]) -> str:
        if item["archived"]:
            return "archived"
        for s in item["slots"]:
            for f in s["files"]:
                up = self.uploads.get(f.get("upload_id") or "")
                if f.get("upload_id") and (up is None or not up.confirmed):
                    return "uploading"
        return "new"

    def _item_json(self, item: dict[str, Any]) -> dict[str, Any]:
        slots = []
        for s in item["slots"]:
            files = []
            for f in s["files"]:
                d: dict[str, Any] = {"file_name": f["file_name"]}
                up = self.uploads.get(f.get("upload_id") or "")
                if up is not None and up.data is not None and up.confirmed:
                    d["size_bytes"] = len(up.data)
                if "storage_key" in f:
                    d["storage_key"] = f["storage_key"]
                files.append(d)
            slot: dict[str, Any] = {
                "slot_name": s["slot_name"],
                "type": s["type"],
                "file_name": s["files"][0]["file_name"],
                "source_files": files,
            }
            sizes = [f["size_bytes"] for f in files if "size_bytes" in f]
            if len(sizes) == len(files):
                slot["size_bytes"] = sum(sizes)
            if s.get("fps") is not None:
                slot["fps"] = s["fps"]
            slots.append(slot)
        status = self._status(item)
        return copy.deepcopy(
            {
                "id": item["id"],
                "name": item["name"],
                "path": item["path"],
                "dataset_id": item["dataset_id"],
                "archived": item["archived"],
                "status": status,
                "processing_status": "processed" if status != "uploading" else "uploading",
                "layout": item["layout"],
                "slots": slots,
            }
        )

    def _list_items(self, request: web.Request) -> web.Response:
        q = request.query
        ids = q.getall("dataset_ids[]", [])
        if not ids:
            raise Reject(422, "dataset_ids[] is required")
        names = set(q.getall("item_names[]", []))
        paths = set(q.getall("item_paths[]", []))
        statuses = set(q.getall("statuses[]", []))
        try:
            size = int(q.get("page[size]", "50"))
            start = int(q.get("page[from]", "0"))
        except ValueError:
            raise Reject(422, "bad page parameters") from None
        if not 1 <= size <= 500:
            raise Reject(422, "page[size] must be 1..500")
        with self.lock:
            rows = [
                self._item_json(i)
                for i in sorted(self.items.values(), key=lambda i: i["seq"])
                if str(i["dataset_id"]) in ids
                and (not names or i["name"] in names)
                and (not paths or i["path"] in paths)
            ]
        if statuses:
            rows = [r for r in rows if r["status"] in statuses]
        page = rows[start : start + size]
        nxt = str(start + size) if start + size < len(rows) else None
        prev = str(max(0, start - size)) if start else None
        return web.json_response(
            {"items": page, "page": {"count": len(rows), "next": nxt, "previous": prev}}
        )

    def _remove(self, body: Any, *, archive: bool) -> web.Response:
        filters = body.get("filters") if isinstance(body, dict) else None
        if not isinstance(filters, dict) or set(body) != {"filters"}:
            raise Reject(422, "filters are required")
        item_ids = filters.get("item_ids")
        if not isinstance(item_ids, list) or not item_ids:
            raise Reject(422, "at least one filter besides dataset_ids is required")
        dataset_ids = filters.get("dataset_ids")
        with self.lock:
            for item_id in item_ids:
                item = self.items.get(str(item_id))
                if item is None:
                    continue
                if dataset_ids and item["dataset_id"] not in dataset_ids:
                    continue
                if archive:
                    item["archived"] = True
                    self._live.pop((item["dataset_id"], item["path"], item["name"]), None)
                else:
                    self._drop(item)
        return web.Response(status=204)

    def _drop(self, item: dict[str, Any]) -> None:
        """Delete an item and its uploads (the caller holds the lock)."""
        del self.items[item["id"]]
        key = (item["dataset_id"], item["path"], item["name"])
        if self._live.get(key) == item["id"]:
            del self._live[key]
        for s in item["slots"]:
            for f in s["files"]:
                self.uploads.pop(f.get("upload_id") or "", None)


def _check_layout(layout: Any, slot_names: set[str]) -> None:
    if not isinstance(layout, dict):
        raise Reject(422, "layout must be an object")
    version = layout.get("version")
    if version == 3:
        if set(layout) != {"version", "slots_grid"}:
            raise Reject(422, f"bad layout keys {sorted(layout)}")
        grid = layout["slots_grid"]
        if not isinstance(grid, list) or not grid:
            raise Reject(422, "slots_grid must be a list")
        seen: list[str] = []
        for column in grid:
            if not isinstance(column, list) or not column:
                raise Reject(422, "slots_grid columns must be lists of cells")
            for cell in column:
                if not isinstance(cell, list) or not cell:
                    raise Reject(422, "slots_grid cells must be lists of slot names")
                seen.extend(cell)
        if not set(seen) <= slot_names or len(seen) != len(set(seen)):
            raise Reject(422, "slots_grid names unknown or repeated slots")
    elif version in (1, 2):
        if not isinstance(layout.get("slots"), list) or layout.get("type") not in (
            "grid",
            "horizontal",
            "vertical",
            "simple",
        ):
            raise Reject(422, "bad layout")
    else:
        raise Reject(422, f"bad layout version {version!r}")


async def _json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read() or b"null")
    except ValueError:
        raise Reject(400, "body is not JSON") from None


def _fmt(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


class FakeDarwinThread:
    """The fake on its own event loop in a thread, for tests that run the daemon as a
    subprocess: `with FakeDarwinThread() as fake: ... fake.url ...`."""

    def __init__(self, **kw: Any) -> None:
        self.fake = FakeDarwin(**kw)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> FakeDarwin:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.start(), self._loop).result(10)
        return self.fake

    def __exit__(self, *exc: Any) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.fake.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@contextlib.contextmanager
def fake_darwin_thread(**kw: Any) -> Iterator[FakeDarwin]:
    with FakeDarwinThread(**kw) as fake:
        yield fake
