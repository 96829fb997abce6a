"""`ingestd serve`: the ingestion HTTP API (daemon/ingestd/server/API.md) over the embedded store.

Bytes first, then the manifest, like an OCI registry: clients put blobs (whole, or in
resumable pieces for big ones), then upsert items that reference them by digest.

Every request body is streamed (uploads.pump): nothing reads a body whole, except
JSON bodies, which are bounded (16 MiB for manifests). Blocking work — file writes,
hashing, fsync, SQLite — runs on the app's thread pool, never on the event loop.

Handlers are one function per route and report failures by raising ApiError; the
`observe` middleware turns those (and aiohttp's own 404/405) into the JSON error
shape, and records metrics and one log line per request. Headers are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import signal
import sqlite3
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog
from aiohttp import hdrs, web

from ingestd.dashboard import add_dashboard_routes
from ingestd.server.auth import ServeError, TokenAuth, check_bind, load_tokens
from ingestd.server.batch import BATCH_MAX, post_batch
from ingestd.server.common import BYTES_IN as _BYTES_IN
from ingestd.server.common import ERROR_CODE as _ERROR_CODE
from ingestd.server.common import STATE, ApiError, Manifest, ServerState, error
from ingestd.server.common import blob_size as _blob_size
from ingestd.server.common import body_length as _body_length
from ingestd.server.common import check_blobs as _check_blobs
from ingestd.server.common import check_manifest as _check_manifest
from ingestd.server.common import count_bytes as _count_bytes
from ingestd.server.common import dataset_of as _dataset
from ingestd.server.common import digest as _digest
from ingestd.server.common import item_location as _item_location
from ingestd.server.common import read_json as _read_json
from ingestd.server.common import route as _route
from ingestd.server.common import state as _state
from ingestd.server.uploads import (
    CHUNK,
    PumpResult,
    Upload,
    UploadBusy,
    UploadNotFound,
    Uploads,
    pump,
)
from ingestd.store import DigestMismatch, Store, StoreIOError
from ingestd.store.blobs import BlobWrite, BlobWriter

# The CLI imports these from here: the server's whole public face in one module.
__all__ = ["STATE", "ServeError", "load_tokens", "make_app", "serve"]

T = TypeVar("T")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8750
DEFAULT_MAX_BODY = 8 << 30  # blobs and uploads
MANIFEST_MAX = 16 << 20
SMALL_JSON_MAX = 64 << 10  # POST /v1/uploads
DEFAULT_LIMIT = 500
MAX_LIMIT = 5000
BODY_IDLE_TIMEOUT_S = 60.0  # a body that sends nothing for this long counts as interrupted
EXPIRY_INTERVAL_S = 3600.0
IO_THREADS = 16

log = structlog.get_logger("ingestd.serve")


# --- validation --------------------------------------------------------------------


def _content_range(request: web.Request) -> tuple[int, int]:
    """`bytes <start>-<end>/*` or `/<total>`, end inclusive."""
    value = request.headers.get(hdrs.CONTENT_RANGE, "")
    unit, _, spec = value.strip().partition(" ")
    span, _, total = spec.partition("/")
    start_s, _, end_s = span.partition("-")
    if (
        unit != "bytes"
        or not (start_s.isdigit() and end_s.isdigit())
        or not (total == "*" or total.isdigit())
    ):
        raise ApiError(
            400, "bad_range", f"want Content-Range: bytes <start>-<end>/*, got {value!r}"
        )
    start, end = int(start_s), int(end_s)
    if end < start or (total != "*" and end >= int(total)):
        raise ApiError(400, "bad_range", f"empty or impossible Content-Range {value!r}")
    return start, end


async def _pump(
    request: web.Request, write: Callable[[list[bytes]], None] | None, limit: int
) -> PumpResult:
    st = _state(request)
    assert st.executor is not None, "the app is not running"
    return await pump(
        request.content,
        write,
        st.executor,
        limit=limit,
        on_bytes=_count_bytes(request),
        idle_timeout=st.body_timeout,
    )


# --- blocking steps (run on the thread pool) ----------------------------------------


def _finish_blob(writer: BlobWriter, tail: list[bytes], digest: str) -> BlobWrite:
    # The last pieces and the commit in one trip to a thread: for small blobs, the only one.
    writer.write_many(tail)
    return writer.commit(digest)


def _upsert(
    store: Store, dataset: str, path: str, name: str, manifest: Manifest
) -> tuple[int, bool]:
    slots, metadata, sizes = manifest
    _check_blobs(sizes, lambda d: _blob_size(store, d))
    try:
        return store.catalog.upsert_item(dataset, path, name, slots, metadata)
    except (ValueError, TypeError) as e:
        raise ApiError(400, "bad_manifest", str(e)) from None


def _list_page(
    store: Store, dataset: str, prefix: str | None, limit: int, after: str | None
) -> list[dict[str, Any]] | None:
    if not store.catalog.has_dataset(dataset):
        return None
    return store.catalog.list_items(dataset, prefix=prefix, limit=limit + 1, after_key=after)


# --- service routes ------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def metrics(request: web.Request) -> web.Response:
    m = _state(request).metrics
    return web.Response(body=m.render(), headers={hdrs.CONTENT_TYPE: m.content_type})


# --- datasets ------------------------------------------------------------------------


async def put_dataset(request: web.Request) -> web.Response:
    st, dataset = _state(request), _dataset(request)
    store, _ = st.opened
    created = await st.run(store.catalog.ensure_dataset, dataset)
    return web.json_response(
        {"dataset": dataset, "created": created}, status=201 if created else 200
    )


async def head_dataset(request: web.Request) -> web.Response:
    st, dataset = _state(request), _dataset(request)
    store, _ = st.opened
    exists = await st.run(store.catalog.has_dataset, dataset)
    return web.Response(status=200 if exists else 404)


# --- blobs ---------------------------------------------------------------------------


async def head_blob(request: web.Request) -> web.Response:
    st, digest = _state(request), _digest(request.match_info["digest"])
    store, _ = st.opened
    size = await st.run(_blob_size, store, digest)
    if size is None:
        return web.Response(status=404)
    # No body, but the size of the GET it stands for, as HEAD answers do.
    return web.Response(status=200, headers={hdrs.CONTENT_LENGTH: str(size)})


async def put_blob(request: web.Request) -> web.Response:
    st, digest = _state(request), _digest(request.match_info["digest"])
    store, _ = st.opened
    length = _body_length(request, st.max_body)
    written: BlobWrite | None = None
    if length is None or length > CHUNK:
        # Big and already stored: take the body without writing it anywhere.
        size = await st.run(_blob_size, store, digest)
        if size is not None:
            await _discard_body(request, st.max_body)
            written = BlobWrite(digest, size, created=False)
    if written is None:
        written = await _receive_blob(request, store, digest)
    return web.json_response(
        {"digest": written.digest, "size": written.size, "created": written.created},
        status=201 if written.created else 200,
    )


async def _discard_body(request: web.Request, limit: int) -> None:
    result = await _pump(request, None, limit)
    result.raise_if_cancelled()
    if result.overflow:
        raise ApiError(413, "too_large", f"body over the {limit}-byte limit")


async def _receive_blob(request: web.Request, store: Store, digest: str) -> BlobWrite:
    """Stream the body into a new blob, verified against `digest` before it exists."""
    st = _state(request)
    writer = store.blobs.begin()
    try:
        result = await _pump(request, writer.write_many, st.max_body)
        result.raise_if_cancelled()
        if result.overflow:
            raise ApiError(413, "too_large", f"body over the {st.max_body}-byte limit")
        if result.interrupted:
            raise ApiError(400, "interrupted", "the body stopped early; nothing stored")
        return await st.run(_finish_blob, writer, result.tail, digest)
    except DigestMismatch as e:
        raise ApiError(
            400,
            "digest_mismatch",
            "body does not hash to the digest; nothing stored",
            expected=e.expected,
            actual=e.actual,
        ) from None
    finally:
        if not writer.done:
            await asyncio.shield(st.run(writer.abort))


# --- resumable uploads ---------------------------------------------------------------


def _upload_id(request: web.Request) -> str:
    return request.match_info["upload_id"]


async def post_upload(request: web.Request) -> web.Response:
    st = _state(request)
    _, uploads = st.opened
    body = await _read_json(request, SMALL_JSON_MAX) if request.body_exists else None
    body = {} if body is None else body
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "body must be a JSON object")
    declared: dict[str, Any] = {}
    if body.get("digest") is not None:
        declared["digest"] = _digest(body["digest"])
    size = body.get("size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ApiError(400, "bad_json", "'size' must be a non-negative integer")
        if size > st.max_body:
            raise ApiError(413, "too_large", f"{size} bytes is over the {st.max_body}-byte limit")
        declared["size"] = size
    try:
        found = await uploads.find(declared)
    except UploadNotFound:  # completed or discarded meanwhile
        found = None
    if found is not None:
        offset = await uploads.settled_offset(found.id)
        return web.json_response(
            {"id": found.id, "offset": offset},
            status=200,
            headers={hdrs.LOCATION: f"/v1/uploads/{found.id}"},
        )
    up = await uploads.create(declared)
    location = f"/v1/uploads/{up.id}"
    return web.json_response(
        {"id": up.id, "offset": 0}, status=201, headers={hdrs.LOCATION: location}
    )


async def head_upload(request: web.Request) -> web.Response:
    _, uploads = _state(request).opened
    offset = await uploads.settled_offset(_upload_id(request))
    return web.Response(
        status=200, headers={"Upload-Offset": str(offset), hdrs.CACHE_CONTROL: "no-store"}
    )


async def _append(request: web.Request, uploads: Uploads, up: Upload) -> int:
    """Append the body (described by Content-Range) at the upload's offset."""
    st = _state(request)
    start, end = _content_range(request)
    if start != up.offset:
        raise ApiError(
            416,
            "bad_offset",
            f"chunk starts at {start} but the upload holds {up.offset} bytes",
            offset=up.offset,
        )
    if end + 1 > st.max_body:
        raise ApiError(413, "too_large", f"upload would exceed the {st.max_body}-byte limit")
    length = end - start + 1
    if request.content_length is not None and request.content_length != length:
        raise ApiError(
            400,
            "bad_range",
            f"Content-Length {request.content_length} != {length} bytes of Content-Range",
        )
    result = await uploads.append(up, request.content, length, _count_bytes(request))
    if result.interrupted:
        raise ApiError(400, "interrupted", "the body ended early", offset=up.offset)
    if result.overflow or result.received != length:
        raise ApiError(
            400, "bad_range", "body length differs from its Content-Range", offset=up.offset
        )
    return up.offset


