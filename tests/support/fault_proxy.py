"""A fault-injecting reverse proxy for the HTTP end-to-end tests.

It sits between the daemon's http sink and a real `ingestd serve` and forwards every
request, streaming bodies both ways (nothing is buffered whole), except that, drawn at
random per request (seeded):

- `error_rate` of requests are answered by the proxy itself, without reaching the
  server, with 500, 503 or 429 (one third each); 503 and 429 carry `Retry-After: 1`.
  The request body is read and discarded first, so the client always gets to read
  the answer (a gateway that answered early and reset the connection would turn the
  429 into a dropped connection, which is `drop_rate`'s job);
- `drop_rate` of requests lose their connection mid-body: the proxy forwards a random
  share (10-90 %) of the body to the server, then cuts both connections, so the server
  sees an interrupted upload and the client a connection error. A request without a
  body is cut before it is forwarded;
- `lose_answer_rate` of requests are forwarded whole, the server does the work, and the
  proxy then cuts the client's connection instead of passing the answer on (the
  client must find out what happened: a redo has to be idempotent).

`GET /_proxy/stats` (answered by the proxy, never forwarded) reports what it did, and
how often a client came back to a path sooner than a Retry-After it was given allowed.

Run it as a process (what the tests do, so it gets its own interpreter and GIL):

    python -m tests.support.fault_proxy --port 8760 --upstream http://127.0.0.1:8750 \\
        --error-rate 0.1 --drop-rate 0.02 [--lose-answer-rate 0.01] [--seed 1]

or in a thread with `ProxyThread(...)` (start/stop).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

READ = 1 << 16
RETRY_AFTER_S = 1.0
# Hop-by-hop headers (RFC 9110 §7.6.1) and those the proxy sets itself.
_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Expect",
        "Content-Length",
    )
)


def _shared(path: str) -> bool:
    """Paths that many callers use at once (creating an upload, ensuring a dataset,
    listing): a Retry-After given to one says nothing about another's next request."""
    parts = path.strip("/").split("/")
    return path.rstrip("/") in ("/v1/uploads", "/v1/batch") or (
        parts[:2] == ["v1", "datasets"] and (len(parts) == 3 or parts[-1] == "items")
    )


class _Cut(Exception):
    """Raised inside the forwarded body to stop it mid-way."""


@dataclass
class Faults:
    error_rate: float = 0.0
    drop_rate: float = 0.0
    lose_answer_rate: float = 0.0
    seed: int = 0
    statuses: tuple[int, ...] = (500, 503, 429)


@dataclass
class Stats:
    requests: int = 0
    forwarded: int = 0
    errors: Counter[int] = field(default_factory=Counter)
    dropped: int = 0
    dropped_mid_body: int = 0
    lost_answers: int = 0
    upstream_failures: int = 0
    # Client requests to a path sooner than the Retry-After we gave for it allowed.
    early_retries: int = 0
    early_retry_paths: list[str] = field(default_factory=list)
    min_retry_gap: float | None = None
    by_kind: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "forwarded": self.forwarded,
            "errors": {str(k): v for k, v in sorted(self.errors.items())},
            "errors_total": sum(self.errors.values()),
            "dropped": self.dropped,
            "dropped_mid_body": self.dropped_mid_body,
            "lost_answers": self.lost_answers,
            "upstream_failures": self.upstream_failures,
            "early_retries": self.early_retries,
            "early_retry_paths": self.early_retry_paths[:20],
            "min_retry_gap": self.min_retry_gap,
            "by_kind": dict(self.by_kind),
        }


