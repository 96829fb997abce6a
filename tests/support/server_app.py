"""The ingestion server's app (`ingestd.server.app.make_app`) in-process on a real
loopback socket, and the request helpers its tests share: `running(store)` yields a
`Running` with an aiohttp session; `item_url`, `slots_for` and `sha` build requests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from ingestd.server.app import DEFAULT_MAX_BODY, make_app
from multidict import CIMultiDictProxy
from yarl import URL

from tests.support.ports import listen

TOKEN = "tkn-0123456789abcdef-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def item_url(dataset: str, *segments: str) -> str:
    enc = "/".join(quote(s, safe="") for s in segments)
    return f"/v1/datasets/{quote(dataset, safe='')}/items/{enc}"


def slots_for(*files: tuple[str, bytes]) -> list[dict[str, Any]]:
    return [
        {
            "name": "0",
            "type": "image",
            "files": [{"name": n, "digest": sha(d), "size": len(d)} for n, d in files],
        }
    ]


def batch_body(items: list[dict[str, Any]], blobs: list[bytes], *, magic: bytes = b"IDB1") -> bytes:
    """A POST /v1/batch body (API.md, "Batches"), built by hand from its description:
    `items` as sent, `blobs` listed by their digest and size, in this order."""
    header = json.dumps(
        {"items": items, "blobs": [{"digest": sha(b), "size": len(b)} for b in blobs]}
    ).encode()
    return magic + struct.pack(">I", len(header)) + header + b"".join(blobs)


def batch_item(
    dataset: str, path: str, name: str, *files: tuple[str, bytes], **meta: Any
) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "path": path,
        "name": name,
        "slots": slots_for(*files),
        "metadata": meta,
    }


@dataclass
class Running:
    app: web.Application
    session: aiohttp.ClientSession
    port: int
    store: Path

    def url(self, raw: str) -> URL:
        # encoded=True: send the path exactly as written (no dot-segment clean-up,
        # no re-quoting), as a hostile client could.
        return URL(f"http://127.0.0.1:{self.port}{raw}", encoded=True)

    async def call(
        self, method: str, raw: str, **kw: Any
    ) -> tuple[int, Any, CIMultiDictProxy[str]]:
        kw.setdefault("headers", AUTH)
        async with self.session.request(method, self.url(raw), **kw) as r:
            body = await r.read()
            data: Any = body
            if body and r.content_type == "application/json":
                data = json.loads(body)
            return r.status, data, r.headers

    async def put_blob(self, data: bytes) -> str:
        status, body, _ = await self.call("PUT", f"/v1/blobs/{sha(data)}", data=data)
        assert status in (200, 201), body
        return sha(data)


@contextlib.asynccontextmanager
async def running(
    store: Path,
    *,
    tokens: tuple[str, ...] = (TOKEN,),
    max_body: int = DEFAULT_MAX_BODY,
    cancel_on_disconnect: bool = False,
    outer: Any = None,
    **kw: Any,
) -> AsyncIterator[Running]:
    """The app on a real socket. `cancel_on_disconnect` mirrors aiohttp's TestServer
    (handler_cancellation=True); the default is what `serve` runs. `outer` is a
    middleware put in front of the app's own (a test's fault injection)."""
    app = make_app(store, tokens, max_body, **kw)
    if outer is not None:
        app.middlewares.insert(0, outer)
    runner, port = await listen(app, handler_cancellation=cancel_on_disconnect)
    try:
        async with aiohttp.ClientSession() as session:
            yield Running(app, session, port, store)
    finally:
        await runner.cleanup()
