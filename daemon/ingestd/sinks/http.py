"""The `http` sink: items go to an `ingestd serve` ingestion server (daemon/ingestd/server/API.md).

Bytes first, then the manifest, as in an OCI registry: each file's blob is checked with
HEAD and sent only when the server lacks it (small files in one streamed PUT, large ones
through the resumable upload protocol), then the item's manifest is PUT, which the
server accepts only once every blob it names is stored. An interrupted put therefore
leaves nothing half-visible, and a redo skips whatever already arrived.

Retries live here, not in the caller (platforms.md): connection errors, timeouts, 408,
429 and 5xx are tried again with exponential backoff and full jitter, honouring
Retry-After, re-opening the file on every attempt; a large upload resumes from the
offset the server holds. When a call's attempts run out it raises RetriableError and
the ledger backs the item off for longer. Outages are handled once for the whole sink
(see `_Gate`): while the server refuses connections one probe at a time talks to it,
the other calls wait for its news, and the outage is logged once when it starts and
once when it ends.

The token is sent as a bearer header and appears nowhere else: not in logs, not in
error reasons, not in the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import email.utils
import json
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from functools import partial
from http import HTTPStatus
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import aiofiles
import aiofiles.threadpool.binary
import aiohttp
import structlog
from yarl import URL

from ingestd.core.backoff import full_jitter
from ingestd.core.errors import PermanentError, RetriableError, SourceChangedError, SyncError
from ingestd.core.model import FilePayload, ItemPayload, item_key
from ingestd.sinks.base import Capabilities, Manifest, PutResult, SinkBase, read_chunks, reading

log = structlog.get_logger("ingestd.sink.http")

T = TypeVar("T")

READ_CHUNK = 1 << 20  # bytes read from disk per step while streaming a body
MAX_ATTEMPTS = 5
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
CONNECT_TIMEOUT = 10.0
# Below this size a blob is PUT without asking first: the PUT costs the same round
# trip as a HEAD, the server answers 200 for a blob it has, and on loopback it doubled
# small-file throughput (HEAD + PUT + manifest vs PUT + manifest).
HEAD_MIN_SIZE = 64 << 10
FILES_PER_ITEM = 4  # blobs of one item uploaded at once (a DICOM series can have hundreds)
PAGE_SIZE = 500

# The probe ticket of the attempt running in this task (see _Gate), so that _send can
# tell the probe's requests from those of attempts admitted before the outage began.
_TICKET: contextvars.ContextVar[int | None] = contextvars.ContextVar("ticket", default=None)


class _Retry(Exception):
    """One attempt failed in a way another attempt may fix (never leaves this module)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _TooLarge(Exception):
    """A single-request blob PUT was over the server's body limit (413)."""


class _MissingBlobs(Exception):
    """The server refused a manifest because it lacks these blobs (409 missing_blobs)."""

    def __init__(self, digests: list[str]) -> None:
        super().__init__(", ".join(digests))
        self.digests = digests


@dataclass(frozen=True, slots=True)
class _Answer:
    """A response, read whole (the API's answers are small JSON documents)."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.body)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    @property
    def code(self) -> str:
        return str(self.json().get("code") or "")

    def message(self) -> str:
        """The server's `error` message, or what a proxy in between said."""
        error = self.json().get("error")
        if error:
            return str(error)
        text = self.body[:200].decode("utf-8", "replace").strip()
        if text:
            return text
        try:
            return HTTPStatus(self.status).phrase
        except ValueError:
            return "no message"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP dates are GMT; a naive parse means the zone was missing
        when = when.replace(tzinfo=UTC)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def _label(f: FilePayload) -> str:
    """The file as messages name it: its path, or the object a stream comes from."""
    return f.local_path or getattr(f.opener, "where", None) or f.name