class FaultProxy:
    def __init__(self, upstream: str, faults: Faults) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults = faults
        self.rng = random.Random(faults.seed)
        self.stats = Stats()
        self._session: aiohttp.ClientSession | None = None
        # path -> monotonic time before which the client was told not to come back
        self._not_before: dict[str, float] = {}

    # --- app ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 40)
        app.router.add_get("/_proxy/stats", self._stats)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )

    async def _close(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.as_json())

    # --- one request -------------------------------------------------------------------

    def _draw(self) -> str:
        f, r = self.faults, self.rng.random()
        if r < f.error_rate:
            return "error"
        r -= f.error_rate
        if r < f.drop_rate:
            return "drop"
        r -= f.drop_rate
        if r < f.lose_answer_rate:
            return "lose_answer"
        return "forward"

    def _note_arrival(self, path: str) -> None:
        if _shared(path):
            return
        not_before = self._not_before.pop(path, None)
        if not_before is None:
            return
        gap = RETRY_AFTER_S - (not_before - time.monotonic())
        s = self.stats
        s.min_retry_gap = gap if s.min_retry_gap is None else min(s.min_retry_gap, gap)
        if gap < RETRY_AFTER_S * 0.95:
            s.early_retries += 1
            s.early_retry_paths.append(f"{path} after {gap:.3f}s")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        self._note_arrival(request.path)
        kind = self._draw()
        self.stats.by_kind[kind] += 1
        if kind == "error":
            return await self._error(request)
        if kind == "drop" and not request.body_exists:
            self.stats.dropped += 1
            return self._cut(request)
        cut_at: int | None = None
        if kind == "drop":
            length = request.content_length
            share = self.rng.uniform(0.1, 0.9)
            # Chunked bodies (no length): cut after some bytes anyway.
            cut_at = max(1, int(length * share)) if length else 1 + int(share * READ)
        try:
            status, headers, body = await self._forward(request, cut_at)
        except _Cut:
            self.stats.dropped += 1
            self.stats.dropped_mid_body += 1
            return self._cut(request)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            # The server is gone or cut us off: pass that on as what it is, a broken
            # connection, so the client sees the real failure.
            self.stats.upstream_failures += 1
            print(f"fault_proxy: upstream failed: {type(e).__name__}: {e}", file=sys.stderr)
            return self._cut(request)
        if kind == "drop":
            # The server answered before the cut point (it did not need the body): the
            # client's connection goes anyway, before the answer reaches it.
            self.stats.dropped += 1
            return self._cut(request)
        if kind == "lose_answer":
            self.stats.lost_answers += 1
            return self._cut(request)
        self.stats.forwarded += 1
        resp = web.Response(status=status, body=body if request.method != "HEAD" else None)
        for k, v in headers.items():
            if k.lower() not in _HOP:
                resp.headers.add(k, v)
        if request.method == "HEAD" and "Content-Length" in headers:
            # A HEAD answer tells the size of what a GET would return.
            resp.headers["Content-Length"] = headers["Content-Length"]
        return resp

    async def _error(self, request: web.Request) -> web.Response:
        async for _ in request.content.iter_chunked(READ):  # read and discard
            pass
        status = self.rng.choice(self.faults.statuses)
        self.stats.errors[status] += 1
        headers = {}
        if status in (429, 503):
            headers["Retry-After"] = str(int(RETRY_AFTER_S))
            if not _shared(request.path):
                self._not_before[request.path] = time.monotonic() + RETRY_AFTER_S
        return web.json_response(
            {"error": f"injected by fault_proxy ({status})", "code": "injected"},
            status=status,
            headers=headers,
        )

    def _cut(self, request: web.Request) -> web.Response:
        transport = request.transport
        if transport is not None:
            transport.abort()
        # Nothing reaches the client any more; aiohttp just needs an answer object.
        resp = web.Response(status=599)
        resp.force_close()
        return resp

    async def _forward(self, request: web.Request, cut_at: int | None) -> tuple[int, Any, bytes]:
        assert self._session is not None
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        data: Any = None
        if request.body_exists:
            length = request.content_length
            if length is not None:
                headers.append(("Content-Length", str(length)))
            data = self._body(request, cut_at)
        url = self.upstream + request.raw_path  # raw: keep the client's percent-encoding
        try:
            async with self._session.request(
                request.method,
                URL(url, encoded=True),
                headers=headers,
                data=data,
                allow_redirects=False,
            ) as up:
                body = await up.read()
                return up.status, up.headers, body
        except aiohttp.ClientError:
            if cut_at is not None:
                raise _Cut from None
            raise

    async def _body(self, request: web.Request, cut_at: int | None) -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in request.content.iter_chunked(READ):
            if cut_at is not None and sent + len(chunk) >= cut_at:
                yield chunk[: cut_at - sent]
                # Give the partial chunk time to leave before the connection goes.
                await asyncio.sleep(0.01)
                raise _Cut
            sent += len(chunk)
            yield chunk
        if cut_at is not None:  # the body was shorter than the cut: cut at its end
            raise _Cut


# --- running it ----------------------------------------------------------------------


async def serve(
    proxy: FaultProxy,
    host: str,
    port: int,
    ready: threading.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    runner = web.AppRunner(proxy.app(), access_log=None, handle_signals=False)
    await runner.setup()
    stop = stop or asyncio.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        print(json.dumps({"event": "listening", "host": bound[0], "port": bound[1]}), flush=True)
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        await runner.cleanup()


class ProxyThread:
    """The proxy on its own event loop in a thread of this process."""

    def __init__(self, upstream: str, faults: Faults, host: str = "127.0.0.1", port: int = 0):
        self.proxy = FaultProxy(upstream, faults)
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._stop = asyncio.Event()
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(
                    serve(self.proxy, self.host, self.port, ready, self._stop)
                )
            self._loop.close()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fault proxy did not start")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8750")
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--drop-rate", type=float, default=0.0)
    p.add_argument("--lose-answer-rate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    faults = Faults(a.error_rate, a.drop_rate, a.lose_answer_rate, a.seed)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(FaultProxy(a.upstream, faults), a.host, a.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
