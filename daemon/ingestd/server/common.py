"""What the routes of `ingestd serve` share: the app's state, the error shape of
API.md (ApiError), and the checks of names, paths, digests and manifests that every
route applying them must apply alike (the single-item routes of app.py and the batch
route of batch.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

import structlog
from aiohttp import web

from ingestd.server.auth import TokenAuth
from ingestd.server.metrics import ServerMetrics
from ingestd.server.uploads import CHUNK, Uploads
from ingestd.store import Store
from ingestd.store.blobs import check_digest
from ingestd.store.catalog import check_item_path

T = TypeVar("T")

MAX_KEY_BYTES = 1024
MAX_SEGMENT_BYTES = 255
MAX_DATASET_CHARS = 128
SLOT_TYPES = frozenset({"image", "video", "frames", "dicom", "file"})


_log = structlog.get_logger("ingestd.serve")


class ApiError(Exception):
    """A failure to answer with API.md's error shape: {"error", "code", ...extra}."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.extra = extra

    def shape(self) -> dict[str, Any]:
        """The error as API.md words it (the body of an error answer, or one item's
        result in a batch)."""
        return {"error": self.message, "code": self.code, **self.extra}


ERROR_CODE = web.ResponseKey("error_code", str)
BYTES_IN = web.RequestKey("bytes_in", int)


