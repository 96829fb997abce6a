"""The http sink against the real `ingestd serve` (its app in-process on a loopback
socket, over a store in the test's folder), with a middleware in front that answers
the next requests with an error when a case asks for one and counts requests. What
the server holds is read back through its store's catalog and blob files."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web
from ingestd.config import HttpBackend
from ingestd.server.app import STATE
from ingestd.server.auth import TokenAuth
from ingestd.sinks.base import Sink
from ingestd.sinks.http import HttpSink

from tests.support.conformance.adapter import Held
from tests.support.conformance.local import held_in_store
from tests.support.server_app import TOKEN, Running, running

KEY_ENV = "INGESTD_CONFORMANCE_SERVE_TOKEN"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpAdapter:
    name = "http"
    key_env: str | None = KEY_ENV

    def __init__(self, store: Path) -> None:
        self.store = store
        self.srv: Running | None = None
        self._failures: list[tuple[int, float | None]] = []
        self._requests = 0

    @web.middleware
    async def faults(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Outermost: count /v1 requests; answer the scripted failures as a server in
        trouble would (the JSON error shape, Retry-After when given), after reading
        the body so that the client always gets to read the answer."""
        if request.path.startswith("/v1"):
            self._requests += 1
            if self._failures:
                status, retry_after = self._failures.pop(0)
                await request.read()
                headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
                return web.json_response(
                    {"error": "injected by the conformance suite", "code": "injected"},
                    status=status,
                    headers=headers,
                )
        return await handler(request)

    async def make_sink(self) -> Sink:
        assert self.srv is not None
        backend = HttpBackend(
            kind="http", url=f"http://127.0.0.1:{self.srv.port}", token_env=KEY_ENV
        )
        sink = HttpSink.from_backend(backend, workers=4)
        # Fast backoff: the 5xx case waits milliseconds; Retry-After stays the floor.
        sink.backoff_base, sink.backoff_cap = 0.01, 5.0
        return sink

    def held(self, dataset: str) -> dict[str, Held]:
        return held_in_store(self.store, dataset)

    def fail_next(self, n: int, status: int, retry_after: float | None = None) -> None:
        self._failures.extend([(status, retry_after)] * n)

    def refuse_key(self) -> None:
        assert self.srv is not None
        self.srv.app[STATE].auth = TokenAuth(["another-token-the-sink-does-not-have"])

    def requests(self) -> int:
        return self._requests


@contextlib.asynccontextmanager
async def open_adapter(tmp_path: Path) -> AsyncIterator[HttpAdapter]:
    adapter = HttpAdapter(tmp_path / "store")
    old = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = TOKEN
    try:
        async with running(adapter.store, outer=adapter.faults) as srv:
            adapter.srv = srv
            yield adapter
    finally:
        if old is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = old