async def patch_upload(request: web.Request) -> web.Response:
    _, uploads = _state(request).opened
    async with uploads.locked(_upload_id(request)) as up:
        offset = await _append(request, uploads, up)
    return web.json_response({"offset": offset}, status=202, headers={"Upload-Offset": str(offset)})


async def put_upload(request: web.Request) -> web.Response:
    st = _state(request)
    _, uploads = st.opened
    async with uploads.locked(_upload_id(request)) as up:
        digest = _digest(request.query.get("digest") or up.declared.get("digest"))
        if hdrs.CONTENT_RANGE in request.headers:
            await _append(request, uploads, up)
        else:
            # No Content-Range: the body must be empty (limit 0 flags any byte).
            result = await _pump(request, None, 0)
            result.raise_if_cancelled()
            if result.overflow:
                raise ApiError(400, "bad_range", "a final chunk needs a Content-Range")
        try:
            written = await uploads.complete(up, digest)
        except DigestMismatch as e:
            raise ApiError(
                400,
                "digest_mismatch",
                "upload does not hash to the digest; upload discarded",
                expected=e.expected,
                actual=e.actual,
            ) from None
    return web.json_response(
        {"digest": written.digest, "size": written.size, "created": written.created}, status=201
    )


async def delete_upload(request: web.Request) -> web.Response:
    _, uploads = _state(request).opened
    async with uploads.locked(_upload_id(request)) as up:
        await uploads.discard(up)
    return web.Response(status=204)


