"""A small in-process ingestion server for the http sink's tests.

It follows daemon/ingestd/server/API.md closely enough for a client to be judged against it
(blobs verified by digest, resumable uploads that keep the bytes of an interrupted
PATCH, manifests that need their blobs, batches of items with a result each, bearer
tokens, percent-encoded item keys), keeps
everything in memory, counts what it sees, and misbehaves on request: error answers
(with Retry-After), connections cut mid-body or after the work is done, stalls, and
stopping and restarting on the same port. The real `ingestd serve` is tested end to
end elsewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import re
import secrets
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from tests.support.ports import listen

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\*|\d+)$")
READ = 1 << 16


@dataclass
class Fault:
    """One misbehaviour for one request."""

    status: int | None = None  # answer this without doing the work
    retry_after: str | None = None
    error: str = "injected failure"
    code: str = "injected"
    stall: float = 0.0  # sleep before anything else (or, with hang_after, mid-body)
    cut_after: int | None = None  # read this many body bytes, then cut the connection
    hang_after: int | None = None  # read this many body bytes, then stop reading `stall` s
    cut_response: bool = False  # do the work, then cut instead of answering


@dataclass
class Upload:
    digest: str | None
    hasher: Any = field(default_factory=hashlib.sha256)
    offset: int = 0
    data: bytearray | None = None


def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, "code": code, **extra}, status=status)


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


class FakeIngestServer:
    def __init__(
        self, tokens: set[str] | None = None, *, keep_bytes: bool = True, seed: int = 0
    ) -> None:
        self.tokens = set(tokens or ())
        self.keep_bytes = keep_bytes  # False: only digests and sizes (memory tests)
        self.max_body: int | None = None
        self.batch_route = True  # False: answer POST /v1/batch 404, as an older server
        self.blobs: dict[str, bytes | None] = {}
        self.blob_sizes: dict[str, int] = {}
        self.datasets: set[str] = set()
        self.items: dict[str, dict[str, dict[str, Any]]] = {}
        self.uploads: dict[str, Upload] = {}
        # what happened
        self.bytes_received = 0
        self.requests: Counter[tuple[str, str]] = Counter()  # (method, route)
        self.statuses: Counter[int] = Counter()
        self.blob_writes: Counter[str] = Counter()  # digest -> times a new blob was stored
        self.item_writes: Counter[tuple[str, str]] = Counter()  # (dataset, key) -> changes
        self.auth_headers: list[str] = []
        self.chunked_bodies = 0
        # how to misbehave
        self.error_rate = 0.0
        self.error_statuses: tuple[int, ...] = (500, 503, 429)
        self.retry_after: str | None = None
        self.drop_rate = 0.0
        self.fault_routes: set[str] | None = None  # None: every /v1 route
        self.scripted: list[tuple[str, str, Fault]] = []  # (method, route, fault)
        self.rng = random.Random(seed)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle --------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (again, on the same port after a stop), keeping all state."""
        app = web.Application(client_max_size=1 << 40)
        # [\s\S]: a key may hold an encoded newline, which aiohttp decodes before matching.
        app.router.add_route("*", r"/{tail:[\s\S]*}", self._handle)
        # A short shutdown: a stop is an outage or a kill, not a graceful drain.
        self._runner, self.port = await listen(
            app, self.port, handler_cancellation=True, shutdown_timeout=0.2
        )

    async def stop(self) -> None:
        """Stop listening and drop open connections (an outage or a killed server)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def script(self, method: str, route: str, fault: Fault, times: int = 1) -> None:
        """The next `times` requests matching (method, route) get `fault`."""
        self.scripted.extend([(method, route, fault)] * times)

    # --- dispatch ---------------------------------------------------------------------

    @staticmethod
    def _route(raw_path: str) -> tuple[str | None, list[str]]:
        parts = raw_path.split("/")[1:]
        if raw_path == "/healthz":
            return "healthz", []
        if len(parts) < 2 or parts[0] != "v1":
            return None, []
        kind, rest = parts[1], parts[2:]
        if kind == "batch" and not rest:
            return "batch", []
        if kind == "blobs" and len(rest) == 1:
            return "blob", [unquote(rest[0])]
        if kind == "uploads":
            if not rest:
                return "uploads", []
            if len(rest) == 1:
                return "upload", rest
        if kind == "datasets" and rest:
            if len(rest) == 1:
                return "dataset", [unquote(rest[0])]
            if rest[1] == "items":
                if len(rest) == 2:
                    return "items", [unquote(rest[0])]
                return "item", [unquote(rest[0]), *rest[2:]]  # item segments still encoded
        return None, []

    def _fault(self, method: str, route: str) -> Fault | None:
        for i, (m, r, fault) in enumerate(self.scripted):
            if m == method and r == route:
                del self.scripted[i]
                return fault
        if route == "healthz" or (self.fault_routes is not None and route not in self.fault_routes):
            return None
        roll = self.rng.random()
        if roll < self.error_rate:
            status = self.rng.choice(self.error_statuses)
            return Fault(status=status, retry_after=self.retry_after if status != 500 else None)
        if roll < self.error_rate + self.drop_rate:
            # Half cut the body short, half do the work and lose the answer: a client
            # must survive both without duplicating anything.
            if self.rng.random() < 0.5:
                return Fault(cut_after=self.rng.randrange(0, 4096))
            return Fault(cut_response=True)
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        route, args = self._route(request.rel_url.raw_path)
        self.requests[(request.method, route or "?")] += 1
        if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.chunked_bodies += 1
        response = await self._answer(request, route, args)
        self.statuses[response.status] += 1
        return response

    async def _answer(
        self, request: web.Request, route: str | None, args: list[str]
    ) -> web.StreamResponse:
        if route is None:
            return _error(404, "not_found", "no such route")
        if route == "healthz":
            return web.json_response({"ok": True})
        auth = request.headers.get("Authorization", "")
        self.auth_headers.append(auth)
        if self.tokens and not any(
            hmac.compare_digest(auth.encode(), f"Bearer {t}".encode()) for t in self.tokens
        ):
            return _error(401, "unauthorized", "missing or wrong token")
        fault = self._fault(request.method, route)
        if fault is not None:
            if fault.stall and fault.hang_after is None:
                await asyncio.sleep(fault.stall)
            if fault.status is not None:
                response = _error(fault.status, fault.code, fault.error)
                if fault.retry_after is not None:
                    response.headers["Retry-After"] = fault.retry_after
                return response
            if fault.cut_after is not None and not (
                route == "upload" and request.method == "PATCH"
            ):
                await self._read(request, limit=fault.cut_after)
                return self._cut(request)
        handler = getattr(self, f"_{route}_{request.method.lower()}", None)
        if handler is None:
            return _error(405, "method_not_allowed", f"{request.method} not allowed here")
        response = await handler(request, *args, fault=fault)
        if fault is not None and fault.cut_response:
            return self._cut(request)
        return response

    def _cut(self, request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=599)  # never reaches the client

    async def _read(
        self, request: web.Request, limit: int | None = None, fault: Fault | None = None
    ) -> bytes:
        """Read (at most `limit` bytes of) the body, counting it."""
        out = bytearray()
        async for chunk in self._chunks(request, limit, fault):
            out += chunk
        return bytes(out)

    async def _chunks(self, request: web.Request, limit: int | None, fault: Fault | None):
        hang_after = fault.hang_after if fault is not None else None
        got = 0
        while True:
            want = READ
            if limit is not None:
                want = min(want, limit - got)
                if want <= 0:
                    return
            if hang_after is not None and got >= hang_after:
                await asyncio.sleep(fault.stall if fault else 0)
                hang_after = None
            chunk = await request.content.read(want)
            if not chunk:
                return
            got += len(chunk)
            self.bytes_received += len(chunk)
            yield chunk

    # --- datasets ---------------------------------------------------------------------

    @staticmethod
    def _bad_dataset(name: str) -> web.Response | None:
        if not 1 <= len(name) <= 128 or "/" in name or "\0" in name or name in (".", ".."):
            return _error(400, "bad_name", f"bad dataset name {name!r}")
        return None

    async def _dataset_put(self, request: web.Request, name: str, **_: Any) -> web.Response:
        if bad := self._bad_dataset(name):
            return bad
        created = name not in self.datasets
        self.datasets.add(name)
        return web.json_response(
            {"dataset": name, "created": created}, status=201 if created else 200
        )

    async def _dataset_head(self, request: web.Request, name: str, **_: Any) -> web.Response:
        return web.Response(status=200 if name in self.datasets else 404)

    # --- blobs ------------------------------------------------------------------------

    async def _blob_head(self, request: web.Request, digest: str, **_: Any) -> web.Response:
        if not DIGEST.match(digest):
            return _error(400, "bad_digest", "bad digest")
        if digest not in self.blob_sizes:
            return web.Response(status=404)
        return web.Response(status=200, headers={"Content-Length": str(self.blob_sizes[digest])})

    async def _blob_put(
        self, request: web.Request, digest: str, fault: Fault | None = None
    ) -> web.Response:
        if not DIGEST.match(digest):
            return _error(400, "bad_digest", "bad digest")
        if self.max_body is not None and (request.content_length or 0) > self.max_body:
            return _error(413, "too_large", f"body over {self.max_body} bytes")
        h = hashlib.sha256()
        data = bytearray() if self.keep_bytes else None
        size = 0
        async for chunk in self._chunks(request, None, fault):
            h.update(chunk)
            size += len(chunk)
            if data is not None:
                data += chunk
        actual = "sha256:" + h.hexdigest()
        if actual != digest:
            return _error(
                400, "digest_mismatch", "content does not match", expected=digest, actual=actual
            )
        return self._store(digest, size, data)

    def _store(self, digest: str, size: int, data: bytearray | None) -> web.Response:
        created = digest not in self.blob_sizes
        if created:
            self.blob_sizes[digest] = size
            self.blobs[digest] = bytes(data) if data is not None else None
            self.blob_writes[digest] += 1
        return web.json_response(
            {"digest": digest, "size": size, "created": created}, status=201 if created else 200
        )

    # --- resumable uploads ------------------------------------------------------------

    async def _uploads_post(self, request: web.Request, **_: Any) -> web.Response:
        body = await self._read(request)
        meta = json.loads(body) if body else {}
        upload_id = secrets.token_hex(8)
        self.uploads[upload_id] = Upload(
            meta.get("digest"), data=bytearray() if self.keep_bytes else None
        )
        return web.json_response(
            {"id": upload_id, "offset": 0},
            status=201,
            headers={"Location": f"/v1/uploads/{upload_id}"},
        )

    async def _upload_head(self, request: web.Request, upload_id: str, **_: Any) -> web.Response:
        up = self.uploads.get(upload_id)
        if up is None:
            return web.Response(status=404)
        return web.Response(status=200, headers={"Upload-Offset": str(up.offset)})

    async def _append(
        self, request: web.Request, up: Upload, fault: Fault | None
    ) -> web.Response | None:
        """Append the body at Content-Range; bytes count as they arrive, so a cut keeps
        what came (as the real server does)."""
        m = RANGE.match(request.headers.get("Content-Range", ""))
        if m is None:
            return _error(400, "bad_range", "Content-Range: bytes <start>-<end>/* needed")
        start, end = int(m.group(1)), int(m.group(2))
        if start != up.offset:
            return _error(416, "bad_offset", "wrong offset", offset=up.offset)
        cut = fault.cut_after if fault is not None else None
        async for chunk in self._chunks(request, cut, fault):
            up.hasher.update(chunk)
            up.offset += len(chunk)
            if up.data is not None:
                up.data += chunk
        if cut is not None:
            return self._cut(request)
        if up.offset != end + 1:
            return _error(400, "bad_range", "body length does not match Content-Range")
        return None

    async def _upload_patch(
        self, request: web.Request, upload_id: str, fault: Fault | None = None
    ) -> web.StreamResponse:
        up = self.uploads.get(upload_id)
        if up is None:
            return _error(404, "not_found", "no such upload")
        if (problem := await self._append(request, up, fault)) is not None:
            return problem
        return web.json_response(
            {"offset": up.offset}, status=202, headers={"Upload-Offset": str(up.offset)}
        )

    async def _upload_put(
        self, request: web.Request, upload_id: str, fault: Fault | None = None
    ) -> web.StreamResponse:
        up = self.uploads.get(upload_id)
        if up is None:
            return _error(404, "not_found", "no such upload")
        digest = request.query.get("digest", "")
        if not DIGEST.match(digest):
            return _error(400, "bad_digest", "bad digest")
        if (request.content_length or 0) > 0 and (
            problem := await self._append(request, up, fault)
        ) is not None:
            return problem
        actual = "sha256:" + up.hasher.hexdigest()
        del self.uploads[upload_id]
        if actual != digest:
            return _error(
                400, "digest_mismatch", "content does not match", expected=digest, actual=actual
            )
        return self._store(digest, up.offset, up.data)

    async def _upload_delete(self, request: web.Request, upload_id: str, **_: Any) -> web.Response:
        self.uploads.pop(upload_id, None)
        return web.Response(status=204)

    # --- items ------------------------------------------------------------------------

    @staticmethod
    def _key(segments: list[str]) -> tuple[str, str] | web.Response:
        decoded = [unquote(s) for s in segments]
        if sum(len(s.encode()) for s in decoded) > 1024:
            return _error(400, "bad_path", "key too long")
        for s in decoded:
            if s in ("", ".", "..") or "\0" in s or len(s.encode()) > 255:
                return _error(400, "bad_path", f"bad path segment {s!r}")
        return "/" + "/".join(decoded[:-1]), decoded[-1]

    async def _item_put(
        self, request: web.Request, dataset: str, *segments: str, **_: Any
    ) -> web.Response:
        if bad := self._bad_dataset(dataset):
            return bad
        key = self._key(list(segments))
        if isinstance(key, web.Response):
            return key
        doc = json.loads(await self._read(request))
        status, body = self._upsert(dataset, *key, doc.get("slots", []), doc.get("metadata", {}))
        return web.json_response(body, status=status)

    def _upsert(
        self, dataset: str, path: str, name: str, slots: list[Any], metadata: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        missing = sorted(
            {
                f["digest"]
                for s in slots
                for f in s.get("files", [])
                if "digest" in f and "url" not in f and f["digest"] not in self.blob_sizes
            }
        )
        if missing:
            return 409, {"error": "blobs missing", "code": "missing_blobs", "missing": missing}
        self.datasets.add(dataset)
        items = self.items.setdefault(dataset, {})
        full = f"{path.rstrip('/')}/{name}"
        current = items.get(full)
        if (
            current is not None
            and _same(current["slots"], slots)
            and _same(current["metadata"], metadata)
        ):
            version, changed = current["version"], False
        else:
            version, changed = (1 if current is None else current["version"] + 1), True
            items[full] = {
                "key": full,
                "path": path,
                "name": name,
                "version": version,
                "slots": slots,
                "metadata": metadata,
            }
            self.item_writes[(dataset, full)] += 1
        body = {"key": full, "path": path, "name": name, "version": version, "changed": changed}
        return (201 if current is None else 200), body

    async def _batch_post(self, request: web.Request, fault: Fault | None = None) -> web.Response:
        """POST /v1/batch: the framing of API.md, each blob verified, a result per item."""
        if not self.batch_route:
            return _error(404, "not_found", "no such route")
        if self.max_body is not None and (request.content_length or 0) > self.max_body:
            return _error(413, "too_large", f"body over {self.max_body} bytes")
        body = await self._read(request, fault=fault)
        if len(body) < 8 or body[:4] != b"IDB1":
            return _error(400, "bad_batch", "not a batch body")
        (n,) = struct.unpack(">I", body[4:8])
        header = json.loads(body[8 : 8 + n])
        offset = 8 + n
        refused: dict[str, dict[str, Any]] = {}
        for b in header["blobs"]:
            data = body[offset : offset + b["size"]]
            offset += b["size"]
            actual = "sha256:" + hashlib.sha256(data).hexdigest()
            if len(data) != b["size"]:
                return _error(400, "interrupted", "the body ended early")
            if actual != b["digest"]:
                refused[b["digest"]] = {
                    "status": 400,
                    "code": "digest_mismatch",
                    "error": "content does not match",
                    "expected": b["digest"],
                    "actual": actual,
                }
                continue
            self._store(b["digest"], len(data), bytearray(data) if self.keep_bytes else None)
        results = []
        for it in header["items"]:
            digests = [f.get("digest") for s in it["slots"] for f in s["files"]]
            bad = next((refused[d] for d in digests if d in refused), None)
            if bad is not None:
                results.append(bad)
                continue
            segments = [s for s in it["path"].split("/") if s] + [it["name"]]
            if any(s in (".", "..") or "\0" in s for s in segments):
                results.append({"status": 400, "code": "bad_path", "error": "bad path segment"})
                continue
            status, answer = self._upsert(
                it["dataset"], it["path"], it["name"], it["slots"], it.get("metadata", {})
            )
            results.append({"status": status, **answer})
        return web.json_response({"results": results})

    async def _item_delete(
        self, request: web.Request, dataset: str, *segments: str, **_: Any
    ) -> web.Response:
        key = self._key(list(segments))
        if isinstance(key, web.Response):
            return key
        full = f"{key[0].rstrip('/')}/{key[1]}"
        if self.items.get(dataset, {}).pop(full, None) is None:
            return _error(404, "not_found", f"no item {full}")
        return web.Response(status=204)

    async def _items_get(self, request: web.Request, dataset: str, **_: Any) -> web.Response:
        if dataset not in self.datasets:
            return _error(404, "not_found", f"no dataset {dataset}")
        prefix = request.query.get("prefix", "")
        limit = min(int(request.query.get("limit", "500")), 5000)
        cursor = request.query.get("cursor", "")
        keys = sorted(k for k in self.items.get(dataset, {}) if k.startswith(prefix) and k > cursor)
        page = keys[:limit]
        return web.json_response(
            {
                "items": [self.items[dataset][k] for k in page],
                "next_cursor": page[-1] if len(keys) > limit else None,
            }
        )
