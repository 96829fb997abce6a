"""The `labelbox` sink: items become Labelbox data rows, over Labelbox's GraphQL API.

Everything is one endpoint (`https://api.labelbox.com/graphql`, or `<base_url>/graphql`)
with `Authorization: Bearer <key>`. The requests and answers follow labelbox-python 6
(the SDK's HTTP layer, see docs/platforms.md); the SDK itself is not used.

How an item maps to a data row (docs/platforms.md has the user-facing table):

- Identity: the row's `global_key` is `ingestd:<dataset>:<item key>` (':' and '%' in the
  dataset name percent-encoded, so the first ':' after the dataset always ends it; item
  keys start with '/'). Global keys are unique across the whole organisation, which is
  why the dataset name is part of it. Over Labelbox's 200-character limit it becomes
  `ingestd:sha256:<hex of dataset NUL key>`. `external_id` is the item key.
- Bytes: every local or streamed file goes through `uploadFile` (a GraphQL multipart
  request) as a stream with a known length, checked against its digest on the way; the
  hosted URL that comes back is used. Registered bucket objects (`transfer: register`)
  are referenced by their https URL: s3://b/k -> https://b.s3.amazonaws.com/k, gs://b/k
  -> https://storage.googleapis.com/b/k (private buckets need the dataset's delegated-
  access integration); az:// cannot be formed without the storage account and fails.
- A row holds one asset: the item's first file is `row_data`; every other file becomes
  an attachment (image slots IMAGE, channel layers IMAGE_OVERLAY, videos VIDEO, other
  files a RAW_TEXT link to the hosted copy). `media_type` comes from the first slot.
- Rows are written with `upsertDataRows` keyed by GKEY ("could be existing or
  non-existing", labelbox-python KeyType), so a re-put updates the same row; its
  payload replaces the row's metadata and attachments. Puts that arrive within
  `batch_window` share one manifest and one task; each caller gets its own row's result.
- Metadata keys resolve to schema ids through the organisation's metadata ontology;
  missing keys are created (numbers as number fields, everything else as strings).
- Metadata-only changes go through `upsertDataRowCustomMetadata` (batches of 50), after
  deleting the fields the item no longer has; deletes look rows up by global key
  (`dataRowsForGlobalKeys` job) and call `deleteDataRows`.

Retries, the request budget and auth errors are PlatformClient's; GraphQL-level errors
(an HTTP 200 or 400 carrying `errors`) are classified here. The key is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import mimetypes
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import structlog

from ingestd.config import LabelboxBackend
from ingestd.core.errors import PermanentError, RetriableError, SourceChangedError, SyncError
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload, item_key
from ingestd.sinks.base import Capabilities, Manifest, PutResult, SinkBase, read_chunks, reading
from ingestd.sinks.platform import Answer, PlatformClient, RateLimiter

log = structlog.get_logger("ingestd.sink.labelbox")

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_ENDPOINT = "https://api.labelbox.com/graphql"
DEFAULT_PER_MINUTE = 1500  # the free tier's documented API limit, the lowest of all plans
GLOBAL_KEY_MAX = 200  # Labelbox limits page: max characters of a global key
CHUNK_MAX_BYTES = 10_000_000  # the SDK's upsert chunk size
DIRECT_UPLOAD_MAX = 500_000_000  # documented limit of a direct upload
METADATA_BATCH = 50  # the SDK's metadata batch size
NAME_MAX = 100  # metadata schema names (SDK: 1..100 characters)
STRING_MAX = 4096  # string metadata values (SDK)
PAGE = 5000  # the SDK's page size for task results

# GraphQL answers to a rejected query come back as 400 (or 422) with an `errors` list.
_GQL_ERROR_STATUSES = frozenset({400, 422})

Q_DATASETS = """query GetDatasetsPyApi($name: String!, $deleted: Boolean!) {
  datasets(where: {AND: [{name: $name}, {deleted: $deleted}]}, skip: 0, first: 100) {
    id name createdAt
  }
}"""
M_CREATE_DATASET = """mutation CreateDatasetPyApi($name: String!) {
  createDataset(data: {name: $name}) { id name createdAt }
}"""
M_UPLOAD_FILE = """mutation UploadFile($file: Upload!, $contentLength: Int!, $sign: Boolean) {
  uploadFile(file: $file, contentLength: $contentLength, sign: $sign) { url filename }
}"""
M_UPSERT_ROWS = """mutation UpsertDataRowsPyApi($manifestUri: String!) {
  upsertDataRows(data: {manifestUri: $manifestUri}) { id status completionPercentage }
}"""
Q_TASK = """query GetUserCreatedTasksPyApi($taskId: ID!) {
  user { createdTasks(where: {id: $taskId}, skip: 0, first: 1) { id status completionPercentage } }
}"""
Q_FAILED_ROWS = """query FailedDataRowImportsPyApi($taskId: ID!, $first: Int, $from: String) {
  failedDataRowImports(data: {taskId: $taskId, first: $first, from: $from}) {
    after total results { message spec { externalId globalKey rowData } }
  }
}"""
Q_ONTOLOGY = """query GetMetadataOntologyBetaPyApi {
  customMetadataOntology { id name kind reserved options { id kind name reserved } }
}"""
M_UPSERT_SCHEMA = """mutation UpsertCustomMetadataSchemaPyApi($data: UpsertCustomMetadataSchemaInput!) {
  upsertCustomMetadataSchema(data: $data) { id name kind options { id name kind } }
}"""
Q_ROW_METADATA = """query dataRowCustomMetadataPyApi(
  $dataRowIdentifiers: DataRowCustomMetadataDataRowIdentifiersInput
) {
  dataRowCustomMetadata(where: {dataRowIdentifiers: $dataRowIdentifiers}) {
    dataRowId globalKey fields { value schemaId }
  }
}"""
M_DELETE_METADATA = """mutation DeleteDataRowMetadataBetaPyApi(
  $deletes: [DataRowIdentifierCustomMetadataBatchDeleteInput!]
) {
  deleteDataRowCustomMetadata(dataRowIdentifiers: $deletes) {
    dataRowId error fields { value schemaId }
  }
}"""
M_UPSERT_METADATA = """mutation UpsertDataRowMetadataBetaPyApi(
  $metadata: [DataRowCustomMetadataBatchUpsertInput!]!
) {
  upsertDataRowCustomMetadata(data: $metadata) {
    globalKey dataRowId error fields { value schemaId }
  }
}"""
Q_KEYS_JOB = """query getDataRowsForGlobalKeysPyApi($globalKeys: [ID!]!) {
  dataRowsForGlobalKeys(where: {ids: $globalKeys}) { jobId }
}"""
Q_KEYS_RESULT = """query getDataRowsForGlobalKeysResultPyApi($jobId: ID!) {
  dataRowsForGlobalKeysResult(jobId: {id: $jobId}) {
    data { fetchedDataRows { id } notFoundGlobalKeys accessDeniedGlobalKeys } jobStatus
  }
}"""
M_DELETE_ROWS = """mutation DeleteDataRowsPyApi($ids: [ID!]!) {
  deleteDataRows(where: {dataRowIds: $ids}) { id }
}"""

KIND_STRING = "CustomMetadataString"
KIND_NUMBER = "CustomMetadataNumber"
KIND_DATETIME = "CustomMetadataDateTime"
KIND_ENUM = "CustomMetadataEnum"

_MEDIA_TYPES = {"image": "IMAGE", "video": "VIDEO", "frames": "IMAGE", "dicom": "DICOM"}
# For `file` slots (nothing detected): what the extension says, or nothing (Labelbox then
# detects the type itself).
_EXT_MEDIA = {
    ".pdf": "PDF",
    ".txt": "TEXT",
    ".html": "HTML",
    ".htm": "HTML",
    ".wav": "AUDIO",
    ".mp3": "AUDIO",
    ".m4a": "AUDIO",
    ".flac": "AUDIO",
}
_LINK_ATTACHMENT = {"PDF": "PDF_URL", "TEXT": "TEXT_URL", "HTML": "HTML"}
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


# --- identity and URLs ---------------------------------------------------------------


def global_key(dataset: str, key: str) -> str:
    """The row's global key for item `key` of `dataset` (see the module docstring)."""
    ds = dataset.replace("%", "%25").replace(":", "%3A")
    gk = f"ingestd:{ds}:{key}"
    if len(gk) <= GLOBAL_KEY_MAX:
        return gk
    digest = hashlib.sha256(f"{dataset}\0{key}".encode()).hexdigest()
    return f"ingestd:sha256:{digest}"