# --- items ---------------------------------------------------------------------------


async def put_item(request: web.Request) -> web.Response:
    st = _state(request)
    store, _ = st.opened
    dataset, path, name = _item_location(request)
    manifest = _check_manifest(await _read_json(request, MANIFEST_MAX))
    version, changed = await st.run(_upsert, store, dataset, path, name, manifest)
    created = changed and version == 1
    st.metrics.item(201 if created else 200, changed)
    return web.json_response(
        {
            "key": f"{path.rstrip('/')}/{name}",
            "path": path,
            "name": name,
            "version": version,
            "changed": changed,
        },
        status=201 if created else 200,
    )


async def delete_item(request: web.Request) -> web.Response:
    st = _state(request)
    store, _ = st.opened
    dataset, path, name = _item_location(request)
    if not await st.run(store.catalog.delete_item, dataset, path, name):
        raise ApiError(404, "not_found", f"no item {path.rstrip('/')}/{name} in {dataset!r}")
    return web.Response(status=204)


def _encode_cursor(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_cursor", "cursor is not one this server gave out") from None


def _limit(value: str | None) -> int:
    if value is None or value == "":
        return DEFAULT_LIMIT
    if not value.isdigit() or int(value) < 1:
        raise ApiError(400, "bad_limit", f"limit must be a positive integer, got {value!r}")
    return min(int(value), MAX_LIMIT)


async def list_items(request: web.Request) -> web.Response:
    st = _state(request)
    store, _ = st.opened
    dataset = _dataset(request)
    limit = _limit(request.query.get("limit"))
    cursor = request.query.get("cursor")
    after = _decode_cursor(cursor) if cursor else None
    prefix = request.query.get("prefix") or None
    items = await st.run(_list_page, store, dataset, prefix, limit, after)
    if items is None:
        raise ApiError(404, "not_found", f"no dataset {dataset!r}")
    # One row more than asked says whether another page exists, without a count query.
    next_cursor = _encode_cursor(items[limit - 1]["key"]) if len(items) > limit else None
    return web.json_response({"items": items[:limit], "next_cursor": next_cursor})


# --- middleware ----------------------------------------------------------------------

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}


