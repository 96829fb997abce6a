"""The routes of `ingestd serve` one function each (API.md), but for the batch route
(batch.py): datasets, blobs, resumable uploads, items, and the service routes. Each
reports a failure by raising ApiError; app.py's middleware turns it into the answer.
Blocking work (file writes, hashing, fsync, SQLite) goes to the app's thread pool."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable
from typing import Any

from aiohttp import hdrs, web

from ingestd.server.common import ApiError, Manifest, blob_received
from ingestd.server.common import blob_size as _blob_size
from ingestd.server.common import body_length as _body_length
from ingestd.server.common import check_blobs as _check_blobs
from ingestd.server.common import check_manifest as _check_manifest
from ingestd.server.common import count_bytes as _count_bytes
from ingestd.server.common import dataset_of as _dataset
from ingestd.server.common import digest as _digest
from ingestd.server.common import item_location as _item_location
from ingestd.server.common import read_json as _read_json
from ingestd.server.common import state as _state
from ingestd.server.uploads import CHUNK, PumpResult, Upload, UploadNotFound, Uploads, pump
from ingestd.store import DigestMismatch, Store
from ingestd.store.blobs import BlobWrite, BlobWriter

MANIFEST_MAX = 16 << 20
SMALL_JSON_MAX = 64 << 10  # POST /v1/uploads
DEFAULT_LIMIT = 500
MAX_LIMIT = 5000


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
    blob_received("/v1/blobs/{digest}", digest, written.size, new=written.created)
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
    blob_received("/v1/uploads/{id}", digest, written.size, new=written.created)
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