def https_url(url: str) -> str:
    """The https URL Labelbox needs as `row_data` for a registered object."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise PermanentError(f"{url!r} is not a URL Labelbox can reference")
    if scheme == "https":
        return url
    bucket, _, key = rest.partition("/")
    path = quote(key, safe="/")  # '#', '?', '%' and spaces must not end or bend the URL
    if scheme == "s3":
        if "." in bucket:  # virtual-hosted TLS fails for dotted names; path style works
            return f"https://s3.amazonaws.com/{bucket}/{path}"
        return f"https://{bucket}.s3.amazonaws.com/{path}"
    if scheme == "gs":
        return f"https://storage.googleapis.com/{bucket}/{path}"
    if scheme == "az":
        raise PermanentError(
            f"{url}: Labelbox needs an https URL, and an az:// URL does not name the storage "
            "account that URL would need; use transfer: copy for this watch"
        )
    raise PermanentError(
        f"{url}: Labelbox only takes https URLs (or s3://, gs:// objects it can reach "
        "through a delegated-access integration)"
    )


def _upload_name(name: str) -> str:
    """The file name sent with an upload. Labelbox builds the hosted URL from it without
    encoding, so anything but [A-Za-z0-9._-] (a '#' above all) would break that URL;
    the real name lives on in external_id and the attachment names."""
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    stem = _SAFE_NAME.sub("_", stem).strip("_")[:80] or "file"
    ext = _SAFE_NAME.sub("", ext)[:10]
    return f"{stem}.{ext}" if ext else stem


def _media_type(slot: SlotPayload, file: FilePayload) -> str | None:
    if slot.type in _MEDIA_TYPES:
        return _MEDIA_TYPES[slot.type]
    ext = "." + file.name.rpartition(".")[2].lower() if "." in file.name else ""
    if ext in _EXT_MEDIA:
        return _EXT_MEDIA[ext]
    guessed = mimetypes.guess_type(file.name)[0] or ""
    if guessed.startswith("image/"):
        return "IMAGE"
    if guessed.startswith("video/"):
        return "VIDEO"
    return None


def _layers(item: ItemPayload) -> set[str]:
    """Slots shown as layers of one view (a grid cell holding several slots: the
    channels grouping), which become IMAGE_OVERLAY attachments."""
    layout = item.slots[0].extra.get("layout") if item.slots else None
    out: set[str] = set()
    if isinstance(layout, dict):
        for row in layout.get("rows") or []:
            for cell in row or []:
                if isinstance(cell, list) and len(cell) > 1:
                    out.update(str(n) for n in cell)
    return out


@dataclass(frozen=True, slots=True)
class _Asset:
    """One file of an item and what it becomes in the row."""

    file: FilePayload
    slot: SlotPayload
    attachment_type: str | None  # None for the row's own asset
    name: str  # the attachment name


def _assets(item: ItemPayload) -> list[_Asset]:
    files = [(s, i, f) for s in item.slots for i, f in enumerate(s.files)]
    if not files:
        raise PermanentError(f"{item.key} has no files to send")
    layers = _layers(item)
    out = []
    for n, (slot, i, f) in enumerate(files):
        if n == 0:
            out.append(_Asset(f, slot, None, f.name))
            continue
        if slot.type == "frames":
            stamps = slot.extra.get("timestamps") or []
            at = f"t={float(stamps[i]):.3f}s " if i < len(stamps) else ""
            out.append(_Asset(f, slot, "IMAGE", f"{at}{f.name}"))
            continue
        if slot.type == "dicom" and len(slot.files) > 1:
            name = f"slice {i + 1} of {len(slot.files)}: {f.name}"
        elif len(item.slots) > 1 and slot.name != f.name:
            name = f"slot {slot.name}: {f.name}"
        else:
            name = f.name
        media = _media_type(slot, f)
        if media == "IMAGE":
            kind = "IMAGE_OVERLAY" if slot.name in layers else "IMAGE"
        elif media == "VIDEO":
            kind = "VIDEO"
        else:  # Labelbox shows a RAW_TEXT hyperlink as a clickable link
            kind = _LINK_ATTACHMENT.get(media or "", "RAW_TEXT")
        out.append(_Asset(f, slot, kind, name))
    return out


# --- reading local bytes ---------------------------------------------------------------


@dataclass(slots=True)
class _Stream:
    """The upload body of one file: multipart head, the file's bytes as they are read,
    multipart tail. A read or digest failure is kept in `error` so that the next
    attempt's body factory raises it instead of sending the file again."""

    file: FilePayload
    head: bytes
    tail: bytes
    error: SyncError | None = None

    @property
    def length(self) -> int:
        return len(self.head) + self.file.size + len(self.tail)

    def body(self) -> AsyncIterator[bytes]:
        if self.error is not None:
            raise self.error
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        f = self.file
        where = f.local_path or f.name
        yield self.head
        h = hashlib.sha256()
        n = 0
        try:
            with reading(where):
                async for block in read_chunks(f):
                    n += len(block)
                    if n > f.size:
                        raise SourceChangedError(f"{where} grew after it was hashed")
                    h.update(block)
                    yield block
            if n != f.size:
                raise SourceChangedError(
                    f"{where} changed after it was hashed ({n} bytes, expected {f.size})"
                )
            if f.digest and f"sha256:{h.hexdigest()}" != f.digest:
                raise SourceChangedError(
                    f"{where} changed after it was hashed (expected {f.digest})"
                )
        except SyncError as e:
            self.error = e
            raise
        yield self.tail


