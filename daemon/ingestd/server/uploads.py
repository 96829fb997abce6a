"""Request-body streaming and resumable uploads for `ingestd serve`.

`pump` moves a request body to disk without holding it in memory: it takes the body
in the pieces the transport delivered, batches them up to ~1 MiB and hands each batch
to a worker thread (hash + writev), reading the next batch while the previous one is
written. Per request at most two batches plus aiohttp's read-ahead (2 MiB, see
pump) are alive, whatever the body's size.

A resumable upload lives in `<store>/uploads/<id>/`:

    data        the bytes received so far (may run past `offset` after a crash)
    offset      how many leading bytes of `data` are durable: written, fsynced, and
                acknowledged or about to be; replaced atomically after each fsync
    info.json   what the client declared at POST (digest, size), for reference

`offset` is the truth. Bytes in `data` beyond it (a write torn by a crash, or bytes
written after the last checkpoint of a PATCH that died with the process) are cut off
before the next append, so a resumed upload never counts bytes it cannot vouch for.
A long PATCH checkpoints every CHECKPOINT bytes, so a server killed mid-PATCH loses
at most that much. The directory lives under the store root, so completing an upload
is a rename into the blob store, not a copy, and it is outside `tmp/`, whose contents
the store deletes when it opens.

Threads: all file work runs on the executor. Each upload has an asyncio lock, held by
whichever request appends to it, completes it or deletes it; HEAD reads the durable
offset, which only ever moves forward by whole checkpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import ClientPayloadError, StreamReader
from aiohttp.http_exceptions import HttpProcessingError

from ingestd.store.blobs import BlobStore, BlobWrite, DigestMismatch, fsync_dir

T = TypeVar("T")

UPLOADS_DIR = "uploads"
CHUNK = 1 << 20  # about how many bytes each trip to a writer thread takes
_MAX_PARTS = 256
_IOV_MAX = 1024  # Linux's limit on buffers per writev
CHECKPOINT = 64 << 20  # a PATCH makes its bytes durable at least this often
IDLE_EXPIRY_S = 24 * 3600.0
_STRAY_EXPIRY_S = 3600.0  # half-created upload dirs (a crash during POST)
_ID_RE = re.compile(r"[0-9a-f]{32}")

# What reading a body raises when the client goes away or sends a broken body.
_BODY_ERRORS = (ConnectionError, ClientPayloadError, HttpProcessingError, TimeoutError)


class UploadNotFound(Exception):
    pass


class UploadBusy(Exception):
    """Another request holds the upload for longer than we are willing to wait."""


@dataclass(slots=True)
class PumpResult:
    fed: int  # bytes handed to `write`
    tail: list[bytes]  # bytes received after those, not written yet (the caller's to write)
    interrupted: bool  # the body ended early: client gone, broken framing, idle too long
    overflow: bool  # more than `limit` bytes arrived; only `limit` were kept
    cancelled: bool = False  # the handler was cancelled while reading (see pump)

    @property
    def received(self) -> int:
        return self.fed + sum(map(len, self.tail))

    def raise_if_cancelled(self) -> None:
        """Pass on a cancellation that pump held back while the caller saved its bytes."""
        if self.cancelled:
            raise asyncio.CancelledError


async def pump(
    body: StreamReader,
    write: Callable[[list[bytes]], None] | None,
    executor: Executor,
    *,
    limit: int,
    on_bytes: Callable[[int], None],
    idle_timeout: float,
) -> PumpResult:
    """Stream `body` into `write` (called on `executor`, one call at a time, in order),
    in batches of about CHUNK bytes.

    `write=None` reads and discards. The last partial batch is returned unwritten, so
    the caller can write it together with its final step in one trip to a thread (for
    small bodies the only trip). Write errors propagate, after any write in flight
    has finished, so the caller may close what `write` writes to.

    Pieces are taken with readchunk(), as the transport delivered them, and written
    with writev: iter_chunked(CHUNK) would join them into a fresh 1 MiB bytes first, a
    copy into newly mapped memory that cost about as much CPU as hashing the bytes
    (profiled on a 1 GiB upload: 0.84 s in the join vs 0.70 s in sha256)."""
    loop = asyncio.get_running_loop()
    # Let the transport read ahead up to 2*CHUNK while a batch is being written.
    body.set_read_chunk_size(CHUNK)
    pending: asyncio.Future[None] | None = None
    parts: list[bytes] = []
    batched = fed = 0
    interrupted = overflow = cancelled = False
    try:
        while True:
            try:
                async with asyncio.timeout(idle_timeout):
                    chunk, _ = await body.readchunk()
            except _BODY_ERRORS:
                interrupted = True
                break
            except asyncio.CancelledError:
                # The client went away and the server cancels handlers on that
                # (handler_cancellation, as aiohttp's TestServer does). The bytes that did
                # arrive still count: the caller keeps them and then re-raises.
                interrupted = cancelled = True
                break
            if not chunk:
                if body.at_eof():
                    break
                continue  # the end of an HTTP chunk: no data
            on_bytes(len(chunk))
            room = limit - fed - batched
            if len(chunk) > room:
                chunk, overflow = chunk[:room], True
            if write is None:
                fed += len(chunk)
            elif chunk:
                parts.append(chunk)
                batched += len(chunk)
            # A count bound too: a body of tiny HTTP chunks must not pile up objects.
            if batched >= CHUNK or len(parts) >= _MAX_PARTS:
                if pending is not None:
                    await pending
                assert write is not None
                pending = loop.run_in_executor(executor, write, parts)
                fed += batched
                parts, batched = [], 0
            if overflow:
                break
    except BaseException:
        if pending is not None:
            # Even when cancelled: the caller must not close the file under a writer.
            # The error already on its way matters more than this write's.
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)
        raise
    if pending is not None:
        await pending
    return PumpResult(fed, parts, interrupted, overflow, cancelled)


def write_all(fd: int, parts: list[bytes], offset: int | None = None) -> int:
    """Write every part (at `offset`, or at the file position), however many calls the
    kernel needs; returns the byte count."""
    total = 0
    views = [memoryview(p) for p in parts if p]
    while views:
        batch = views[:_IOV_MAX]
        n = os.writev(fd, batch) if offset is None else os.pwritev(fd, batch, offset + total)
        total += n
        # Drop what was written, keep the unwritten end of a part written in half.
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]
    return total


def _write_offset(directory: Path, offset: int) -> None:
    tmp = directory / "offset.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{offset}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / "offset")
    fsync_dir(directory)


@dataclass(eq=False)
class Upload:
    id: str
    dir: Path
    offset: int  # durable bytes (see the module docstring)
    declared: dict[str, Any]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # sha256 of data[:offset] when this process saw every byte of it; None after a
    # restart or a failed write (then completion hashes the file).
    hasher: Any = None
    gone: bool = False  # completed or deleted while someone waited for the lock
    touched: float = field(default_factory=time.time)

    @property
    def data(self) -> Path:
        return self.dir / "data"


class _Appender:
    """The open data file during one append; its methods run on worker threads."""

    def __init__(self, up: Upload) -> None:
        self.up = up
        # Serialises write and close: after a double cancellation the pump may stop
        # waiting for a write that is still running when the handler closes the file.
        self._lock = threading.Lock()
        try:
            self.fd = os.open(up.data, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise UploadNotFound(up.id) from e
        try:
            if os.fstat(self.fd).st_size != up.offset:
                os.ftruncate(self.fd, up.offset)  # drop bytes not vouched for by `offset`
        except BaseException:
            os.close(self.fd)
            raise
        self.pos = up.offset
        self.hasher = up.hasher.copy() if up.hasher is not None else None

    def write(self, parts: list[bytes]) -> None:
        with self._lock:
            self._write(parts)

    def _write(self, parts: list[bytes]) -> None:
        if self.hasher is not None:
            for p in parts:
                self.hasher.update(p)
        self.pos += write_all(self.fd, parts, self.pos)
        if self.pos - self.up.offset >= CHECKPOINT:
            self.checkpoint()

    def checkpoint(self) -> None:
        if self.pos == self.up.offset:
            return
        os.fsync(self.fd)
        _write_offset(self.up.dir, self.pos)
        self.up.offset = self.pos
        self.up.hasher = self.hasher.copy() if self.hasher is not None else None

    def finish(self, tail: list[bytes]) -> int:
        with self._lock:
            try:
                if tail:
                    self._write(tail)
                self.checkpoint()
                return self.up.offset
            finally:
                self._close()

    def fail(self) -> None:
        """After an error: what was written since the last checkpoint is not counted
        (the next append cuts it off), and the running hash no longer matches `offset`."""
        with self._lock:
            self.up.hasher = None
            self._close()

    def _close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class Uploads:
    def __init__(
        self,
        store_root: Path,
        blobs: BlobStore,
        executor: Executor,
        *,
        idle_timeout: float,
        lock_timeout: float = 30.0,
    ) -> None:
        self.root = Path(store_root) / UPLOADS_DIR
        self.root.mkdir(exist_ok=True)
        self._blobs = blobs
        self._executor = executor
        self._idle_timeout = idle_timeout
        self._lock_timeout = lock_timeout
        self._live: dict[str, Upload] = {}

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # --- lifecycle -------------------------------------------------------------------

    async def find(self, declared: dict[str, Any]) -> Upload | None:
        """A live upload declared with the same digest and size. A client that died
        mid-upload (and so forgot its upload id) resumes it instead of starting over;
        two clients sending the same bytes share it, the offset checks keep them honest."""
        if "digest" not in declared or "size" not in declared:
            return None
        for up in list(self._live.values()):
            if up.declared == declared and not up.gone:
                return up
        found = await self._run(self._find_sync, declared)
        return await self.get(found) if found is not None else None

    def _find_sync(self, declared: dict[str, Any]) -> str | None:
        for directory in self.root.iterdir():
            if not _ID_RE.fullmatch(directory.name):
                continue
            try:
                if json.loads((directory / "info.json").read_text(encoding="utf-8")) == declared:
                    return directory.name
            except (OSError, ValueError):
                continue
        return None

    async def create(self, declared: dict[str, Any]) -> Upload:
        upload_id = secrets.token_hex(16)
        final = self.root / upload_id
        await self._run(self._create_sync, final, declared)
        up = Upload(upload_id, final, 0, declared, hasher=hashlib.sha256())
        self._live[upload_id] = up
        return up

    def _create_sync(self, final: Path, declared: dict[str, Any]) -> None:
        # Built under a temporary name and renamed, so an upload directory without
        # its offset file never exists (a crash leaves a stray `.new`, removed later).
        staging = self.root / f"{final.name}.new"
        staging.mkdir()
        (staging / "data").touch()
        (staging / "info.json").write_text(json.dumps(declared), encoding="utf-8")
        _write_offset(staging, 0)
        os.rename(staging, final)
        fsync_dir(self.root)

    async def get(self, upload_id: str) -> Upload:
        up = self._live.get(upload_id)
        if up is not None:
            return up
        if not _ID_RE.fullmatch(upload_id):
            raise UploadNotFound(upload_id)
        loaded = await self._run(self._load_sync, upload_id)
        # Another request may have loaded it while we were in the thread: keep one
        # object (and so one lock) per upload.
        return self._live.setdefault(upload_id, loaded)

    def _load_sync(self, upload_id: str) -> Upload:
        directory = self.root / upload_id
        try:
            offset = int((directory / "offset").read_text(encoding="ascii"))
            declared = json.loads((directory / "info.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError, ValueError) as e:
            raise UploadNotFound(upload_id) from e
        return Upload(upload_id, directory, offset, declared)

    @contextlib.asynccontextmanager
    async def locked(self, upload_id: str) -> AsyncIterator[Upload]:
        up = await self.get(upload_id)
        try:
            async with asyncio.timeout(self._lock_timeout):
                await up.lock.acquire()
        except TimeoutError:
            raise UploadBusy(upload_id) from None
        try:
            if up.gone:
                raise UploadNotFound(upload_id)
            up.touched = time.time()
            yield up
        finally:
            up.lock.release()

    async def settled_offset(self, upload_id: str, wait: float = 2.0) -> int:
        """The durable offset, after waiting briefly for a running append to finish so
        that a client resuming right after a dropped connection sees its last bytes."""
        up = await self.get(upload_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await up.lock.acquire()
                up.lock.release()
        if up.gone:
            raise UploadNotFound(upload_id)
        return up.offset

    # --- data ------------------------------------------------------------------------

    async def append(
        self, up: Upload, body: StreamReader, length: int, on_bytes: Callable[[int], None]
    ) -> PumpResult:
        """Append up to `length` bytes of `body` at `up.offset` (the caller holds the
        lock and has checked the start). Whatever arrives is kept, even when the body
        ends early; `up.offset` then counts it."""
        appender = await self._run(_Appender, up)
        try:
            result = await pump(
                body,
                appender.write,
                self._executor,
                limit=length,
                on_bytes=on_bytes,
                idle_timeout=self._idle_timeout,
            )
            await self._run(appender.finish, result.tail)
        except BaseException:
            await asyncio.shield(self._run(appender.fail))
            raise
        result.raise_if_cancelled()
        return result

    async def complete(self, up: Upload, digest: str) -> BlobWrite:
        """Verify the whole upload against `digest` and make it a blob. On a mismatch
        the upload is discarded and DigestMismatch raised."""
        known = "sha256:" + up.hasher.hexdigest() if up.hasher is not None else None
        try:
            written = await self._run(self._complete_sync, up, digest, known)
        except (DigestMismatch, UploadNotFound):
            await self.discard(up)
            raise
        await self.discard(up)  # the data file is now the blob; remove the rest
        return written

    def _complete_sync(self, up: Upload, digest: str, known: str | None) -> BlobWrite:
        try:
            with open(up.data, "r+b") as f:  # bytes past the durable offset do not count
                if os.fstat(f.fileno()).st_size != up.offset:
                    f.truncate(up.offset)
        except FileNotFoundError as e:  # removed behind our back: nothing to complete
            raise UploadNotFound(up.id) from e
        return self._blobs.adopt(up.data, digest, known)

    async def discard(self, up: Upload) -> None:
        up.gone = True
        self._live.pop(up.id, None)
        await self._run(shutil.rmtree, up.dir, True)

    async def expire(self, max_idle: float = IDLE_EXPIRY_S) -> int:
        """Remove uploads idle for `max_idle` seconds; returns how many went."""
        now = time.time()
        busy = {
            i for i, up in self._live.items() if up.lock.locked() or now - up.touched < max_idle
        }
        removed = await self._run(self._expire_sync, now, max_idle, busy)
        for upload_id in removed:
            up = self._live.pop(upload_id, None)
            if up is not None:
                up.gone = True
        return len(removed)

    def _expire_sync(self, now: float, max_idle: float, busy: set[str]) -> list[str]:
        removed = []
        with os.scandir(self.root) as it:
            for entry in it:
                if entry.name in busy:
                    continue
                is_upload = bool(_ID_RE.fullmatch(entry.name))
                try:
                    marker = os.stat(Path(entry.path) / "offset") if is_upload else entry.stat()
                except FileNotFoundError:
                    marker = entry.stat()
                if now - marker.st_mtime < (max_idle if is_upload else _STRAY_EXPIRY_S):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                if is_upload:
                    removed.append(entry.name)
        return removed