class _StreamReader:
    """A streamed file (a bucket object) behind the part of a file handle that the
    upload code uses: forward seeks and sized reads over one pass of the stream, so
    the chunks of a resumable upload come from a single GET. A seek backwards (the
    server holds less than was sent) ends the attempt; the next one streams afresh."""

    def __init__(self, f: FilePayload) -> None:
        self._chunks = read_chunks(f)
        self._buf = bytearray()
        self._pos = 0
        self._eof = False

    async def read(self, n: int) -> bytes:
        while len(self._buf) < n and not self._eof:
            try:
                self._buf += await anext(self._chunks)
            except StopAsyncIteration:
                self._eof = True
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._pos += len(out)
        return out

    async def seek(self, offset: int) -> None:
        if offset < self._pos:
            raise _Retry("the server holds fewer bytes than were sent; streaming again")
        while self._pos < offset and await self.read(min(READ_CHUNK, offset - self._pos)):
            pass

    async def close(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]


_FileHandle = aiofiles.threadpool.binary.AsyncBufferedReader | _StreamReader


def _read_small(f: FilePayload) -> bytes:
    """A file of at most READ_CHUNK bytes in one go (blocking: run in a thread). One
    thread hop instead of four matters at thousands of small files per second."""
    with reading(f.local_path), open(f.local_path, "rb") as fh:
        data = fh.read(f.size + 1)
    if len(data) != f.size:
        raise SourceChangedError(
            f"{f.local_path} changed after it was hashed ({len(data)} bytes, expected {f.size})"
        )
    return data


class _FileBody:
    """`length` bytes of an open file from `offset`, read as the socket takes them.

    The file is opened before the request starts, so a vanished or unreadable file
    fails cleanly instead of mid-request. A read failure inside aiohttp's writer is
    wrapped by aiohttp into a generic connection error; `error` keeps the real cause
    for the caller. Every chunk handed over pushes the stall deadline back."""

    def __init__(
        self,
        fh: _FileHandle,
        f: FilePayload,
        offset: int,
        length: int,
        progress: Callable[[bool], None],
    ) -> None:
        self.fh = fh
        self.f = f
        self.offset = offset
        self.length = length
        self.progress = progress
        self.error: SyncError | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            with reading(_label(self.f)):
                await self.fh.seek(self.offset)
                remaining = self.length
                while remaining > 0:
                    chunk = await self.fh.read(min(READ_CHUNK, remaining))
                    if not chunk:
                        raise SourceChangedError(
                            f"{_label(self.f)} shrank after it was hashed "
                            f"(expected {self.f.size} bytes)"
                        )
                    remaining -= len(chunk)
                    self.progress(True)
                    yield chunk
            self.progress(False)  # all sent: from here the response wait is sock_read's job
        except SyncError as e:
            self.error = e
            raise