def _multipart(boundary: str, operations: str, filename: str, content_type: str) -> bytes:
    quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
    return (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="operations"\r\n'
        "Content-Type: application/json\r\n\r\n"
        f"{operations}\r\n"
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="map"\r\n'
        "Content-Type: application/json\r\n\r\n"
        '{"1": ["variables.file"]}\r\n'
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="1"; filename="{quoted}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()


# --- batching --------------------------------------------------------------------------


class _Batcher(Generic[T, R]):
    """Collects calls arriving within `window` seconds (up to `size`) and runs them as
    one batch; each caller gets its own entry's result. A key already waiting in the
    batch starts a new batch, so one batch never holds a key twice (Labelbox refuses
    a duplicate global key in one task)."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        size: int,
        window: float,
        key: Callable[[T], str],
    ) -> None:
        self.run = run
        self.size = size
        self.window = window
        self.key = key
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._keys: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, entry: T) -> R:
        loop = asyncio.get_running_loop()
        k = self.key(entry)
        if k in self._keys:
            self._flush()
        fut: asyncio.Future[R] = loop.create_future()
        # A caller that gave up leaves its future behind: retrieve its outcome so that
        # asyncio does not report an exception nobody awaited.
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending.append((entry, fut))
        self._keys.add(k)
        if len(self._pending) >= self.size:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.window, self._flush)
        # The batch goes on for the others when one caller is cancelled.
        return await asyncio.shield(fut)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending, self._keys = self._pending, [], set()
        if batch:
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results: Sequence[R | BaseException] = await self.run([e for e, _ in batch])
            if len(results) != len(batch):  # a bug, but callers must not hang on it
                raise RuntimeError(f"batch of {len(batch)} gave {len(results)} results")
        except asyncio.CancelledError:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(RetriableError("Labelbox sink closed mid-request"))
            raise
        except Exception as e:
            results = [e] * len(batch)
        for (_, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(RetriableError("Labelbox sink closed"))
        self._pending, self._keys = [], set()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


# --- metadata ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Schema:
    id: str
    name: str
    kind: str
    reserved: bool
    options: dict[str, str] = field(default_factory=dict)  # option name -> option id


class _Ontology:
    """The organisation's metadata schemas, loaded once and refreshed when a name is
    missing; missing names are created. One lock: concurrent items that introduce the
    same key create it once."""

    def __init__(self, sink: LabelboxSink) -> None:
        self.sink = sink
        self.reserved: dict[str, _Schema] = {}
        self.custom: dict[str, _Schema] = {}
        self.loaded = False
        self.lock = asyncio.Lock()

    async def load(self) -> None:
        data = await self.sink._gql(Q_ONTOLOGY, {}, "reading the metadata schemas")
        reserved: dict[str, _Schema] = {}
        custom: dict[str, _Schema] = {}
        for s in data.get("customMetadataOntology") or []:
            schema = _parse_schema(s)
            (reserved if schema.reserved else custom)[schema.name] = schema
        self.reserved, self.custom, self.loaded = reserved, custom, True

    def find(self, name: str) -> _Schema | None:
        # Reserved names win, as in the SDK's lookup.
        return self.reserved.get(name) or self.custom.get(name)

    async def schema(self, name: str, value: Any, where: str) -> _Schema:
        async with self.lock:
            if not self.loaded:
                await self.load()
            schema = self.find(name)
            if schema is None:
                await self.load()  # another process may have created it meanwhile
                schema = self.find(name)
            if schema is None:
                schema = await self._create(name, value, where)
            return schema

    async def _create(self, name: str, value: Any, where: str) -> _Schema:
        kind = KIND_NUMBER if _is_number(value) else KIND_STRING
        try:
            data = await self.sink._gql(
                M_UPSERT_SCHEMA,
                {"data": {"name": name, "kind": kind}},
                f"creating metadata field {name!r}",
            )
        except PermanentError as e:
            await self.load()
            schema = self.find(name)
            if schema is not None:  # created by someone else in between
                return schema
            raise PermanentError(
                f"{where}: metadata key {name!r} is not a metadata field in Labelbox and "
                f"creating it failed ({e.reason}); create it in Labelbox's metadata "
                "schema, or leave the key out (each plan has a limit on custom fields)"
            ) from None
        schema = _parse_schema(data["upsertCustomMetadataSchema"])
        self.custom[schema.name] = schema
        log.info("created a metadata field in Labelbox", field=name, kind=kind)
        return schema

    async def fields(self, metadata: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for name, value in metadata.items():
            if value is None:
                continue
            if not name.strip() or len(name.strip()) > NAME_MAX:
                raise PermanentError(
                    f"{where}: metadata key {name[:120]!r} cannot be a Labelbox metadata "
                    f"field name (1 to {NAME_MAX} characters); rename it"
                )
            schema = await self.schema(name.strip(), value, where)
            out.extend(_encode(schema, value, where))
        return out


def _parse_schema(s: Mapping[str, Any]) -> _Schema:
    options = {str(o["name"]): str(o["id"]) for o in s.get("options") or []}
    return _Schema(str(s["id"]), str(s["name"]), str(s["kind"]), bool(s.get("reserved")), options)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if _is_number(value):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _encode(schema: _Schema, value: Any, where: str) -> list[dict[str, Any]]:
    """`value` as the metadata field entries Labelbox takes for this schema kind."""
    name = schema.name
    if schema.kind == KIND_STRING:
        text = _as_text(value)
        if len(text) > STRING_MAX:
            raise PermanentError(
                f"{where}: metadata {name!r} is {len(text)} characters long; Labelbox "
                f"text fields hold at most {STRING_MAX}"
            )
        return [{"schemaId": schema.id, "value": text}]
    if schema.kind == KIND_NUMBER:
        number: float | None = float(value) if _is_number(value) else None
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None or number != number or number in (float("inf"), float("-inf")):
            raise PermanentError(
                f"{where}: metadata {name!r} is a number field in Labelbox but this item "
                f"has {_as_text(value)[:80]!r}; make the value a number or use another key"
            )
        return [{"schemaId": schema.id, "value": number}]
    if schema.kind == KIND_DATETIME:
        when = None
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if when is None:
            raise PermanentError(
                f"{where}: metadata {name!r} is a date-time field in Labelbox but this item "
                f"has {_as_text(value)[:80]!r}; use an ISO 8601 time such as "
                "2024-05-01T12:00:00Z"
            )
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        stamp = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return [{"schemaId": schema.id, "value": stamp}]
    if schema.kind == KIND_ENUM:
        option = schema.options.get(_as_text(value))
        if option is None:
            choices = ", ".join(sorted(schema.options)[:10]) or "none"
            raise PermanentError(
                f"{where}: metadata {name!r} is a choice field in Labelbox and "
                f"{_as_text(value)[:80]!r} is not one of its options ({choices})"
            )
        # The SDK's enum upsert: the field itself and the chosen option.
        return [{"schemaId": schema.id, "value": {}}, {"schemaId": option, "value": {}}]
    raise PermanentError(
        f"{where}: metadata {name!r} is a {schema.kind} field in Labelbox, which ingestd "
        "cannot fill; rename the key"
    )


# --- the sink ---------------------------------------------------------------------------


class _Limiter(RateLimiter):
    """The request budget, which a Retry-After pauses for every request of the sink."""

    def __init__(self, per_minute: int) -> None:
        super().__init__(per_minute)
        self.paused_until = 0.0

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    async def acquire(self) -> None:
        while (wait := self.paused_until - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        await super().acquire()


class _Client(PlatformClient):
    """PlatformClient whose Retry-After holds back all of the sink's requests, not only
    the one it answered: Labelbox's limit is per key, so the others would be refused
    too (and would prolong the storm)."""

    def __init__(self, *args: Any, per_minute: int, **kw: Any) -> None:
        super().__init__(*args, per_minute=per_minute, **kw)
        self.limiter: _Limiter = _Limiter(per_minute)

    def _delay(self, failures: int, retry_after: float | None) -> float:
        if retry_after is not None:
            self.limiter.pause(retry_after)
        return super()._delay(failures, retry_after)


@dataclass(slots=True)
class _Row:
    dataset_id: str
    key: str  # the item key
    gk: str
    payload: dict[str, Any]


@dataclass(slots=True)
class _MetaUpdate:
    key: str
    gk: str
    fields: list[dict[str, Any]]


class _RowMissing(Exception):
    """A metadata update found no row for the key: the whole item must be put."""


# long: Labelbox's GraphQL mapping, batcher and task poller in one class; issue 13 puts it on the shared sink skeleton
class LabelboxSink(SinkBase):
    capabilities = Capabilities(remote_urls=True, metadata_update=True, delete=True)

    # Tunables, as attributes so tests can tighten them.
    batch_window = 0.05  # seconds a put waits for others to share its task
    batch_rows = 100
    poll_first = 0.5
    poll_max = 5.0
    task_timeout = 900.0
    files_per_item = 4  # uploads of one item at once (a DICOM series can have hundreds)

    def __init__(self, backend: LabelboxBackend, *, workers: int = 8) -> None:
        base = (backend.base_url or "").rstrip("/")
        if not base:
            self.endpoint = DEFAULT_ENDPOINT
        elif base.endswith("/graphql"):
            self.endpoint = base
        else:
            self.endpoint = f"{base}/graphql"
        hint = (
            f"backend.api_key_file {backend.api_key_file}"
            if backend.api_key_file is not None
            else f"backend.api_key_env {backend.api_key_env}"
        )
        self.client = _Client(
            "Labelbox",
            {"Authorization": f"Bearer {backend.api_key()}"},
            per_minute=backend.requests_per_minute or DEFAULT_PER_MINUTE,
            key_hint=hint,
            connections=max(8, workers * 2),
        )
        self._datasets: dict[str, str] = {}
        self._dataset_locks: dict[str, asyncio.Lock] = {}
        self._ontology = _Ontology(self)
        self._puts: dict[str, _Batcher[_Row, PutResult]] = {}
        self._meta: _Batcher[_MetaUpdate, PutResult] = _Batcher(
            self._flush_metadata, size=METADATA_BATCH, window=self.batch_window, key=_gk_of
        )
        self._deletes: _Batcher[str, None] = _Batcher(
            self._flush_deletes, size=METADATA_BATCH, window=self.batch_window, key=str
        )

    def __repr__(self) -> str:  # never the key
        return f"LabelboxSink({self.endpoint!r})"

    # --- the Sink interface ----------------------------------------------------------

    async def ensure_dataset(self, dataset: str) -> None:
        await self._dataset_id(dataset)

    async def put_item(
        self, dataset: str, item: ItemPayload, previous: Manifest | None = None
    ) -> PutResult:
        dataset_id = await self._dataset_id(dataset)
        gk = global_key(dataset, item.key)
        where = f"{item.key} (dataset {dataset})"
        assets = _assets(item)
        # Metadata first: a bad key fails the item before any bytes move.
        metadata = await self._ontology.fields(item.metadata, where)
        urls = await self._urls(item, assets)
        first = assets[0]
        payload: dict[str, Any] = {
            "row_data": urls[0],
            "global_key": gk,
            "external_id": item.key,
            "metadata_fields": metadata,
            "attachments": [
                {"type": a.attachment_type, "value": url, "name": a.name}
                for a, url in zip(assets[1:], urls[1:], strict=True)
            ],
            "dataset_id": dataset_id,
        }
        media = _media_type(first.slot, first.file)
        if media is not None:
            payload["media_type"] = media
        batcher = self._puts.get(dataset_id)
        if batcher is None:
            batcher = self._puts[dataset_id] = _Batcher(
                self._flush_rows, size=self.batch_rows, window=self.batch_window, key=_gk_of
            )
        return await batcher.submit(_Row(dataset_id, item.key, gk, payload))

    async def update_metadata(
        self, dataset: str, item: ItemPayload, backend_id: str | None
    ) -> PutResult:
        gk = global_key(dataset, item.key)
        metadata = await self._ontology.fields(item.metadata, f"{item.key} (dataset {dataset})")
        try:
            return await self._meta.submit(_MetaUpdate(item.key, gk, metadata))
        except _RowMissing:
            log.info(
                "no Labelbox row for a metadata update; sending the whole item",
                dataset=dataset,
                item=item.key,
            )
            return await self.put_item(dataset, item)

    async def delete_item(self, dataset: str, path: str, name: str) -> None:
        await self._deletes.submit(global_key(dataset, item_key(path, name)))

    async def close(self) -> None:
        for batcher in [*self._puts.values(), self._meta, self._deletes]:
            await batcher.close()
        await self.client.close()

    # --- datasets --------------------------------------------------------------------

    async def _dataset_id(self, dataset: str) -> str:
        known = self._datasets.get(dataset)
        if known is not None:
            return known
        lock = self._dataset_locks.setdefault(dataset, asyncio.Lock())
        async with lock:
            if dataset in self._datasets:
                return self._datasets[dataset]
            data = await self._gql(
                Q_DATASETS, {"name": dataset, "deleted": False}, f"looking up dataset {dataset!r}"
            )
            found = [d for d in data.get("datasets") or [] if d.get("name") == dataset]
            if found:
                found.sort(key=lambda d: str(d.get("createdAt") or ""))
                if len(found) > 1:
                    log.warning(
                        "several Labelbox datasets have this name; using the oldest",
                        dataset=dataset,
                        ids=[d["id"] for d in found],
                    )
                ds_id = str(found[0]["id"])
            else:
                data = await self._gql(
                    M_CREATE_DATASET, {"name": dataset}, f"creating dataset {dataset!r}"
                )
                ds_id = str(data["createDataset"]["id"])
                log.info("created a Labelbox dataset", dataset=dataset, id=ds_id)
            self._datasets[dataset] = ds_id
            return ds_id

    # --- GraphQL ---------------------------------------------------------------------

    async def _gql(self, query: str, variables: Mapping[str, Any], what: str) -> dict[str, Any]:
        ans = await self.client.request(
            "POST",
            self.endpoint,
            what=what,
            json_body={"query": query, "variables": dict(variables)},
            ok=_GQL_ERROR_STATUSES,
        )
        return self._data(ans, what)

    def _data(self, ans: Answer, what: str) -> dict[str, Any]:
        body = ans.json()
        if not isinstance(body, dict):
            reason = f"Labelbox {what}: unreadable answer (HTTP {ans.status}): {ans.text(200)}"
            if ans.status >= 400:
                raise PermanentError(reason)
            raise RetriableError(reason)
        message = body.get("message")
        if isinstance(message, str) and message.startswith("You have exceeded"):
            raise RetriableError(f"Labelbox {what}: {message}", 60.0)
        errors = body.get("errors")
        if errors:
            raise self._graphql_error(errors, what)
        data = body.get("data")
        if not isinstance(data, dict):
            raise RetriableError(f"Labelbox {what}: an answer without data: {ans.text(200)}")
        return data

    def _graphql_error(self, errors: Any, what: str) -> SyncError:
        items = [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
        messages = "; ".join(str(e.get("message") or "no message") for e in items[:3])
        messages = messages or str(errors)[:300]
        first = items[0] if items else {}
        ext = first.get("extensions") if isinstance(first.get("extensions"), dict) else {}
        code = str(ext.get("code") or "")
        if code == "AUTHENTICATION_ERROR":
            return PermanentError(
                f"Labelbox {what}: the API key was refused ({messages}); "
                f"check {self.client.key_hint}"
            )
        if code == "AUTHORIZATION_ERROR":
            return PermanentError(
                f"Labelbox {what}: the API key may not do this ({messages}); check the key's "
                f"role and {self.client.key_hint}"
            )
        if code == "INTERNAL_SERVER_ERROR":
            exc = ext.get("exception") if isinstance(ext.get("exception"), dict) else {}
            status = exc.get("status")
            if status in (400, 422, 426):
                return PermanentError(f"Labelbox {what}: rejected: {messages}")
            return RetriableError(f"Labelbox {what}: server error: {messages}")
        if code in ("GRAPHQL_VALIDATION_FAILED", "GRAPHQL_PARSE_FAILED"):
            return PermanentError(
                f"Labelbox {what}: the API refused ingestd's request ({messages}); "
                "the Labelbox API may have changed: please report this"
            )
        return PermanentError(f"Labelbox {what}: rejected: {messages}")

    # --- bytes -------------------------------------------------------------------------

    async def _urls(self, item: ItemPayload, assets: list[_Asset]) -> list[str]:
        """The URL of each asset: https forms of registered objects (checked first, so
        an unusable one fails before any upload), hosted copies of local bytes. Uploads
        of one item run a few at a time; the first failure stops the rest."""
        urls: list[str | None] = [
            https_url(a.file.url) if a.file.url is not None else None for a in assets
        ]
        slots = asyncio.Semaphore(self.files_per_item)

        async def upload(i: int) -> None:
            async with slots:
                urls[i] = await self._upload_file(assets[i].file, item.key)

        tasks = [asyncio.create_task(upload(i)) for i, u in enumerate(urls) if u is None]
        try:
            if tasks:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        errors = [t.exception() for t in tasks if not t.cancelled() and t.exception()]
        # The most telling failure: a changed source (redone anyway), then a rejection.
        for kind in (SourceChangedError, PermanentError, BaseException):
            for e in errors:
                if isinstance(e, kind):
                    raise e
        return [u for u in urls if u is not None]

    async def _upload_file(self, f: FilePayload, key: str) -> str:
        if f.size > DIRECT_UPLOAD_MAX:
            raise PermanentError(
                f"{f.local_path or f.name} is {f.size / 1e6:.0f} MB, over Labelbox's "
                f"{DIRECT_UPLOAD_MAX // 1_000_000} MB limit for uploaded files; put it in a "
                "bucket and register it (transfer: register) instead"
            )
        content_type = (
            f.content_type or mimetypes.guess_type(f.name)[0] or "application/octet-stream"
        )
        boundary = f"ingestd{secrets.token_hex(16)}"
        operations = json.dumps(
            {
                "query": M_UPLOAD_FILE,
                "variables": {"file": None, "contentLength": f.size, "sign": False},
            }
        )
        stream = _Stream(
            f,
            _multipart(boundary, operations, _upload_name(f.name), content_type),
            f"\r\n--{boundary}--\r\n".encode(),
        )
        started = time.monotonic()
        ans = await self.client.request(
            "POST",
            self.endpoint,
            what=f"uploading {f.name} of {key}",
            body=stream.body,
            headers={
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(stream.length),
            },
            ok=_GQL_ERROR_STATUSES,
        )
        if stream.error is not None:  # the server answered before the body went wrong
            raise stream.error
        data = self._data(ans, f"uploading {f.name} of {key}")
        url = str((data.get("uploadFile") or {}).get("url") or "")
        if not url:
            raise RetriableError(f"Labelbox uploading {f.name} of {key}: no URL in the answer")
        log.debug(
            "uploaded",
            item=key,
            file=f.name,
            bytes=f.size,
            seconds=round(time.monotonic() - started, 3),
        )
        return url

    async def _upload_bytes(self, data: bytes, filename: str, what: str) -> str:
        """A small in-memory document (a JSON chunk or manifest) through uploadFile."""
        boundary = f"ingestd{secrets.token_hex(16)}"
        operations = json.dumps(
            {
                "query": M_UPLOAD_FILE,
                "variables": {"file": None, "contentLength": len(data), "sign": False},
            }
        )
        body = (
            _multipart(boundary, operations, filename, "application/json")
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        ans = await self.client.request(
            "POST",
            self.endpoint,
            what=what,
            body=lambda: body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            ok=_GQL_ERROR_STATUSES,
        )
        url = str((self._data(ans, what).get("uploadFile") or {}).get("url") or "")
        if not url:
            raise RetriableError(f"Labelbox {what}: no URL in the answer")
        return url

    # --- rows: manifest + upsertDataRows task ---------------------------------------

    async def _flush_rows(self, rows: list[_Row]) -> list[PutResult | BaseException]:
        specs = [{"id": {"type": "GKEY", "value": r.gk}, "payload": r.payload} for r in rows]
        uris = []
        for chunk in _chunks(specs, CHUNK_MAX_BYTES):
            uris.append(await self._upload_bytes(chunk, "json_import.json", "uploading rows"))
        manifest = json.dumps(
            {"source": "SDK", "item_count": len(specs), "chunk_uris": uris}
        ).encode()
        manifest_uri = await self._upload_bytes(manifest, "manifest.json", "uploading a manifest")
        data = await self._gql(M_UPSERT_ROWS, {"manifestUri": manifest_uri}, "upserting rows")
        task = data["upsertDataRows"]
        task_id = str(task["id"])
        log.debug("upsert task started", task=task_id, rows=len(rows))
        status = await self._wait_task(task_id, str(task.get("status") or ""))
        failed = await self._failed_rows(task_id)
        results: list[PutResult | BaseException] = []
        unattributed = failed.pop("", None)
        for r in rows:
            message = failed.get(r.gk)
            if message is None and unattributed is not None and len(rows) == 1:
                message = unattributed
            if message is not None and status == "FAILED":
                # The whole task failed: whatever it says about the row, the next
                # attempt may well go through.
                results.append(RetriableError(f"Labelbox task {task_id} failed: {message}"))
            elif message is not None:
                log.warning("Labelbox refused a data row", item=r.key, reason=message)
                results.append(
                    PermanentError(f"Labelbox refused the data row for {r.key}: {message}")
                )
            elif status == "COMPLETE" and unattributed is None:
                results.append(PutResult(backend_id=r.gk, version=1, changed=True))
            else:
                reason = unattributed or f"task {task_id} ended {status}"
                results.append(RetriableError(f"Labelbox upserting {r.key}: {reason}"))
        return results

    async def _wait_task(self, task_id: str, status: str) -> str:
        delay = self.poll_first
        deadline = time.monotonic() + self.task_timeout
        while status not in ("COMPLETE", "FAILED"):
            if time.monotonic() > deadline:
                raise RetriableError(
                    f"Labelbox task {task_id} did not finish within {self.task_timeout:g}s; "
                    "the item is sent again later (the upsert is idempotent)"
                )
            await asyncio.sleep(delay)
            delay = min(self.poll_max, delay * 1.5)
            data = await self._gql(Q_TASK, {"taskId": task_id}, f"polling task {task_id}")
            tasks = (data.get("user") or {}).get("createdTasks") or []
            if not tasks:
                raise RetriableError(f"Labelbox task {task_id} vanished while it was polled")
            status = str(tasks[0].get("status") or "")
        return status

    async def _failed_rows(self, task_id: str) -> dict[str, str]:
        """global key -> message for the rows a task refused ("" for rows without one)."""
        out: dict[str, str] = {}
        cursor: str | None = None
        seen = 0
        while True:
            data = await self._gql(
                Q_FAILED_ROWS,
                {"taskId": task_id, "first": PAGE, "from": cursor},
                f"reading the failures of task {task_id}",
            )
            page = data.get("failedDataRowImports") or {}
            results = page.get("results") or []
            for r in results:
                spec = r.get("spec") or {}
                gk = str(spec.get("globalKey") or "")
                message = str(r.get("message") or "refused without a message")
                out[gk] = f"{out[gk]}; {message}" if gk in out else message
            seen += len(results)
            cursor = page.get("after")
            if not results or not cursor or seen >= int(page.get("total") or 0):
                return out

    # --- metadata-only updates ----------------------------------------------------------

    async def _flush_metadata(self, updates: list[_MetaUpdate]) -> list[PutResult | BaseException]:
        gks = [u.gk for u in updates]
        data = await self._gql(
            Q_ROW_METADATA,
            {"dataRowIdentifiers": {"ids": gks, "idType": "GKEY"}},
            "reading row metadata",
        )
        current: dict[str, set[str]] = {}
        for row in data.get("dataRowCustomMetadata") or []:
            gk = row.get("globalKey")
            if gk:
                current[str(gk)] = {str(f["schemaId"]) for f in row.get("fields") or []}
        errors: dict[str, BaseException] = {
            u.gk: _RowMissing(u.key) for u in updates if u.gk not in current
        }
        # The row's metadata is replaced, as by a full put: fields the item no longer
        # has are deleted first.
        deletes = []
        for u in updates:
            stale = current.get(u.gk, set()) - {str(f["schemaId"]) for f in u.fields}
            if u.gk not in errors and stale:
                deletes.append(
                    {
                        "dataRowIdentifier": {"id": u.gk, "idType": "GKEY"},
                        "schemaIds": sorted(stale),
                    }
                )
        if deletes:
            data = await self._gql(M_DELETE_METADATA, {"deletes": deletes}, "deleting metadata")
            self._metadata_errors(data.get("deleteDataRowCustomMetadata"), updates, errors)
        upserts = [
            {"globalKey": u.gk, "fields": u.fields}
            for u in updates
            if u.gk not in errors and u.fields
        ]
        if upserts:
            data = await self._gql(M_UPSERT_METADATA, {"metadata": upserts}, "updating metadata")
            self._metadata_errors(data.get("upsertDataRowCustomMetadata"), updates, errors)
        return [
            errors.get(u.gk) or PutResult(backend_id=u.gk, version=1, changed=True) for u in updates
        ]

    @staticmethod
    def _metadata_errors(
        answer: Any, updates: list[_MetaUpdate], errors: dict[str, BaseException]
    ) -> None:
        by_gk = {u.gk: u for u in updates}
        for r in answer or []:
            if not r.get("error"):
                continue
            gk = str(r.get("globalKey") or r.get("dataRowId") or "")
            target = [by_gk[gk]] if gk in by_gk else updates
            for u in target:
                errors.setdefault(
                    u.gk,
                    PermanentError(f"Labelbox refused the metadata of {u.key}: {r['error']}"),
                )

    # --- deletes -------------------------------------------------------------------------

    async def _flush_deletes(self, gks: list[str]) -> list[BaseException | None]:
        data = await self._gql(Q_KEYS_JOB, {"globalKeys": gks}, "looking up rows to delete")
        job_id = str(data["dataRowsForGlobalKeys"]["jobId"])
        delay = self.poll_first
        deadline = time.monotonic() + self.task_timeout
        while True:
            data = await self._gql(Q_KEYS_RESULT, {"jobId": job_id}, "looking up rows to delete")
            result = data["dataRowsForGlobalKeysResult"]
            status = str(result.get("jobStatus") or "")
            if status == "COMPLETE":
                break
            if status == "FAILED":
                raise RetriableError(f"Labelbox global key lookup {job_id} failed")
            if time.monotonic() > deadline:
                raise RetriableError(f"Labelbox global key lookup {job_id} did not finish")
            await asyncio.sleep(delay)
            delay = min(self.poll_max, delay * 1.5)
        found = result.get("data") or {}
        denied = {str(k) for k in found.get("accessDeniedGlobalKeys") or []}
        ids = [str(r.get("id") or "") for r in found.get("fetchedDataRows") or []]
        ids = [i for i in ids if i]
        if ids:
            await self._gql(M_DELETE_ROWS, {"ids": ids}, "deleting rows")
        return [
            PermanentError(
                f"Labelbox would not let the API key see the row with global key {gk}; "
                "check the key's role"
            )
            if gk in denied
            else None
            for gk in gks
        ]


def _gk_of(entry: _Row | _MetaUpdate) -> str:
    return entry.gk


def _chunks(specs: list[dict[str, Any]], limit: int) -> Iterator[bytes]:
    """The rows as JSON arrays of at most `limit` bytes each (a single bigger row goes
    alone, as in the SDK)."""
    parts: list[bytes] = []
    size = 2
    for spec in specs:
        encoded = json.dumps(spec, separators=(",", ":"), ensure_ascii=False).encode()
        if parts and size + len(encoded) + 1 > limit:
            yield b"[" + b",".join(parts) + b"]"
            parts, size = [], 2
        parts.append(encoded)
        size += len(encoded) + 1
    if parts:
        yield b"[" + b",".join(parts) + b"]"