def _error_from(exc: Exception) -> web.Response:
    """The JSON error for an exception a handler let through."""
    if isinstance(exc, ApiError):
        return error(exc.status, exc.code, exc.message, headers=exc.headers, **exc.extra)
    if isinstance(exc, UploadNotFound):
        return error(404, "not_found", "no such upload (unknown, completed, deleted or expired)")
    if isinstance(exc, UploadBusy):
        return error(
            503, "busy", "another request is writing this upload", headers={"Retry-After": "1"}
        )
    if isinstance(exc, web.HTTPException):
        code = _HTTP_CODES.get(exc.status, "http_error")
        # Keep headers such as Allow; the body (and so its type and length) is ours.
        headers = {
            k: v
            for k, v in exc.headers.items()
            if k.lower() not in ("content-type", "content-length")
        }
        return error(exc.status, code, exc.reason, headers=headers)
    if isinstance(exc, StoreIOError):
        if exc.errno == errno.ENOSPC:
            return error(507, "no_space", "the store is out of disk space")
        return error(500, "store_error", f"writing the store failed: {exc.strerror}")
    if isinstance(exc, sqlite3.OperationalError):
        return error(503, "busy", "the catalog is busy", headers={"Retry-After": "1"})
    return error(500, "internal", "internal server error")


