"""A fake Scale Nucleus API: an aiohttp application on 127.0.0.1 that keeps remote state
(datasets, items, metadata, the bytes it received) for tests to assert on.

It answers what the current SDK (scale-nucleus 0.22.3) sends, proven by driving that
SDK against it (tests/e2e/test_nucleus_sdk.py), and what docs/platforms.md ("Scale
Nucleus") gathers from the API documentation:

- Base path `/v1/nucleus`; HTTP Basic auth with the API key as user name and an empty
  password on every API route (401 otherwise). Unknown paths answer 404, wrong methods
  405, malformed bodies 400 with `{"error": ...}`.
- `GET dataset/details` lists `[{"id", "name", "is_public"}]` (the SDK's
  DatasetDetails); `POST dataset/create {"name", "is_scene", ...}` answers
  `{"dataset_id"}`; `DELETE dataset/{id}` answers `{"message": ...}`. Names need not be
  unique (Nucleus allows that).
- Every append is processed by the asynchronous pipeline (scale-nucleus 0.19 removed
  the synchronous upload; 0.22's `append` says "All uploads are processed
  asynchronously") and answers a job `{"job_id", "job_last_known_status", "job_type",
  "job_creation_time"}`:
  - local bytes: `POST dataset/{id}/append?async=1` as multipart/form-data, as
    nucleus/dataset_item_uploader.py builds it: a part `items` holding a JSON array of
    `{metadata, reference_id, image_url, update}`, then one `image` file part per item
    whose filename is the item's `image_url` (the SDK sends the local path as both), at
    most 10 files a request (400 beyond);
  - remote URLs: `GET dataset/{id}/signedUrl/{uuid}` answers `{"signed_url"}`; a PUT of
    NDJSON items there (without the API key: a pre-signed URL refuses a second auth
    mechanism with 400); `POST dataset/{id}/append?async=1 {"requestId", "update"}`.
  Items are stored when the job is made; each item's failure (an image that does not
  decode or is over 5000 x 5000 px, a URL that is not s3://, gs:// or http(s):// or is in
  `bad_urls`, a metadata key whose type conflicts with the dataset's) becomes a job
  error instead of failing the request.
- `GET job/{id}` answers `{"job_id", "status", "message", "job_progress",
  "completed_steps", "total_steps"}`: `Running` for `job_polls` polls and at least
  `job_seconds` seconds, then `Completed`, `Errored_Partial` (some items failed) or
  `Errored_User` (all failed); `GET job/{id}/errors` lists strings, each the JSON of
  `{"item": {...}, "error": "..."}` (the shape the SDK's docstring shows).
- `POST jobs/ {"dataset_id", "job_types", "from_date", "to_date", "limit",
  "show_completed"}` (the SDK's `list_jobs`) lists jobs as `{"job_id",
  "job_last_known_status", "job_type", "job_creation_time"}`, newest first; a listing
  counts as a poll of each job it shows.
- `update: true` replaces an existing item and its metadata entirely; `update: false`
  leaves it alone. Items are keyed by `reference_id`, so the dataset can never hold two
  items with the same one.
- `POST dataset/{id}/metadata?async=0 {"metadata": [{"reference_id", "metadata"}],
  "level": "item"}` MERGES the given keys into each item's metadata (keys cannot be
  removed); `?async=1` answers a job instead.
- `GET dataset/{id}/refloc/{reference_id}` answers `{"item": {...}, "annotations":
  {}}`, `DELETE` of the same path removes the item; both 404 for an unknown one. The
  reference_id is one path segment, percent-encoded (`/` as %2F), as the SDK sends it.

Faults for tests: `storm(n, retry_after)` answers the next n API requests 429 with
Retry-After; `fail_next(n, status)` answers 5xx; `drop_appends(n)` closes the
connection in the middle of the next n multipart uploads; `hold()` makes appends wait
after storing their items until `release()` (a client that dies meanwhile never hears
the answer); `reject_refs` fails named items in their job; `refuse_refs` fails a whole
request that carries one of them with a 400 naming no item; `job_final` forces a job's
final status; `jobs_listing = False` makes `POST jobs/` unknown (404). `received` keeps
every item JSON an append carried, as sent.

Run it in-process with `serve(fake)` (an async context manager) or in a thread with
`FakeNucleusThread(fake)` (for the daemon or an SDK as a subprocess).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import io
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from PIL import Image

from tests.support.ports import listen

PREFIX = "/v1/nucleus"
MAX_FILES = 10
MAX_SIDE = 5000
MAX_JOB_ITEMS = 1000
REMOTE_SCHEMES = ("s3://", "gs://", "http://", "https://")
RUNNING = "Running"


@dataclass
class Logged:
    method: str
    path: str  # below PREFIX for API routes, decoded
    status: int
    at: float  # time.monotonic() when the request arrived
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeDataset:
    id: str
    name: str
    is_scene: bool = False
    items: dict[str, dict[str, Any]] = field(default_factory=dict)  # reference_id -> item
    blobs: dict[str, bytes] = field(default_factory=dict)  # reference_id -> uploaded bytes


@dataclass
class FakeJob:
    id: str
    dataset: str
    errors: list[str]
    total: int
    polls_left: int
    final: str
    ready_at: float  # time.monotonic() from which the job may end
    kind: str = "uploadDatasetItems"
    created: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    def observe(self) -> str:
        """The status a poll sees now (a poll counts towards the job's end)."""
        running = self.polls_left > 0 or time.monotonic() < self.ready_at
        self.polls_left = max(0, self.polls_left - 1)
        return RUNNING if running else self.final

    @property
    def creation_time(self) -> str:
        return self.created.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Rejected(Exception):
    """A 4xx answer with a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _type_of(v: Any) -> str | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    return None


def _date(value: Any) -> dt.datetime | None:
    """A listing's from_date/to_date: ISO 8601 or `str(datetime)`, UTC when naive."""
    if not isinstance(value, str) or not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise Rejected(400, f"Date {value} not a valid date") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


class FakeNucleus:
    def __init__(
        self,
        api_key: str = "nucleus-test-key-5d1c",
        *,
        job_polls: int = 1,
        job_seconds: float = 0.0,
    ) -> None:
        self.api_key = api_key
        self.job_polls = job_polls
        self.job_seconds = job_seconds
        self.lock = threading.RLock()
        self.datasets: dict[str, FakeDataset] = {}
        self.jobs: dict[str, FakeJob] = {}
        self.uploads: dict[tuple[str, str], bytes] = {}  # (dataset, requestId) -> NDJSON
        self.signed: dict[str, tuple[str, str]] = {}  # token -> (dataset, requestId)
        self.log: list[Logged] = []
        self.received: list[dict[str, Any]] = []  # every item JSON appended, as sent
        self.jobs_listing = True  # False: `POST jobs/` is unknown here (404)
        self.base_url = ""  # http://127.0.0.1:PORT/v1/nucleus once serving
        # faults
        self._faults: list[tuple[int, str | None]] = []  # (status, Retry-After) per request
        self._drops = 0
        self.reject_refs: dict[str, str] = {}  # reference_id -> the item's job error
        self.refuse_refs: set[str] = set()  # a request carrying one of these fails whole
        self.bad_urls: set[str] = set()
        self.job_final: str | None = None
        self._hold = False
        self.held = 0  # uploads currently waiting in hold()
        self.stored_while_held = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._release: asyncio.Event | None = None

    # --- test controls (thread-safe) ---------------------------------------------------

    def storm(self, count: int, retry_after: str | None = "1", status: int = 429) -> None:
        with self.lock:
            self._faults.extend([(status, retry_after)] * count)

    def fail_next(self, count: int, status: int = 503) -> None:
        self.storm(count, None, status)

    def drop_appends(self, count: int) -> None:
        with self.lock:
            self._drops += count

    def hold(self) -> None:
        with self.lock:
            self._hold = True
            self._signal("clear")

    def release(self) -> None:
        with self.lock:
            self._hold = False
            self._signal("set")

    def _signal(self, what: str) -> None:
        loop, event = self._loop, self._release
        if loop is not None and event is not None and not loop.is_closed():
            loop.call_soon_threadsafe(getattr(event, what))

    def add_dataset(self, name: str, is_scene: bool = False) -> str:
        with self.lock:
            ds = FakeDataset(f"ds_{uuid.uuid4().hex[:20]}", name, is_scene)
            self.datasets[ds.id] = ds
            return ds.id

    # --- test views (thread-safe copies) -----------------------------------------------

    def dataset_ids(self, name: str) -> list[str]:
        with self.lock:
            return [d.id for d in self.datasets.values() if d.name == name]

    def _one(self, name: str) -> FakeDataset | None:
        ids = self.dataset_ids(name)
        assert len(ids) <= 1, f"{len(ids)} datasets named {name!r}"
        return self.datasets[ids[0]] if ids else None

    def items(self, name: str) -> dict[str, dict[str, Any]]:
        """reference_id -> item (a deep copy) of the one dataset with this name ({} if none)."""
        with self.lock:
            ds = self._one(name)
            return json.loads(json.dumps(ds.items)) if ds is not None else {}

    def blobs(self, name: str) -> dict[str, bytes]:
        """reference_id -> the bytes uploaded for it, in the one dataset with this name."""
        with self.lock:
            ds = self._one(name)
            return dict(ds.blobs) if ds is not None else {}

    def requests(self, method: str | None = None, contains: str = "") -> list[Logged]:
        with self.lock:
            return [
                r for r in self.log if (method is None or r.method == method) and contains in r.path
            ]

    def appends(self) -> list[Logged]:
        """Successful multipart appends (local bytes)."""
        return [
            r
            for r in self.requests("POST", "/append")
            if r.status == 200 and r.headers.get("Content-Type", "").startswith("multipart/")
        ]

    def job_answers(self) -> list[Logged]:
        """Successful job status polls and listings."""
        return [
            r
            for r in self.log
            if r.status == 200 and (r.path.startswith("/job/") or r.path.startswith("/jobs"))
        ]

    # --- the application ---------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=1 << 30)
        app.router.add_route("*", "/_signed/{token}", self._signed_put)
        app.router.add_route("*", PREFIX + "/{tail:.*}", self._api)
        app.on_startup.append(self._started)
        return app

    async def _started(self, app: web.Application) -> None:
        self._loop = asyncio.get_running_loop()
        self._release = asyncio.Event()
        if not self._hold:
            self._release.set()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = request.rel_url.raw_path
        path = raw[len(PREFIX) :] if raw.startswith(PREFIX) else raw
        entry = Logged(
            request.method,
            unquote(path),
            0,
            time.monotonic(),
            request.query_string,
            dict(request.headers),
        )
        with self.lock:
            self.log.append(entry)
            fault = self._faults.pop(0) if self._faults else None
        try:
            if fault is not None:
                status, retry_after = fault
                headers = {"Retry-After": retry_after} if retry_after is not None else {}
                resp: web.StreamResponse = web.json_response(
                    {"error": "Too many requests" if status == 429 else "Server error"},
                    status=status,
                    headers=headers,
                )
            elif raw.startswith(PREFIX + "/") and not self._authorized(request):
                resp = web.json_response({"error": "Invalid API key"}, status=401)
            else:
                try:
                    resp = await handler(request)
                except Rejected as e:
                    resp = web.json_response({"error": e.message}, status=e.status)
                except web.HTTPException as e:
                    allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else {}
                    resp = web.json_response({"error": e.reason}, status=e.status, headers=allow)
        except BaseException:
            entry.status = 599
            raise
        entry.status = resp.status
        return resp

    def _authorized(self, request: web.Request) -> bool:
        want = "Basic " + base64.b64encode(f"{self.api_key}:".encode()).decode()
        return request.headers.get("Authorization") == want

    async def _api(self, request: web.Request) -> web.StreamResponse:
        raw = request.rel_url.raw_path[len(PREFIX) + 1 :]
        seg = [unquote(s) for s in raw.split("/")]
        m = request.method
        route: tuple[str, ...]
        if seg[:1] == ["dataset"] and len(seg) == 2 and seg[1] in ("details", "create"):
            route = ("dataset", seg[1])
        elif seg[:1] == ["dataset"] and len(seg) >= 2:
            route = ("dataset", "*", *seg[2:3])
        elif seg[:1] == ["job"] and len(seg) in (2, 3):
            route = ("job", "*", *seg[2:3])
        elif seg in (["jobs"], ["jobs", ""]):
            route = ("jobs",)
        else:
            raise web.HTTPNotFound(text=json.dumps({"error": "Not found"}))
        table: dict[tuple[tuple[str, ...], str], Any] = {
            (("dataset", "details"), "GET"): lambda: self._details(),
            (("dataset", "create"), "POST"): lambda: self._create(request),
            (("dataset", "*"), "DELETE"): lambda: self._delete_dataset(seg[1]),
            (("dataset", "*", "append"), "POST"): lambda: self._append(request, seg[1]),
            (("dataset", "*", "signedUrl"), "GET"): lambda: self._signed_url(request, seg),
            (("dataset", "*", "refloc"), "GET"): lambda: self._refloc(seg, delete=False),
            (("dataset", "*", "refloc"), "DELETE"): lambda: self._refloc(seg, delete=True),
            (("dataset", "*", "metadata"), "POST"): lambda: self._metadata(request, seg[1]),
            (("job", "*"), "GET"): lambda: self._job(seg[1]),
            (("job", "*", "errors"), "GET"): lambda: self._job_errors(seg[1]),
        }
        if self.jobs_listing:
            table[(("jobs",), "POST")] = lambda: self._list_jobs(request)
        action = table.get((route, m))
        if action is None:
            if any(r == route for r, _ in table):
                raise web.HTTPMethodNotAllowed(m, [mm for r, mm in table if r == route])
            raise web.HTTPNotFound(text=json.dumps({"error": "Not found"}))
        return await action()

    # --- datasets ----------------------------------------------------------------------

    async def _details(self) -> web.Response:
        with self.lock:
            out = [{"id": d.id, "name": d.name, "is_public": False} for d in self.datasets.values()]
        return web.json_response(out)

    async def _create(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise Rejected(400, "name is required")
        ds_id = self.add_dataset(name, bool(body.get("is_scene")))
        return web.json_response({"dataset_id": ds_id, "name": name})

    async def _delete_dataset(self, ds_id: str) -> web.Response:
        with self.lock:
            if self.datasets.pop(ds_id, None) is None:
                raise Rejected(404, f"Dataset {ds_id} not found")
        return web.json_response({"message": "Beginning dataset deletion..."})

    def _dataset(self, ds_id: str) -> FakeDataset:
        ds = self.datasets.get(ds_id)
        if ds is None:
            raise Rejected(404, f"Dataset {ds_id} not found")
        return ds

    # --- appends: every one becomes a job ----------------------------------------------

    async def _append(self, request: web.Request, ds_id: str) -> web.StreamResponse:
        with self.lock:
            ds = self._dataset(ds_id)
            if ds.is_scene:
                raise Rejected(400, "This dataset only accepts scenes")
        files: dict[str, tuple[bytes, str]] = {}
        if request.headers.get("Content-Type", "").startswith("multipart/form-data"):
            with self.lock:
                drop = self._drops > 0
                self._drops -= int(drop)
            if drop:
                await request.content.readany()
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=500)
            items, files = await self._read_multipart(request)
        else:
            body = await self._json(request)
            rid = body.get("requestId")
            if request.query.get("async") not in ("1", "true", "True") or not isinstance(rid, str):
                raise Rejected(400, "remote items go through a signed URL: requestId, ?async=1")
            items = self._uploaded_items(ds, rid)
            for it in items:
                it["update"] = bool(body.get("update"))
        job = self._run_job(ds, self._valid(items), files)
        await self._maybe_hold()
        return web.json_response(
            {
                "job_id": job.id,
                "job_last_known_status": RUNNING,
                "job_type": job.kind,
                "job_creation_time": job.creation_time,
            }
        )

    async def _read_multipart(
        self, request: web.Request
    ) -> tuple[list[dict[str, Any]], dict[str, tuple[bytes, str]]]:
        reader = await request.multipart()
        items: list[dict[str, Any]] | None = None
        files: dict[str, tuple[bytes, str]] = {}
        order: list[str] = []
        async for part in reader:
            if part.name == "items":
                try:
                    items = json.loads(await part.read())  # type: ignore[union-attr]
                except ValueError as e:
                    raise Rejected(400, f"items is not JSON: {e}") from None
            elif part.name == "image":
                data = await part.read()  # type: ignore[union-attr]
                # aiohttp's FormData (the SDK's) percent-encodes the file name, "/" too
                name = unquote(part.filename or "") or f"#{len(order)}"  # type: ignore[union-attr]
                if name in files:
                    raise Rejected(400, f"duplicate file name {name}")
                files[name] = (bytes(data), part.headers.get("Content-Type", ""))
                order.append(name)
            else:
                raise Rejected(400, f"unexpected form field {part.name!r}")
        if not isinstance(items, list):
            raise Rejected(400, "the items field is missing or not a list")
        if len(files) > MAX_FILES:
            raise Rejected(400, f"at most {MAX_FILES} files per request, got {len(files)}")
        if len(files) != len(items):
            raise Rejected(400, f"{len(items)} items but {len(files)} image files")
        for i, it in enumerate(items):
            if not isinstance(it, dict):
                raise Rejected(400, "each item must be an object")
            url = it.get("image_url")
            if isinstance(url, str) and url not in files:
                raise Rejected(400, f"no file part named {url!r}")
            it["_file"] = url if isinstance(url, str) else order[i]
        return items, files

    def _uploaded_items(self, ds: FakeDataset, rid: str) -> list[dict[str, Any]]:
        with self.lock:
            data = self.uploads.pop((ds.id, rid), None)
        if data is None:
            raise Rejected(400, f"No upload found for requestId {rid!r}")
        items: list[dict[str, Any]] = []
        for line in data.decode().splitlines():
            if line.strip():
                try:
                    it = json.loads(line)
                except ValueError as e:
                    raise Rejected(400, f"payload is not NDJSON: {e}") from None
                if not isinstance(it, dict):
                    raise Rejected(400, "each NDJSON line must be an object")
                items.append(it)
        if len(items) > MAX_JOB_ITEMS:
            raise Rejected(400, f"at most {MAX_JOB_ITEMS} items per job")
        return items

    def _valid(self, items: list[Any]) -> list[dict[str, Any]]:
        """What fails a request as a whole: its shape, not one item's content."""
        refs = []
        for it in items:
            if not isinstance(it, dict) or not isinstance(it.get("reference_id"), str):
                raise Rejected(400, "each item needs a reference_id string")
            if not isinstance(it.setdefault("metadata", {}), dict):
                raise Rejected(400, f"metadata of {it['reference_id']} must be an object")
            if it["reference_id"] in self.refuse_refs:
                raise Rejected(400, "Invalid request")
            refs.append(it["reference_id"])
        if len(set(refs)) != len(refs):
            raise Rejected(400, "Duplicate reference IDs in the request")
        return items

    def _run_job(
        self, ds: FakeDataset, items: list[dict[str, Any]], files: dict[str, tuple[bytes, str]]
    ) -> FakeJob:
        """Store what can be stored now; each item's failure is a job error."""
        errors: list[str] = []
        with self.lock:
            self.received.extend(
                json.loads(json.dumps({k: v for k, v in it.items() if k != "_file"}))
                for it in items
            )
            for it in items:
                file = files.get(it.pop("_file")) if "_file" in it else None
                problem = self._store(ds, it, file)
                if problem:
                    errors.append(json.dumps({"item": it, "error": problem}))
            self.stored_while_held += int(self._hold and len(errors) < len(items))
            final = self.job_final or (
                "Completed"
                if not errors
                else "Errored_User"
                if len(errors) == len(items)
                else "Errored_Partial"
            )
            job = FakeJob(
                f"job_{uuid.uuid4().hex[:20]}",
                ds.id,
                errors,
                len(items),
                self.job_polls,
                final,
                time.monotonic() + self.job_seconds,
            )
            self.jobs[job.id] = job
        return job

    def _store(
        self, ds: FakeDataset, it: dict[str, Any], file: tuple[bytes, str] | None
    ) -> str | None:
        """One item into the dataset (the lock is held); the reason it failed, if it did."""
        ref = it["reference_id"]
        record: dict[str, Any] = {"reference_id": ref, "metadata": it["metadata"]}
        problem = self.reject_refs.get(ref)
        if file is not None:
            data, ctype = file
            problem = problem or self._image_problem(data)
            name = str(it.get("image_url") or "").replace("\\", "/").rsplit("/", 1)[-1]
            record["image"] = {
                "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "content_type": ctype,
                "name": name,
            }
        else:
            url = it.get("image_url")
            if not isinstance(url, str) or not url.startswith(REMOTE_SCHEMES):
                problem = problem or f"image_url {url!r} is not a remote URL"
            elif url in self.bad_urls:
                problem = problem or f"Failed to fetch image from {url}"
            record["image_url"] = url
        problem = problem or self._type_conflict(ds, [(ref, it["metadata"])])
        if problem:
            return problem
        old = ds.items.get(ref)
        if old is not None and not it.get("update"):
            return None  # ignored: the dataset keeps what it has
        record["version"] = 1 if old is None else old["version"] + 1
        ds.items[ref] = record
        ds.blobs.pop(ref, None)
        if file is not None:
            ds.blobs[ref] = file[0]
        return None

    @staticmethod
    def _image_problem(data: bytes) -> str | None:
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                im.verify()
        except Exception as e:
            return f"Could not decode image: {e}"
        if w > MAX_SIDE or h > MAX_SIDE:
            return f"Image is {w}x{h}; the maximum is {MAX_SIDE}x{MAX_SIDE}"
        return None

    @staticmethod
    def _type_conflict(ds: FakeDataset, entries: list[tuple[str, dict[str, Any]]]) -> str | None:
        """The dataset-wide rule: a key is a string everywhere or a number everywhere
        (`entries` replace the metadata of their items)."""
        if not any(md for _, md in entries):
            return None
        replaced = {ref for ref, _ in entries}
        known: dict[str, tuple[str, str]] = {}
        for ref, item in ds.items.items():
            if ref in replaced:
                continue
            for k, v in item["metadata"].items():
                if (t := _type_of(v)) is not None:
                    known.setdefault(k, (t, ref))
        for ref, md in entries:
            for k, v in md.items():
                t = _type_of(v)
                if t is None:
                    continue
                have = known.get(k)
                if have is not None and have[0] != t:
                    return (
                        f"Metadata key {k!r} of item {ref} is a {t} but a {have[0]} on "
                        f"item {have[1]}; metadata types must be consistent across the dataset"
                    )
                known.setdefault(k, (t, ref))
        return None

    async def _maybe_hold(self) -> None:
        with self.lock:
            hold = self._hold
            if hold:
                self.held += 1
        if not hold:
            return
        assert self._release is not None
        try:
            await self._release.wait()
        finally:
            with self.lock:
                self.held -= 1

    # --- remote items: the signed URL --------------------------------------------------

    async def _signed_url(self, request: web.Request, seg: list[str]) -> web.Response:
        if len(seg) != 4 or not seg[3]:
            raise web.HTTPNotFound()
        with self.lock:
            self._dataset(seg[1])
            token = uuid.uuid4().hex
            self.signed[token] = (seg[1], seg[3])
        host = request.url.origin()
        return web.json_response({"signed_url": f"{host}/_signed/{token}?X-Sig=abc"})

    async def _signed_put(self, request: web.Request) -> web.Response:
        if request.method != "PUT":
            raise web.HTTPMethodNotAllowed(request.method, ["PUT"])
        if "Authorization" in request.headers:
            raise Rejected(400, "Only one auth mechanism allowed")
        with self.lock:
            target = self.signed.get(request.match_info["token"])
        if target is None:
            raise Rejected(403, "Signature does not match")
        data = await request.read()
        with self.lock:
            self.uploads[target] = data
        return web.Response(status=200)

    # --- jobs --------------------------------------------------------------------------

    def _find_job(self, job_id: str) -> FakeJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise Rejected(404, f"Job {job_id} not found")
        return job

    async def _job(self, job_id: str) -> web.Response:
        with self.lock:
            job = self._find_job(job_id)
            status = job.observe()
        steps = job.total or 1
        done = 0 if status == RUNNING else steps
        return web.json_response(
            {
                "job_id": job.id,
                "status": status,
                "message": {"PayloadUrl": "", "errored": len(job.errors), "total": job.total},
                "job_progress": f"{done / steps:.2f}",
                "completed_steps": done,
                "total_steps": steps,
            }
        )

    async def _job_errors(self, job_id: str) -> web.Response:
        with self.lock:
            return web.json_response(list(self._find_job(job_id).errors))

    async def _list_jobs(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        ds_id, kinds = body.get("dataset_id"), body.get("job_types") or []
        since, until = _date(body.get("from_date")), _date(body.get("to_date"))
        limit = body.get("limit") or 50_000
        if not isinstance(kinds, list) or not isinstance(limit, int) or limit > 50_000:
            raise Rejected(400, "job_types must be a list and limit at most 50,000")
        out: list[dict[str, Any]] = []
        with self.lock:
            for job in sorted(self.jobs.values(), key=lambda j: j.created, reverse=True):
                if (
                    (ds_id and job.dataset != ds_id)
                    or (kinds and job.kind not in kinds)
                    or (since is not None and job.created < since)
                    or (until is not None and job.created > until)
                ):
                    continue
                status = job.observe()
                if status == "Completed" and not body.get("show_completed"):
                    continue
                out.append(
                    {
                        "job_id": job.id,
                        "job_last_known_status": status,
                        "job_type": job.kind,
                        "job_creation_time": job.creation_time,
                    }
                )
                if len(out) >= limit:
                    break
        return web.json_response(out)

    # --- items by reference_id, metadata -----------------------------------------------

    async def _refloc(self, seg: list[str], *, delete: bool) -> web.Response:
        if len(seg) != 4:
            raise web.HTTPNotFound()
        ref = seg[3]
        with self.lock:
            ds = self._dataset(seg[1])
            item = ds.items.get(ref)
            if item is None:
                raise Rejected(404, f"No item with reference_id {ref}")
            if delete:
                del ds.items[ref]
                ds.blobs.pop(ref, None)
                return web.json_response({})
            out = {
                "reference_id": ref,
                "metadata": item["metadata"],
                "original_image_url": item.get("image_url") or f"s3://scale-fake/{ds.id}/{ref}",
            }
        return web.json_response({"item": out, "annotations": {}})

    async def _metadata(self, request: web.Request, ds_id: str) -> web.Response:
        body = await self._json(request)
        entries = body.get("metadata")
        if body.get("level") not in ("item", "scene") or not isinstance(entries, list):
            raise Rejected(400, "expected {metadata: [...], level: item|scene}")
        pairs = []
        for e in entries:
            if (
                not isinstance(e, dict)
                or not isinstance(e.get("reference_id"), str)
                or not isinstance(e.get("metadata"), dict)
            ):
                raise Rejected(400, "each entry needs reference_id and a metadata object")
            pairs.append((e["reference_id"], e["metadata"]))
        with self.lock:
            ds = self._dataset(ds_id)
            merged = []
            for ref, md in pairs:
                if ref in ds.items:
                    merged.append((ref, {**ds.items[ref]["metadata"], **md}))
            conflict = self._type_conflict(ds, merged)
            if conflict:
                raise Rejected(400, conflict)
            for ref, md in merged:
                ds.items[ref]["metadata"] = md
            if request.query.get("async") == "1":
                job = FakeJob(
                    f"job_{uuid.uuid4().hex[:20]}",
                    ds.id,
                    [],
                    len(pairs),
                    self.job_polls,
                    "Completed",
                    time.monotonic() + self.job_seconds,
                    kind="metadataUpdate",
                )
                self.jobs[job.id] = job
                return web.json_response(
                    {
                        "job_id": job.id,
                        "job_last_known_status": RUNNING,
                        "job_type": job.kind,
                        "job_creation_time": job.creation_time,
                    }
                )
        return web.json_response({"dataset_id": ds_id, "message": f"Updated {len(merged)} items"})

    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise Rejected(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise Rejected(400, "the body must be a JSON object")
        return body


@contextlib.asynccontextmanager
async def serve(fake: FakeNucleus) -> AsyncIterator[str]:
    """Run `fake` on this event loop; yields its base URL (…/v1/nucleus)."""
    runner, port = await listen(fake.app())
    fake.base_url = f"http://127.0.0.1:{port}{PREFIX}"
    try:
        yield fake.base_url
    finally:
        fake.release()
        await runner.cleanup()
        fake._loop = None


class FakeNucleusThread:
    """`fake` served from a background thread with its own event loop, for tests that
    run the daemon or an SDK as a subprocess. Use as a context manager; `.url` is the
    base URL."""

    def __init__(self, fake: FakeNucleus) -> None:
        self.fake = fake
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name="fake-nucleus", daemon=True)
        self._error: BaseException | None = None

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # surfaced by start()
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self.fake) as url:
            self.url = url
            self._ready.set()
            await self._stop.wait()

    def start(self) -> str:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError("the fake Nucleus server did not start") from self._error
        return self.url

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def __enter__(self) -> FakeNucleusThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