class _Gate:
    """Whether the server takes connections at all, shared by every call of one sink.

    A call that cannot connect marks the server down (one warning). While it is down,
    calls do not connect on their own: one of them at a time, the probe, may try once
    the shared backoff allows it, and the rest wait for its news (or give up an attempt
    when their own backoff runs out). N workers then cost one connection attempt per
    backoff step, not N. The first answer of any kind marks it up again (one info)."""

    def __init__(self, where: str, base: float, cap: float) -> None:
        self.where = where
        self.base = base
        self.cap = cap
        self.down = False
        self.reason = ""
        self._since = 0.0
        self._failures = 0
        self._next_probe = 0.0
        self._probe: int | None = None
        self._tickets = 0
        self._up = asyncio.Event()
        self._up.set()

    async def admit(self, wait: float, patience: float) -> int | None:
        """Wait `wait` seconds (a call's own jittered backoff), then let the call
        through. While the server is down, wait up to `patience` instead: return a probe
        ticket when it is this call's turn to probe, or raise _Retry when patience ran
        out first. Returns None for an ordinary pass."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        if not self.down:
            if wait > 0:
                await asyncio.sleep(wait)
            if not self.down:
                return None
        while self.down:
            now = loop.time()
            if self._probe is None and now >= self._next_probe:
                self._tickets += 1
                self._probe = self._tickets
                return self._probe
            # With a probe under way only its result can help; otherwise the next probe
            # slot might be ours.
            until = deadline if self._probe is not None else min(deadline, self._next_probe)
            if until <= now:
                raise _Retry(f"ingestion server {self.where} unreachable ({self.reason})")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._up.wait(), until - now)
        return None

    def check(self, ticket: int | None) -> None:
        """Just before a request: while the server is down only the probe may send;
        an attempt admitted before the outage began gives way instead."""
        if self.down and (ticket is None or ticket != self._probe):
            raise _Retry(f"ingestion server {self.where} unreachable ({self.reason})")

    def release(self, ticket: int | None) -> None:
        if ticket is not None and ticket == self._probe:
            self._probe = None

    def reached(self) -> None:
        if not self.down:
            return
        down_for = time.monotonic() - self._since
        self.down = False
        self._failures = 0
        self._probe = None
        self._up.set()
        log.info("ingestion server reachable again", url=self.where, down_for=round(down_for, 1))

    def unreachable(self, reason: str) -> None:
        loop = asyncio.get_running_loop()
        self.reason = reason
        if not self.down:
            self.down = True
            self._since = time.monotonic()
            self._failures = 1
            self._up.clear()
            log.warning("ingestion server unreachable", url=self.where, reason=reason)
        elif self._probe is not None:
            # Count failed probes only: requests that were already under way when the
            # outage began must not push the next probe minutes away.
            self._failures += 1
        step = min(self.cap, self.base * 2 ** min(self._failures, 30))
        self._next_probe = loop.time() + random.uniform(step / 2, step)


def _first_error(results: list[BaseException | None]) -> BaseException | None:
    """The failure that best describes an item whose files failed in different ways:
    a changed source (the item is redone anyway) before a rejection before the rest."""
    errors = [r for r in results if r is not None]
    for kind in (SourceChangedError, PermanentError, RetriableError):
        for e in errors:
            if isinstance(e, kind):
                return e
    return errors[0] if errors else None


# long: the upload protocol (monolithic and resumable), outage probe and retries in one class; issue 13 puts it on the shared sink skeleton
class HttpSink(SinkBase):
    capabilities = Capabilities(remote_urls=True, metadata_update=False, delete=True)

    # Tunables, as attributes so tests (and one-off tools) can tighten them.
    max_attempts = MAX_ATTEMPTS
    backoff_base = BACKOFF_BASE
    backoff_cap = BACKOFF_CAP
    page_size = PAGE_SIZE
    head_min_size = HEAD_MIN_SIZE

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        workers: int = 8,
        resumable_threshold: int = 64 << 20,
        chunk_size: int = 8 << 20,
        timeout: float = 60.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL such as http://ingest.example:8750")
        # Drop any user:password@ so that nothing secret reaches logs or reasons; the
        # token is the credential.
        netloc = parts.netloc.rpartition("@")[2]
        self.url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self._token = token
        self.limit = max(2, workers)
        self.resumable_threshold = resumable_threshold
        self.chunk_size = max(1, chunk_size)
        self.timeout = timeout
        self._http: aiohttp.ClientSession | None = None
        self._gate: _Gate | None = None
        self._slots: asyncio.Semaphore | None = None
        self._closed = False
        # digest -> resumable upload id, so a retry (or a later put of the same file in
        # this process) resumes the server's partial upload instead of starting over.
        self._uploads: dict[str, str] = {}
        # digest -> (lock, users): one upload per content at a time; a second item with
        # the same bytes waits and then finds the blob stored.
        self._blob_locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __repr__(self) -> str:  # never the token
        return f"HttpSink({self.url!r})"

    @property
    def reachable(self) -> bool:
        """False while the server refuses connections (between the outage's warning
        and its recovery info): callers can log their own retries quietly meanwhile."""
        return self._gate is None or not self._gate.down

    # --- the Sink interface ----------------------------------------------------------

    async def ensure_dataset(self, dataset: str) -> None:
        what = f"creating dataset {dataset!r} on {self.url}"
        path = f"/v1/datasets/{quote(dataset, safe='')}"

        async def attempt() -> None:
            ans = await self._send("PUT", path)
            if ans.status not in (200, 201):
                self._fail(ans, what)

        await self._retrying(what, attempt)

    async def put_item(
        self, dataset: str, item: ItemPayload, previous: Manifest | None = None
    ) -> PutResult:
        # Files registered by URL carry no local bytes; their manifest entry is enough.
        blobs: dict[str, FilePayload] = {}
        for slot in item.slots:
            for f in slot.files:
                if getattr(f, "url", None) is None:
                    blobs.setdefault(f.digest, f)
        await self._upload_all(list(blobs.values()))

        what = f"storing item {item.key!r} in dataset {dataset!r}"
        path = self._item_path(dataset, item.path, item.name)
        try:
            body = json.dumps(
                {"slots": [s.manifest() for s in item.slots], "metadata": item.metadata},
                ensure_ascii=False,
            ).encode()
        except (TypeError, ValueError) as e:
            raise PermanentError(f"{what}: the manifest is not JSON ({e})") from e
        try:
            ans = await self._retrying(what, partial(self._put_manifest, path, body, what))
        except _MissingBlobs as e:
            # The server lost (or never kept) blobs it said it had: send them again, once.
            missing = [blobs[d] for d in e.digests if d in blobs]
            if len(missing) != len(e.digests):
                raise PermanentError(
                    f"{what}: the server misses blobs this item does not hold: {e}"
                ) from None
            await self._upload_all(missing, check_first=False)
            try:
                ans = await self._retrying(what, partial(self._put_manifest, path, body, what))
            except _MissingBlobs as again:
                raise RetriableError(
                    f"{what}: the server still misses {len(again.digests)} blob(s) "
                    "after they were sent again"
                ) from None
        d = ans.json()
        return PutResult(
            backend_id=str(d.get("key") or item.key),
            version=int(d.get("version") or 1),
            changed=bool(d.get("changed", ans.status == 201)),
        )

    async def delete_item(self, dataset: str, path: str, name: str) -> None:
        what = f"deleting item {item_key(path, name)!r} from dataset {dataset!r}"
        url_path = self._item_path(dataset, path, name)

        async def attempt() -> None:
            ans = await self._send("DELETE", url_path)
            # 404: already gone, which is what was asked (a retried DELETE lands here).
            if ans.status not in (200, 204, 404):
                self._fail(ans, what)

        await self._retrying(what, attempt)

    async def close(self) -> None:
        self._closed = True
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()

    # --- listing (for `ingestd items`) -----------------------------------------------

    async def list_items(
        self, dataset: str, prefix: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Every item of `dataset` in key order, as `ingestd items --json` shows them,
        one page of `page_size` at a time. An unknown dataset has no items."""
        what = f"listing dataset {dataset!r} on {self.url}"
        path = f"/v1/datasets/{quote(dataset, safe='')}/items"
        cursor: str | None = None
        while True:
            params = {"limit": str(self.page_size)}
            if prefix:
                params["prefix"] = prefix
            if cursor:
                params["cursor"] = cursor
            page = await self._retrying(what, partial(self._get_page, path, params, what))
            if page is None:
                return
            for it in page.get("items") or []:
                yield it
            cursor = page.get("next_cursor")
            if not cursor:
                return

    async def _get_page(
        self, path: str, params: dict[str, str], what: str
    ) -> dict[str, Any] | None:
        ans = await self._send("GET", path, params=params)
        if ans.status == 404 and ans.code:  # the API's own 404: no such dataset
            return None
        if ans.status != 200:
            self._fail(ans, what)
        return ans.json()

    # --- blobs -----------------------------------------------------------------------

    async def _upload_all(self, files: list[FilePayload], *, check_first: bool = True) -> None:
        if len(files) == 1:
            await self._ensure_blob(files[0], check_first)
            return
        limit = asyncio.Semaphore(FILES_PER_ITEM)

        async def one(f: FilePayload) -> BaseException | None:
            async with limit:
                try:
                    await self._ensure_blob(f, check_first)
                except Exception as e:
                    return e
                return None

        # Every file finishes (or fails) before the item fails, so no upload is still
        # running when the caller hears about it.
        error = _first_error(list(await asyncio.gather(*(one(f) for f in files))))
        if error is not None:
            raise error

    async def _ensure_blob(self, f: FilePayload, check_first: bool) -> None:
        async with self._blob_lock(f.digest):
            what = f"uploading {_label(f)}"
            if f.size < self.resumable_threshold:
                try:
                    await self._retrying(what, partial(self._put_blob, f, check_first))
                    return
                except _TooLarge:
                    pass  # over the server's single-request limit: chunks may still fit
            state = {"offset": 0}
            await self._retrying(
                what,
                partial(self._resumable, f, state, check_first),
                progress=lambda: state["offset"],
            )

    @contextlib.asynccontextmanager
    async def _blob_lock(self, digest: str) -> AsyncIterator[None]:
        lock, users = self._blob_locks.get(digest) or (asyncio.Lock(), 0)
        self._blob_locks[digest] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._blob_locks[digest]
            if users <= 1:
                del self._blob_locks[digest]
            else:
                self._blob_locks[digest] = (lock, users - 1)

    async def _blob_stored(self, f: FilePayload, what: str) -> bool:
        ans = await self._send("HEAD", f"/v1/blobs/{f.digest}")
        if ans.status == 200:
            return True
        if ans.status != 404:
            self._fail(ans, what)
        return False

    async def _put_blob(self, f: FilePayload, check_first: bool) -> None:
        """One attempt at a small blob: HEAD (every attempt: a PUT whose answer was lost
        may have landed), then PUT streaming the file. Tiny blobs skip the HEAD."""
        what = f"uploading {_label(f)}"
        if check_first and f.size >= self.head_min_size and await self._blob_stored(f, what):
            return
        headers = {"Content-Type": "application/octet-stream"}
        if f.size <= READ_CHUNK:
            data = await self._small(f)
            ans = await self._send("PUT", f"/v1/blobs/{f.digest}", data=data, headers=headers)
        else:
            fh = await self._open(f)
            try:
                ans = await self._send(
                    "PUT",
                    f"/v1/blobs/{f.digest}",
                    file=(fh, f, 0, f.size),
                    headers=headers,
                )
            finally:
                await fh.close()
        if ans.status in (200, 201):
            return
        if ans.status == 400 and ans.code == "digest_mismatch":
            raise self._changed(f, ans)
        if ans.status == 413:
            raise _TooLarge
        self._fail(ans, what)

    # long: the resumable upload's state machine reads best as one sequence
    async def _resumable(self, f: FilePayload, state: dict[str, int], check_first: bool) -> None:
        """One attempt at a large blob: find what the server holds, send the rest in
        chunks, complete. Every attempt starts from the server's offset, never from 0."""
        what = f"uploading {_label(f)}"
        if check_first and await self._blob_stored(f, what):
            self._uploads.pop(f.digest, None)
            return
        upload_id = self._uploads.get(f.digest)
        offset = 0
        if upload_id is not None:
            ans = await self._send("HEAD", f"/v1/uploads/{upload_id}")
            if ans.status == 200:
                offset = int(ans.headers.get("Upload-Offset") or 0)
            elif ans.status == 404:  # expired or discarded: start a new one
                self._uploads.pop(f.digest, None)
                upload_id = None
            else:
                self._fail(ans, what)
        if upload_id is None:
            ans = await self._send(
                "POST", "/v1/uploads", json_body={"digest": f.digest, "size": f.size}
            )
            if ans.status not in (200, 201):
                self._fail(ans, what)
            d = ans.json()
            if not d.get("id"):
                raise _Retry("the server's upload answer had no id")
            upload_id = str(d["id"])
            offset = int(d.get("offset") or 0)
            self._uploads[f.digest] = upload_id
        if offset > f.size:
            self._uploads.pop(f.digest, None)
            raise _Retry("the server held more bytes than the file has; starting over")
        state["offset"] = max(state["offset"], offset)
        upload = f"/v1/uploads/{upload_id}"

        if offset < f.size:
            fh = await self._open(f)
            try:
                while offset < f.size:
                    n = min(self.chunk_size, f.size - offset)
                    ans = await self._send(
                        "PATCH",
                        upload,
                        file=(fh, f, offset, n),
                        headers={
                            "Content-Type": "application/octet-stream",
                            "Content-Range": f"bytes {offset}-{offset + n - 1}/*",
                        },
                    )
                    if ans.status in (200, 202, 204):
                        new = int(ans.headers.get("Upload-Offset") or ans.json().get("offset") or 0)
                        if new <= offset:
                            raise _Retry("the server did not take the chunk")
                    elif ans.status == 416 and ans.code == "bad_offset":
                        # We were wrong about the offset (a lost answer): go on from the
                        # server's, which is the truth.
                        new = int(ans.json().get("offset") or 0)
                        if new > f.size:
                            self._uploads.pop(f.digest, None)
                            raise _Retry("the server's offset is past the end")
                    elif ans.status == 404:
                        self._uploads.pop(f.digest, None)
                        raise _Retry("the server dropped the upload; starting over")
                    else:
                        self._fail(ans, what)
                    offset = new
                    state["offset"] = max(state["offset"], offset)
            finally:
                await fh.close()

        ans = await self._send("PUT", upload, params={"digest": f.digest})
        if ans.status in (200, 201):
            self._uploads.pop(f.digest, None)
            return
        if ans.status == 400 and ans.code == "digest_mismatch":
            self._uploads.pop(f.digest, None)  # the server discarded it
            raise self._changed(f, ans)
        if ans.status == 404:
            # Gone: perhaps completed under an answer we lost; the next attempt's HEAD
            # tells, and otherwise starts a fresh upload.
            self._uploads.pop(f.digest, None)
            raise _Retry("the server no longer knows the upload")
        if ans.status == 416 and ans.code == "bad_offset":
            raise _Retry("the server holds a different number of bytes; resuming")
        self._fail(ans, what)

    @staticmethod
    async def _small(f: FilePayload) -> bytes:
        """A file of at most READ_CHUNK bytes in one piece."""
        if f.opener is None:
            return await asyncio.to_thread(_read_small, f)
        data = b"".join([block async for block in read_chunks(f)])
        if len(data) != f.size:
            raise SourceChangedError(
                f"{_label(f)} changed after it was hashed ({len(data)} bytes, expected {f.size})"
            )
        return data

    async def _open(self, f: FilePayload) -> _FileHandle:
        """Open a file for one attempt, checking it still has the size that was hashed."""
        if f.opener is not None:
            return _StreamReader(f)  # its size is checked by the server's digest check
        with reading(f.local_path):
            fh = await aiofiles.open(f.local_path, "rb")
            try:
                size = os.fstat(fh.fileno()).st_size
            except BaseException:
                await fh.close()
                raise
        if size != f.size:
            await fh.close()
            raise SourceChangedError(
                f"{f.local_path} changed after it was hashed ({size} bytes, expected {f.size})"
            )
        return fh

    @staticmethod
    def _changed(f: FilePayload, ans: _Answer) -> SourceChangedError:
        actual = ans.json().get("actual")
        got = f"; the server read {actual}" if actual else ""
        return SourceChangedError(f"{_label(f)} changed after it was hashed{got}")

    # --- items -----------------------------------------------------------------------

    @staticmethod
    def _item_path(dataset: str, path: str, name: str) -> str:
        # Each segment encoded on its own (`#`, `?`, newlines, spaces, unicode, even `/`
        # inside a name), so the server splits exactly where the folders are.
        segments = [s for s in path.split("/") if s] + [name]
        return f"/v1/datasets/{quote(dataset, safe='')}/items/" + "/".join(
            quote(s, safe="") for s in segments
        )

    async def _put_manifest(self, path: str, body: bytes, what: str) -> _Answer:
        ans = await self._send("PUT", path, data=body, headers={"Content-Type": "application/json"})
        if ans.status in (200, 201):
            return ans
        if ans.status == 409 and ans.code == "missing_blobs":
            raise _MissingBlobs([str(d) for d in ans.json().get("missing") or []])
        self._fail(ans, what)

    # --- one request, and the retry loop around attempts -----------------------------

    def _start(self) -> tuple[aiohttp.ClientSession, _Gate, asyncio.Semaphore]:
        """The session and what goes with it, made on first use inside the running loop."""
        if self._closed:
            raise RetriableError("the http sink is closed")
        if self._http is None or self._gate is None or self._slots is None:
            headers = {"User-Agent": "ingestd"}
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.limit, ttl_dns_cache=300),
                # No total: a large body may take as long as it takes while it moves.
                # Idle time is bounded instead: sock_read for answers, the stall guard
                # in _send for bodies, sock_connect for connecting.
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=None,
                    sock_connect=min(self.timeout, CONNECT_TIMEOUT),
                    sock_read=self.timeout,
                ),
                headers=headers,
            )
            self._gate = _Gate(self.url, self.backoff_base, self.backoff_cap)
            # Requests queue here, not in the connector, so time spent waiting for a
            # free connection never counts against the stall guard.
            self._slots = asyncio.Semaphore(self.limit)
        return self._http, self._gate, self._slots

    # long: one request with every retry rule of the protocol beside it
    async def _send(
        self,
        method: str,
        path: str,
        *,
        data: bytes | None = None,
        json_body: Any = None,
        file: tuple[_FileHandle, FilePayload, int, int] | None = None,
        params: Mapping[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> _Answer:
        """One HTTP request. Transport trouble becomes _Retry (and news for the gate);
        a local read failure while streaming becomes that failure; any answer is
        returned for the caller to judge."""
        http, gate, slots = self._start()
        loop = asyncio.get_running_loop()
        url = URL(self.url + path, encoded=True)  # segments are already percent-encoded
        where = f"{method} {self.url}{path.split('?')[0]}"
        body: _FileBody | None = None
        async with slots:
            gate.check(_TICKET.get())  # after the queue: the server may have gone meanwhile
            # Bounds idle time while connecting and sending: a server that stops reading
            # a body would otherwise block the upload forever (sock_read only starts
            # once the body is sent). Every chunk taken pushes the deadline back.
            guard = asyncio.timeout(None)
            guarding = True

            def progress(more: bool) -> None:
                # aiohttp may still pull the body after the answer arrived (an early
                # answer): by then the guard is gone and must not be touched.
                if guarding:
                    guard.reschedule(loop.time() + self.timeout if more else None)

            payload: Any = data
            if file is not None:
                fh, f, offset, length = file
                body = _FileBody(fh, f, offset, length, progress)
                payload = body.chunks()
                headers = {**(headers or {}), "Content-Length": str(length)}
            try:
                async with guard:
                    guard.reschedule(loop.time() + self.timeout)
                    async with http.request(
                        method,
                        url,
                        data=payload,
                        json=json_body,
                        params=params,
                        headers=headers,
                        allow_redirects=False,
                    ) as resp:
                        guard.reschedule(None)
                        raw = b"" if method == "HEAD" else await resp.read()
                        answer = _Answer(resp.status, resp.headers, raw)
            except aiohttp.ClientConnectorCertificateError as e:
                raise PermanentError(
                    f"{where}: TLS certificate check failed ({e.certificate_error})"
                ) from None
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
                reason = _connect_reason(e)
                gate.unreachable(reason)
                raise _Retry(f"cannot connect to {self.url}: {reason}") from None
            except TimeoutError:
                if body is not None and body.error is not None:
                    raise body.error from None
                if guard.expired():
                    raise _Retry(
                        f"{where}: the server stopped taking data for {self.timeout:g}s"
                    ) from None
                raise _Retry(f"{where}: no answer within {self.timeout:g}s") from None
            except aiohttp.ClientError as e:
                if body is not None and body.error is not None:
                    raise body.error from None
                raise _Retry(f"{where}: {type(e).__name__}: {e}") from None
            finally:
                guarding = False
                if body is not None:
                    # aiohttp stops iterating a failed body without closing it; close
                    # now rather than when the garbage collector gets to it.
                    with contextlib.suppress(RuntimeError):
                        await payload.aclose()
        gate.reached()
        if body is not None and body.error is not None and answer.status >= 300:
            raise body.error  # the server answered early; the local failure is the news
        return answer

    def _fail(self, ans: _Answer, what: str) -> NoReturn:
        """Raise what an unexpected answer means: worth retrying, or a rejection."""
        status = ans.status
        if status in (408, 429) or status >= 500:
            raise _Retry(  # `what` is added by _retrying
                f"HTTP {status} ({ans.message()})",
                parse_retry_after(ans.headers.get("Retry-After")),
            )
        if status == 401:
            token = "the configured token" if self._token else "requests without a token"
            raise PermanentError(
                f"{what}: the ingestion server at {self.url} refused {token} (HTTP 401); "
                "check backend token_env / token_file against the server's tokens"
            )
        if status == 403:
            raise PermanentError(
                f"{what}: the token is not allowed to do this (HTTP 403: {ans.message()})"
            )
        if 300 <= status < 400:
            target = ans.headers.get("Location", "?")
            raise PermanentError(
                f"{what}: the server redirects to {target} (HTTP {status}); "
                "configure that URL as backend.url"
            )
        code = f", {ans.code}" if ans.code else ""
        raise PermanentError(
            f"{what}: rejected by the server (HTTP {status}{code}): {ans.message()}"
        )

    def _step(self, failures: int) -> float:
        return min(self.backoff_cap, self.backoff_base * 2 ** min(failures - 1, 30))

    def _backoff(self, failures: int, retry_after: float | None) -> float:
        """Full jitter (AWS architecture blog): uniform in [0, min(cap, base·2^n)]."""
        return full_jitter(failures - 1, self.backoff_base, self.backoff_cap, retry_after)

    async def _retrying(
        self,
        what: str,
        attempt: Callable[[], Awaitable[T]],
        progress: Callable[[], int] | None = None,
    ) -> T:
        """Run `attempt` until it succeeds, it raises something other than _Retry, or
        `max_attempts` attempts in a row failed. An attempt that moved `progress`
        forward (bytes the server now holds) resets the count: a flaky network slows a
        big upload down but does not fail it."""
        _, gate, _ = self._start()
        failures = 0
        wait = patience = 0.0
        seen = progress() if progress is not None else 0
        while True:
            try:
                ticket = await gate.admit(wait, patience)
                token = _TICKET.set(ticket)
                try:
                    return await attempt()
                finally:
                    _TICKET.reset(token)
                    gate.release(ticket)
            except _Retry as e:
                failures += 1
                if progress is not None and (now := progress()) > seen:
                    seen, failures = now, 1
                if e.retry_after is not None and e.retry_after > self.backoff_cap:
                    # A long wait is the ledger's job: it keeps the worker free meanwhile.
                    raise RetriableError(f"{what}: {e.reason}", e.retry_after) from None
                if failures >= self.max_attempts:
                    raise RetriableError(
                        f"{what}: {e.reason} (gave up after {failures} attempts)", e.retry_after
                    ) from None
                wait = self._backoff(failures, e.retry_after)
                # Waiting for the gate sends nothing, so it needs no jitter: give it the
                # whole backoff step, which lets a call ride out a short restart.
                patience = max(wait, self._step(failures))
                log.debug("retrying", what=what, reason=e.reason, wait=round(wait, 2))


def _connect_reason(e: Exception) -> str:
    if isinstance(e, aiohttp.ConnectionTimeoutError):
        return "connection timed out"
    os_error = getattr(e, "os_error", None)
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror
    return str(e) or type(e).__name__