def error(
    status: int,
    code: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    resp = web.json_response(
        {"error": message, "code": code, **extra}, status=status, headers=headers
    )
    resp[ERROR_CODE] = code
    return resp


@dataclass
class ServerState:
    store_root: Path
    auth: TokenAuth
    max_body: int
    body_timeout: float
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    # Set while the app runs (see app._lifecycle).
    executor: ThreadPoolExecutor | None = None
    store: Store | None = None
    uploads: Uploads | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        assert self.executor is not None, "the app is not running"
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @property
    def opened(self) -> tuple[Store, Uploads]:
        assert self.store is not None and self.uploads is not None, "the app is not running"
        return self.store, self.uploads


STATE = web.AppKey("ingestd_serve_state", ServerState)


def state(request: web.Request) -> ServerState:
    return request.app[STATE]


def route(request: web.Request) -> str:
    """The route template, so metrics and logs have a bounded set of routes."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def count_bytes(request: web.Request) -> Callable[[int], None]:
    st, name = state(request), route(request)

    def on_bytes(n: int) -> None:
        request[BYTES_IN] = request.get(BYTES_IN, 0) + n
        st.metrics.received(name, n)

    return on_bytes


# --- names, paths, digests -----------------------------------------------------------


def digest(value: str | None) -> str:
    try:
        return check_digest(value or "")
    except (ValueError, TypeError):
        raise ApiError(
            400, "bad_digest", f"not a digest (want sha256:<64 lowercase hex>): {value!r}"
        ) from None


def dataset_name(name: Any) -> str:
    if (
        not isinstance(name, str)
        or not name
        or len(name) > MAX_DATASET_CHARS
        or "/" in name
        or "\0" in name
        or name in (".", "..")
    ):
        raise ApiError(
            400,
            "bad_name",
            f"bad dataset name {name!r}: 1-{MAX_DATASET_CHARS} characters, "
            "no '/', no NUL, not '.' or '..'",
        )
    return name


def item_place(segments: list[str]) -> tuple[str, str]:
    """(folder path, name) of an item key given as its segments (folders, then name)."""
    for s in segments:
        if not s or s in (".", "..") or "/" in s or "\0" in s:
            raise ApiError(
                400, "bad_path", f"bad item path segment {s!r}: empty, '.', '..', '/' or NUL"
            )
        if len(s.encode()) > MAX_SEGMENT_BYTES:
            raise ApiError(400, "bad_path", f"item path segment over {MAX_SEGMENT_BYTES} bytes")
    # The key without its leading '/', as API.md counts it.
    key = "/".join(segments)
    if not segments or len(key.encode()) > MAX_KEY_BYTES:
        raise ApiError(400, "bad_path", f"item key must be 1-{MAX_KEY_BYTES} bytes")
    path, name = "/" + "/".join(segments[:-1]), segments[-1]
    try:
        check_item_path(path, name)  # the catalog's own rule, as a last line
    except ValueError as e:
        raise ApiError(400, "bad_path", str(e)) from None
    return path, name


def _raw_segments(request: web.Request) -> list[str]:
    # From the raw path: aiohttp's decoded match_info turns %2F into '/', which would
    # let one segment pose as two.
    return request.rel_url.raw_path.split("/")


def _decode(segment: str, code: str) -> str:
    try:
        return unquote(segment, errors="strict")
    except UnicodeDecodeError:
        raise ApiError(400, code, "path segment is not valid UTF-8") from None


def dataset_of(request: web.Request) -> str:
    # /v1/datasets/{dataset}[/...]: the fourth raw segment.
    return dataset_name(_decode(_raw_segments(request)[3], "bad_name"))


def item_location(request: web.Request) -> tuple[str, str, str]:
    """(dataset, folder path, name) from /v1/datasets/{dataset}/items/{path...}/{name}."""
    dataset = dataset_of(request)
    path, name = item_place([_decode(s, "bad_path") for s in _raw_segments(request)[5:]])
    return dataset, path, name


# --- bodies --------------------------------------------------------------------------


def body_length(request: web.Request, limit: int) -> int | None:
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(413, "too_large", f"body of {length} bytes is over the {limit}-byte limit")
    return length


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes | bytearray, code: str = "bad_json") -> Any:
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, code, f"body is not JSON: {e}") from None


async def read_json(request: web.Request, limit: int) -> Any:
    """A JSON body, read in pieces and refused (413) once over `limit`."""
    body_length(request, limit)
    data = bytearray()
    on_bytes = count_bytes(request)
    async for chunk in request.content.iter_chunked(CHUNK):
        on_bytes(len(chunk))
        data += chunk
        if len(data) > limit:
            raise ApiError(413, "too_large", f"JSON body over the {limit}-byte limit")
    return parse_json(data)


# --- manifests -----------------------------------------------------------------------

Manifest = tuple[list[dict[str, Any]], dict[str, Any], dict[str, int]]


def bad_manifest(message: str) -> ApiError:
    return ApiError(400, "bad_manifest", message)


def _check_file(where: str, f: Any, sizes: dict[str, int]) -> None:
    if not isinstance(f, dict) or not isinstance(f.get("name"), str):
        raise bad_manifest(f"{where} needs a 'name'")
    size = f.get("size")
    if "url" in f:  # a registered remote object: kept as sent, no bytes stored
        if not isinstance(f["url"], str) or not f["url"]:
            raise bad_manifest(f"{where}.url must be a non-empty string")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise bad_manifest(f"{where}.size must be a non-negative integer")
        if not isinstance(f.get("etag", ""), str):
            raise bad_manifest(f"{where}.etag must be a string")
        if "digest" in f:  # what the object hashed to, when known: no blob is implied
            digest(f["digest"])
    elif "digest" in f:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad_manifest(f"{where}.size must be a non-negative integer")
        d = digest(f["digest"])
        if sizes.setdefault(d, size) != size:
            raise bad_manifest(f"{where}: {d} listed with two sizes")
    else:
        raise bad_manifest(f"{where} needs a 'digest' and 'size', or a 'url'")


def check_manifest(body: Any) -> Manifest:
    """(slots, metadata, {digest: size}) of a manifest, slots as sent (extra keys kept)."""
    if not isinstance(body, dict):
        raise bad_manifest("manifest must be a JSON object")
    slots, metadata = body.get("slots"), body.get("metadata", {})
    if not isinstance(slots, list):
        raise bad_manifest("'slots' must be a list")
    if not isinstance(metadata, dict):
        raise bad_manifest("'metadata' must be an object")
    sizes: dict[str, int] = {}
    for i, slot in enumerate(slots):
        if not isinstance(slot, dict) or not isinstance(slot.get("name"), str) or not slot["name"]:
            raise bad_manifest(f"slots[{i}] needs a non-empty 'name'")
        if slot.get("type") not in SLOT_TYPES:
            raise bad_manifest(f"slots[{i}].type must be one of {sorted(SLOT_TYPES)}")
        files = slot.get("files")
        if not isinstance(files, list):
            raise bad_manifest(f"slots[{i}].files must be a list")
        for j, f in enumerate(files):
            _check_file(f"slots[{i}].files[{j}]", f, sizes)
    return slots, metadata, sizes


def blob_received(route: str, digest: str, size: int, *, new: bool) -> None:
    """One line per blob whose bytes a request delivered whole (a PUT, a finished
    upload, a blob of a batch), `new` when the store did not hold it yet: the audit of
    what clients uploaded, per digest (a client sending bytes the store already held
    shows as new=false). A body that broke off is not a delivery and is not logged."""
    _log.info("blob_received", route=route, digest=digest, size=size, new=new)


def blob_size(store: Store, d: str) -> int | None:
    """The stored blob's size, or None (blocking: run on the thread pool)."""
    try:
        return store.blobs.path(d).stat().st_size
    except FileNotFoundError:
        return None


def check_blobs(sizes: dict[str, int], held: Callable[[str], int | None]) -> None:
    """Every blob a manifest names is stored with the size it gives (`held(digest)` is
    the stored size or None), else the ApiError naming what to send or fix."""
    missing, wrong = [], []
    for d, size in sizes.items():
        have = held(d)
        if have is None:
            missing.append(d)
        elif have != size:
            wrong.append({"digest": d, "size": size, "stored_size": have})
    if missing:
        raise ApiError(
            409,
            "missing_blobs",
            f"{len(missing)} referenced blob(s) not stored; upload them first",
            missing=sorted(missing),
        )
    if wrong:
        raise ApiError(
            400, "size_mismatch", "manifest sizes differ from the stored blobs", mismatched=wrong
        )