@web.middleware
async def observe(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Outermost: error shape, metrics and the request log line (never headers)."""
    st = _state(request)
    started = time.perf_counter()
    route = _route(request)
    status = 499  # the client went away and the handler was cancelled
    try:
        try:
            resp = await handler(request)
        except Exception as e:
            if not isinstance(e, ApiError | UploadNotFound | UploadBusy | web.HTTPException):
                # A plain-text traceback, not exc_info: console renderers may show each
                # frame's locals, and a frame may hold the Authorization header.
                log.error(
                    "request_failed",
                    method=request.method,
                    route=route,
                    error=f"{type(e).__name__}: {e}",
                    traceback="".join(traceback.format_exception(e)),
                )
            resp = _error_from(e)
        status = resp.status
        code = resp.get(_ERROR_CODE)
        if code is not None:
            st.metrics.error(code)
        if request.body_exists and not request.content.is_eof():
            # Answered without reading the whole body (401, 413, ...): close rather
            # than read and discard what may be gigabytes.
            resp.force_close()
        return resp
    finally:
        seconds = time.perf_counter() - started
        st.metrics.observe(request.method, route, status, seconds)
        log.info(
            "request",
            method=request.method,
            route=route,
            status=status,
            duration_ms=round(seconds * 1000, 2),
            bytes_in=request.get(_BYTES_IN, 0),
        )


@web.middleware
async def authenticate(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path.startswith("/v1") and not _state(request).auth.allows(
        request.headers.get(hdrs.AUTHORIZATION)
    ):
        raise ApiError(
            401,
            "unauthorized",
            "missing or wrong bearer token",
            headers={hdrs.WWW_AUTHENTICATE: "Bearer"},
        )
    return await handler(request)


def _expect_handler(
    limit: Callable[[ServerState], int],
) -> Callable[[web.Request], Awaitable[None]]:
    """Answer `Expect: 100-continue` with 100 only when the request will be taken.
    Otherwise send nothing yet: the handler's 401 or 413 is then the answer, and the
    client never sends a body we would refuse."""

    async def expect(request: web.Request) -> None:
        if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
            raise web.HTTPExpectationFailed(text="unknown Expect")
        st = _state(request)
        length = request.content_length
        if not st.auth.allows(request.headers.get(hdrs.AUTHORIZATION)) or (
            length is not None and length > limit(st)
        ):
            return
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    return expect


# --- the app -------------------------------------------------------------------------


async def _expire_loop(uploads: Uploads) -> None:
    while True:
        try:
            removed = await uploads.expire()
            if removed:
                log.info("uploads_expired", count=removed)
        except OSError as e:
            log.warning("uploads_expiry_failed", error=str(e))
        await asyncio.sleep(EXPIRY_INTERVAL_S)


def _open_uploads(st: ServerState) -> Uploads:
    assert st.store is not None and st.executor is not None
    return Uploads(st.store_root, st.store.blobs, st.executor, idle_timeout=st.body_timeout)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    st = app[STATE]
    st.executor = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="ingestd-serve")
    # Opening creates directories, the catalog, and removes stale temps: not on the loop.
    st.store = await st.run(Store.open, st.store_root)
    st.uploads = await st.run(_open_uploads, st)
    expiry = asyncio.create_task(_expire_loop(st.uploads))
    try:
        yield
    finally:
        expiry.cancel()
        await asyncio.gather(expiry, return_exceptions=True)
        store, st.store, st.uploads = st.store, None, None
        await st.run(store.close)
        executor, st.executor = st.executor, None
        await asyncio.to_thread(executor.shutdown, True)


def make_app(
    store_root: Path,
    tokens: Sequence[str] = (),
    max_body: int = DEFAULT_MAX_BODY,
    *,
    body_timeout: float = BODY_IDLE_TIMEOUT_S,
) -> web.Application:
    """The aiohttp application over the store at `store_root`. The store is opened when
    the app starts (runner setup) and closed when it stops."""
    app = web.Application(middlewares=[observe, authenticate])
    app[STATE] = ServerState(Path(store_root), TokenAuth(tokens), max_body, body_timeout)
    app.cleanup_ctx.append(_lifecycle)

    big = _expect_handler(lambda st: st.max_body)
    manifest = _expect_handler(lambda st: MANIFEST_MAX)
    batch = _expect_handler(lambda st: min(BATCH_MAX, st.max_body))
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/metrics", metrics)
    r.add_route("PUT", "/v1/datasets/{dataset}", put_dataset)
    r.add_route("HEAD", "/v1/datasets/{dataset}", head_dataset)
    r.add_route("HEAD", "/v1/blobs/{digest}", head_blob)
    r.add_route("PUT", "/v1/blobs/{digest}", put_blob, expect_handler=big)
    r.add_route("POST", "/v1/uploads", post_upload)
    r.add_route("HEAD", "/v1/uploads/{upload_id}", head_upload)
    r.add_route("PATCH", "/v1/uploads/{upload_id}", patch_upload, expect_handler=big)
    r.add_route("PUT", "/v1/uploads/{upload_id}", put_upload, expect_handler=big)
    r.add_route("DELETE", "/v1/uploads/{upload_id}", delete_upload)
    r.add_route("POST", "/v1/batch", post_batch, expect_handler=batch)
    r.add_get("/v1/datasets/{dataset}/items", list_items, allow_head=False)
    # [\s\S], not '.': item names may contain newlines (sent as %0A).
    items = r"/v1/datasets/{dataset}/items/{key:[\s\S]+}"
    r.add_route("PUT", items, put_item, expect_handler=manifest)
    r.add_route("DELETE", items, delete_item)
    add_dashboard_routes(app, Path(store_root), _state)  # GET /, /api/*, /thumbs/*
    return app


async def serve(
    store_root: Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    tokens: Sequence[str] = (),
    max_body: int = DEFAULT_MAX_BODY,
    *,
    ready: Callable[[str, int], None] | None = None,
) -> None:
    """Run the server until SIGTERM/SIGINT (or cancellation). Raises ServeError
    before binding when a non-loopback address is asked for without tokens."""
    check_bind(host, tokens)
    app = make_app(store_root, tokens, max_body)
    # access_log=None: our own middleware logs each request, without headers.
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        log.info(
            "listening", host=bound[0], port=bound[1], store=str(store_root), auth=bool(tokens)
        )
        if ready is not None:
            ready(bound[0], bound[1])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        handled = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        try:
            await stop.wait()
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
        log.info("stopping")
    finally:
        await runner.cleanup()
