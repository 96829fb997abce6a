"""`POST /v1/batch`: many small items, their blobs and manifests, in one request.

A blob PUT and a manifest PUT per small file cost two round trips and two requests'
worth of handler work each; a group of items in one framed body costs one (API.md,
"Batches"):

    "IDB1"          4 bytes: the format and its version
    header length   4 bytes, unsigned big-endian
    header          that many bytes of JSON: {"blobs": [{digest, size}], "items": [...]}
    blob bytes      each blob of "blobs", in that order, back to back

The header comes first so that the server knows every size before any byte of a
blob: blobs are read with exact lengths, no delimiter is searched for, and nothing
is buffered beyond about CHUNK bytes, whatever the batch's size. Each blob is hashed
and checked against its digest on the way to a temp file; all are made durable
together (BlobStore.publish: one group of fsyncs, as the local sink's batch does),
then every item whose blobs are all stored goes into one catalog transaction. An item
fails alone (its own result names what to fix); the request fails as a whole only
when its framing is wrong or its body ends early, and then nothing is committed.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import sqlite3
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError

from ingestd.server.common import (
    ApiError,
    Manifest,
    ServerState,
    blob_received,
    blob_size,
    body_length,
    check_blobs,
    check_manifest,
    count_bytes,
    dataset_name,
    digest,
    item_place,
    parse_json,
    state,
)
from ingestd.server.uploads import CHUNK
from ingestd.store import Store, StoreIOError
from ingestd.store.blobs import StagedBlob

MAGIC = b"IDB1"
PREFIX = struct.Struct(">4sI")  # magic, header length
BATCH_MAX = 64 << 20  # bytes of body (and never more than --max-body)
BATCH_ITEMS = 1000  # items, and blobs, per batch
BATCH_BLOB_MAX = 4 << 20  # bytes of one blob; bigger ones go through PUT or an upload
HEADER_MAX = 16 << 20
_GROUP = 256  # blobs per trip to a writer thread (besides about CHUNK bytes)

_BODY_ERRORS = (ConnectionError, ClientPayloadError, HttpProcessingError)


def _bad(message: str) -> ApiError:
    return ApiError(400, "bad_batch", message)


@dataclass(frozen=True, slots=True)
class _Item:
    dataset: str
    path: str
    name: str
    manifest: Manifest

    @property
    def key(self) -> str:
        return f"{self.path.rstrip('/')}/{self.name}"


def _check_item(entry: Any) -> _Item | ApiError:
    """One entry of "items" as the single-item routes check it, or why it is refused."""
    try:
        if not isinstance(entry, dict):
            raise ApiError(400, "bad_manifest", "an item must be a JSON object")
        dataset = dataset_name(entry.get("dataset"))
        path, name = entry.get("path"), entry.get("name")
        if not isinstance(path, str) or not isinstance(name, str):
            raise ApiError(400, "bad_path", "an item needs a 'path' and a 'name' (strings)")
        if path != "/" and not path.startswith("/"):
            raise ApiError(400, "bad_path", f"item path {path!r} must start with '/'")
        folders = path[1:].split("/") if path != "/" else []
        path, name = item_place([*folders, name])
        return _Item(dataset, path, name, check_manifest(entry))
    except ApiError as e:
        return e


def _check_header(header: Any, limit: int) -> tuple[list[tuple[str, int]], list[Any]]:
    """(blobs as (digest, size), the raw item entries) of a batch header."""
    if not isinstance(header, dict):
        raise _bad("the header must be a JSON object")
    blobs, items = header.get("blobs", []), header.get("items")
    if not isinstance(blobs, list) or not isinstance(items, list):
        raise _bad("the header needs 'items' (a list) and 'blobs' (a list)")
    if len(items) > BATCH_ITEMS or len(blobs) > BATCH_ITEMS:
        raise ApiError(413, "too_large", f"a batch holds at most {BATCH_ITEMS} items and blobs")
    out: list[tuple[str, int]] = []
    seen: set[str] = set()
    for i, b in enumerate(blobs):
        size = b.get("size") if isinstance(b, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _bad(f"blobs[{i}] needs a 'digest' and a non-negative integer 'size'")
        d = digest(b.get("digest"))
        if d in seen:
            raise _bad(f"blobs[{i}]: {d} is listed twice")
        if size > min(BATCH_BLOB_MAX, limit):
            raise ApiError(
                413,
                "too_large",
                f"blobs[{i}] is {size} bytes; a blob in a batch may have "
                f"{min(BATCH_BLOB_MAX, limit)} (send bigger ones with PUT /v1/blobs)",
            )
        seen.add(d)
        out.append((d, size))
    return out, items


class _Body:
    """The request body read in exact lengths, each read bounded by the idle timeout,
    the whole bounded by `limit`; an early end or a broken connection is `interrupted`."""

    def __init__(self, request: web.Request, limit: int, idle: float) -> None:
        self.content = request.content
        self.limit = limit
        self.idle = idle
        self.read = 0
        self.on_bytes = count_bytes(request)

    async def exactly(self, n: int) -> bytes:
        if self.read + n > self.limit:
            raise ApiError(413, "too_large", f"batch body over the {self.limit}-byte limit")
        try:
            async with asyncio.timeout(self.idle):
                data = await self.content.readexactly(n)
        except (asyncio.IncompleteReadError, TimeoutError, *_BODY_ERRORS):
            raise ApiError(400, "interrupted", "the body ended early; nothing stored") from None
        self.read += n
        self.on_bytes(n)
        return data

    async def end(self) -> None:
        try:
            async with asyncio.timeout(self.idle):
                extra = await self.content.read(1)
        except (TimeoutError, *_BODY_ERRORS):
            raise ApiError(400, "interrupted", "the body ended early; nothing stored") from None
        if extra:
            raise _bad("the body goes on after the last blob the header lists")


@dataclass
class _Received:
    """What became of each blob of the batch: staged (to publish), already stored,
    or refused (the items naming it fail with this error)."""

    staged: dict[str, StagedBlob] = field(default_factory=dict)
    stored: dict[str, int] = field(default_factory=dict)  # digest -> size
    refused: dict[str, ApiError] = field(default_factory=dict)


def _stage(store: Store, parts: list[tuple[str, bytes]], got: _Received) -> None:
    """Hash and write each blob to a temp file, unsynced (on a writer thread). The temp
    file is named as BlobWriter names it, so the store's stale-temp cleanup knows it."""
    blobs = store.blobs
    for d, data in parts:
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != d:
            got.refused[d] = ApiError(
                400,
                "digest_mismatch",
                f"blob does not hash to {d}; not stored",
                expected=d,
                actual=actual,
            )
            continue
        final = blobs.path_str(d)
        if os.path.isfile(final):
            got.stored[d] = len(data)
            continue
        tmp = str(blobs.begin().tmp)  # a fresh temp name; the writer itself is not used
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        except OSError as e:
            got.refused[d] = _store_error(StoreIOError(e.errno or errno.EIO, str(e), tmp))
            continue
        staged = StagedBlob(d, len(data), tmp, final, fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as e:
            blobs.discard([staged])
            got.refused[d] = _store_error(StoreIOError(e.errno or errno.EIO, str(e), tmp))
            continue
        got.staged[d] = staged


def _store_error(e: StoreIOError) -> ApiError:
    if e.errno == errno.ENOSPC:
        return ApiError(507, "no_space", "the store is out of disk space")
    return ApiError(500, "store_error", f"writing the store failed: {e.strerror}")


async def _receive(
    st: ServerState, store: Store, body: _Body, blobs: list[tuple[str, int]]
) -> _Received:
    """Read every blob and stage it; a writer thread works on one group while the next
    is read. On any failure every staged temp file is removed."""
    got = _Received()
    run: Callable[[list[tuple[str, bytes]]], Any] = lambda parts: st.run(  # noqa: E731
        _stage, store, parts, got
    )
    writing: asyncio.Future[Any] | None = None
    parts: list[tuple[str, bytes]] = []
    batched = 0
    try:
        for d, size in blobs:
            parts.append((d, await body.exactly(size)))
            batched += size
            if batched >= CHUNK or len(parts) >= _GROUP:
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(run(parts))
                parts, batched = [], 0
        if writing is not None:
            await writing
        if parts:
            await run(parts)
    except BaseException:
        if writing is not None:
            await asyncio.gather(asyncio.shield(writing), return_exceptions=True)
        await asyncio.shield(st.run(store.blobs.discard, list(got.staged.values())))
        raise
    return got


def _commit(store: Store, entries: list[Any], got: _Received) -> list[dict[str, Any]]:
    """Check the items, publish the staged blobs, then upsert every item whose blobs
    are all stored, in one catalog transaction (on a writer thread: hundreds of
    items' checks would hold the event loop up). One result per item, in order."""
    items = [_check_item(e) for e in entries]
    staged = list(got.staged.values())
    for s, written in zip(staged, store.blobs.publish(staged), strict=True):
        if isinstance(written, StoreIOError):
            got.refused[s.digest] = _store_error(written)
        else:
            got.stored[s.digest] = s.size
    results: list[dict[str, Any] | None] = [None] * len(items)
    todo: list[int] = []
    for i, it in enumerate(items):
        if isinstance(it, ApiError):
            results[i] = _failed(it)
            continue
        refused = [got.refused[d] for d in it.manifest[2] if d in got.refused]
        try:
            if refused:
                raise refused[0]
            check_blobs(it.manifest[2], lambda d: got.stored.get(d) or blob_size(store, d))
        except ApiError as e:
            results[i] = _failed(e, it.key)
            continue
        todo.append(i)
    entries = []
    for i in todo:
        it = items[i]
        assert isinstance(it, _Item)
        entries.append((it.dataset, it.path, it.name, it.manifest[0], it.manifest[1]))
    try:
        upserted = store.catalog.upsert_items(entries) if entries else []
    except sqlite3.Error as e:
        busy = ApiError(503, "busy", f"the catalog is busy or failing ({e}); send the batch again")
        for i in todo:
            results[i] = _failed(busy, items[i].key)  # type: ignore[union-attr]
    else:
        for i, u in zip(todo, upserted, strict=True):
            key = items[i].key  # type: ignore[union-attr]
            if isinstance(u, Exception):
                results[i] = _failed(ApiError(400, "bad_manifest", str(u)), key)
            else:
                version, changed = u
                created = changed and version == 1
                status = 201 if created else 200
                results[i] = {"status": status, "key": key, "version": version, "changed": changed}
    return [r for r in results if r is not None]


def _failed(e: ApiError, key: str | None = None) -> dict[str, Any]:
    return {"status": e.status, **({"key": key} if key else {}), **e.shape()}


async def post_batch(request: web.Request) -> web.Response:
    st = state(request)
    store, _ = st.opened
    limit = min(BATCH_MAX, st.max_body)
    length = body_length(request, limit)
    body = _Body(request, limit, st.body_timeout)
    magic, header_len = PREFIX.unpack(await body.exactly(PREFIX.size))
    if magic != MAGIC:
        raise _bad(f"not a batch body: it starts with {magic!r}, not {MAGIC!r}")
    if header_len > HEADER_MAX:
        raise ApiError(413, "too_large", f"batch header over the {HEADER_MAX}-byte limit")
    blobs, entries = _check_header(parse_json(await body.exactly(header_len), "bad_batch"), limit)
    declared = PREFIX.size + header_len + sum(size for _, size in blobs)
    if declared > limit:
        raise ApiError(413, "too_large", f"batch of {declared} bytes over the {limit}-byte limit")
    if length is not None and length != declared:
        raise _bad(f"Content-Length is {length} but the header lists {declared} bytes in all")
    got = await _receive(st, store, body, blobs)
    try:
        await body.end()
    except BaseException:
        await asyncio.shield(st.run(store.blobs.discard, list(got.staged.values())))
        raise
    results = await st.run(_commit, store, entries, got)
    for d, size in got.stored.items():
        blob_received("/v1/batch", d, size, new=d in got.staged)
    for r in results:
        st.metrics.item(r["status"], r.get("changed"))
    return web.json_response({"results": results})
