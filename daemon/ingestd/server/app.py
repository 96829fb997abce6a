"""`ingestd serve`: the ingestion HTTP API (daemon/ingestd/server/API.md) over the embedded store.

Bytes first, then the manifest, like an OCI registry: clients put blobs (whole, or in
resumable pieces for big ones), then upsert items that reference them by digest.

Every request body is streamed (uploads.pump): nothing reads a body whole, except
JSON bodies, which are bounded (16 MiB for manifests). Blocking work — file writes,
hashing, fsync, SQLite — runs on the app's thread pool, never on the event loop.

Handlers are one function per route (routes.py; the batch route in batch.py) and
report failures by raising ApiError; the `observe` middleware here turns those (and
aiohttp's own 404/405) into the JSON error shape, and records metrics and one log line
per request. Headers are never logged.
"""

from __future__ import annotations

import asyncio
import errno
import signal
import sqlite3
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import structlog
from aiohttp import hdrs, web

from ingestd.dashboard import add_dashboard_routes
from ingestd.server import routes
from ingestd.server.auth import ServeError, TokenAuth, check_transport, load_tokens
from ingestd.server.batch import BATCH_MAX, post_batch
from ingestd.server.common import BYTES_IN as _BYTES_IN
from ingestd.server.common import ERROR_CODE as _ERROR_CODE
from ingestd.server.common import STATE, ApiError, ServerState, error
from ingestd.server.common import route as _route
from ingestd.server.common import state as _state
from ingestd.server.tls import ServerTls
from ingestd.server.uploads import UploadBusy, UploadNotFound, Uploads
from ingestd.store import Store, StoreIOError

# The CLI imports these from here: the server's whole public face in one module.
__all__ = ["STATE", "ServeError", "ServerTls", "load_tokens", "make_app", "serve"]

T = TypeVar("T")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8750
DEFAULT_MAX_BODY = 8 << 30  # blobs and uploads
BODY_IDLE_TIMEOUT_S = 60.0  # a body that sends nothing for this long counts as interrupted
EXPIRY_INTERVAL_S = 3600.0
IO_THREADS = 16

log = structlog.get_logger("ingestd.serve")


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
    manifest = _expect_handler(lambda st: routes.MANIFEST_MAX)
    batch = _expect_handler(lambda st: min(BATCH_MAX, st.max_body))
    r = app.router
    r.add_get("/healthz", routes.healthz)
    r.add_get("/metrics", routes.metrics)
    r.add_route("PUT", "/v1/datasets/{dataset}", routes.put_dataset)
    r.add_route("HEAD", "/v1/datasets/{dataset}", routes.head_dataset)
    r.add_route("HEAD", "/v1/blobs/{digest}", routes.head_blob)
    r.add_route("PUT", "/v1/blobs/{digest}", routes.put_blob, expect_handler=big)
    r.add_route("POST", "/v1/uploads", routes.post_upload)
    r.add_route("HEAD", "/v1/uploads/{upload_id}", routes.head_upload)
    r.add_route("PATCH", "/v1/uploads/{upload_id}", routes.patch_upload, expect_handler=big)
    r.add_route("PUT", "/v1/uploads/{upload_id}", routes.put_upload, expect_handler=big)
    r.add_route("DELETE", "/v1/uploads/{upload_id}", routes.delete_upload)
    r.add_route("POST", "/v1/batch", post_batch, expect_handler=batch)
    r.add_get("/v1/datasets/{dataset}/items", routes.list_items, allow_head=False)
    # [\s\S], not '.': item names may contain newlines (sent as %0A).
    items = r"/v1/datasets/{dataset}/items/{key:[\s\S]+}"
    r.add_route("PUT", items, routes.put_item, expect_handler=manifest)
    r.add_route("DELETE", items, routes.delete_item)
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
    tls: ServerTls | None = None,
    allow_plain_http: bool = False,
) -> None:
    """Run the server until SIGTERM/SIGINT (or cancellation); SIGHUP re-reads the TLS
    certificate and key. Raises ServeError before binding when the address, the
    credentials and TLS do not go together (auth.check_transport)."""
    check_transport(
        host,
        tokens,
        tls=tls is not None,
        client_certs=tls is not None and tls.mutual,
        allow_plain_http=allow_plain_http,
    )
    app = make_app(store_root, tokens, max_body)
    # access_log=None: our own middleware logs each request, without headers.
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        ssl_context = tls.context if tls is not None else None
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound = runner.addresses[0]
        log.info(
            "listening",
            host=bound[0],
            port=bound[1],
            store=str(store_root),
            auth=bool(tokens),
            tls=tls is not None,
            client_certs=tls is not None and tls.mutual,
        )
        if ready is not None:
            ready(bound[0], bound[1])
        await _until_stopped(tls)
        log.info("stopping")
    finally:
        await runner.cleanup()


async def _until_stopped(tls: ServerTls | None) -> None:
    """Wait for SIGTERM or SIGINT; meanwhile SIGHUP reloads the TLS pair. On the
    loop's thread, so no handshake sees the context while it changes."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handlers: list[tuple[signal.Signals, Callable[[], object]]] = [
        (signal.SIGTERM, stop.set),
        (signal.SIGINT, stop.set),
    ]
    # Without TLS there is nothing to re-read, but SIGHUP must not end the server
    # (its default action) when a unit's ExecReload sends it.
    hup = tls.reload if tls is not None else lambda: log.info("sighup_nothing_to_reload")
    handlers.append((signal.SIGHUP, hup))
    handled = []
    for sig, handler in handlers:
        try:
            loop.add_signal_handler(sig, handler)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass
    try:
        await stop.wait()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
