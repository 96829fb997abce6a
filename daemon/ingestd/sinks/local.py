"""The `local` sink: items go into the embedded store (ingestd.store) on this machine.

All store work is blocking file and SQLite I/O, so it runs in a thread pool and the
event loop only awaits it. An item's blobs are written first (in parallel), then its
catalog entry, so the catalog never refers to bytes the store does not hold.

Files come as local paths, as streams (bucket objects copied without a local copy,
written through a BlobWriter and verified against their digest), or as references
(`transfer: register`): a reference stores no bytes; its catalog entry keeps the
object's URL, size and ETag.
"""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

from ingestd.core.errors import SPACE, PermanentError, RetriableError, SourceChangedError
from ingestd.core.model import FilePayload, ItemPayload
from ingestd.sinks.base import (
    BatchItem,
    BatchLimits,
    Capabilities,
    Manifest,
    PutResult,
    SinkBase,
    read_chunks,
)
from ingestd.store import DigestMismatch, Store, StoreIOError
from ingestd.store.blobs import BlobWriter, StagedBlob

T = TypeVar("T")

DEFAULT_THREADS = 8
STREAMS_PER_ITEM = 4  # streamed files of one item read at once (a series can have hundreds)


class LocalSink(SinkBase):
    capabilities = Capabilities(
        remote_urls=True,
        metadata_update=True,
        delete=True,
        # A group is one trip to the pool, one disk sync and one catalog transaction.
        batch=BatchLimits(items=64, bytes=64 << 20, linger=0.0, small=1 << 20),
    )

    def __init__(self, root: Path, executor: Executor | None = None) -> None:
        self.root = Path(root)
        self._own_executor = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(
            DEFAULT_THREADS, thread_name_prefix="ingestd-local-sink"
        )
        # Opened on first use, in a worker thread: opening creates directories and the
        # catalog, which must not happen on the event loop.
        self._store: Store | None = None
        self._open_lock = threading.Lock()
        self._closed = False

    # --- the Sink interface ----------------------------------------------------------

    async def ensure_dataset(self, dataset: str) -> None:
        await self._run(lambda: self._catalog_call(lambda s: s.catalog.ensure_dataset(dataset)))

    async def put_item(
        self, dataset: str, item: ItemPayload, previous: Manifest | None = None
    ) -> PutResult:
        # References (transfer: register) have no bytes here: the catalog entry is all.
        files = [f for slot in item.slots for f in slot.files if not f.is_remote]
        if len(files) > 1 or any(f.opener is not None for f in files):
            streams = asyncio.Semaphore(STREAMS_PER_ITEM)

            async def streamed(f: FilePayload) -> None:
                async with streams:
                    await self._put_streamed(f)

            results = await asyncio.gather(
                *(
                    streamed(f) if f.opener is not None else self._run(partial(self._put_blob, f))
                    for f in files
                ),
                return_exceptions=True,
            )
            # Wait for every file before failing, so no copy is still running when the
            # caller hears about the failure (and, say, closes the sink).
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            files = []
        # Most items have one file: its blob and the catalog entry then share one trip to
        # the pool, which at thousands of small files per second is a real saving.
        version, changed = await self._run(partial(self._put_sync, dataset, item, files))
        return PutResult(backend_id=item.key, version=version, changed=changed)

    async def update_metadata(
        self, dataset: str, item: ItemPayload, backend_id: str | None
    ) -> PutResult:
        """The optional in-place update (MetadataUpdater): the slots are those the
        store holds (the sync step's promise), so only the catalog entry is written."""
        version, changed = await self._run(partial(self._put_sync, dataset, item, []))
        return PutResult(backend_id=item.key, version=version, changed=changed)

    async def put_items(self, batch: Sequence[BatchItem]) -> list[PutResult | Exception]:
        """The optional batch put (sinks.base.BatchPutter): items whose files are local
        paths go in one trip to the pool, their blobs synced to disk together and their
        catalog entries in one transaction; others (streamed files) go one by one."""
        items = [(b.dataset, b.item) for b in batch]
        out: list[PutResult | Exception | None] = [None] * len(items)
        plain = [i for i, (_, item) in enumerate(items) if _local_only(item)]
        others = [i for i, (_, item) in enumerate(items) if not _local_only(item)]
        if plain:
            done = await self._run(partial(self._put_batch_sync, [items[i] for i in plain]))
            for i, r in zip(plain, done, strict=True):
                out[i] = r
        if others:
            singles = await asyncio.gather(
                *(self.put_item(*items[i]) for i in others), return_exceptions=True
            )
            for i, r in zip(others, singles, strict=True):
                if not isinstance(r, PutResult | Exception):
                    raise r  # cancelled
                out[i] = r
        return [r for r in out if r is not None]

    async def delete_item(self, dataset: str, path: str, name: str) -> None:
        # Only the catalog entry goes; its blobs may be shared and wait for a GC.
        await self._run(
            lambda: self._catalog_call(lambda s: s.catalog.delete_item(dataset, path, name))
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._shutdown)

    # --- blocking helpers (run in the executor) --------------------------------------

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise RetriableError("local sink is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _open(self) -> Store:
        with self._open_lock:
            if self._store is None:
                try:
                    self._store = Store.open(self.root)
                except OSError as e:
                    raise RetriableError(f"cannot open local store at {self.root}: {e}") from e
            return self._store

    async def _put_streamed(self, f: FilePayload) -> None:
        """A file that arrives as a stream: skipped when the store holds its digest,
        else written piece by piece and committed only if it hashes to the digest."""
        store = await self._run(self._open)
        if await self._run(partial(store.blobs.has, f.digest)):
            return
        writer: BlobWriter = store.blobs.begin()
        where = getattr(f.opener, "where", None) or f.name
        try:
            async for block in read_chunks(f):
                await self._run(partial(writer.write, block))
            await self._run(partial(writer.commit, f.digest, f.size))
        except DigestMismatch as e:
            raise SourceChangedError(f"{where} changed after it was hashed ({e})") from e
        except StoreIOError as e:
            raise self._write_error(e) from e
        finally:
            if not writer.done:
                await asyncio.to_thread(writer.abort)

    def _write_error(self, e: StoreIOError) -> RetriableError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            # The store's, not the item's: the sync pool probes with one item.
            return RetriableError(
                f"the local store at {self.root} is out of disk space", condition=SPACE
            )
        return RetriableError(
            f"cannot write to local store at {self.root}: {e.strerror} ({e.filename})"
        )

    def _put_blob(self, f: FilePayload) -> None:
        store = self._open()
        try:
            store.blobs.put_file(f.local_path, f.digest, f.size)
        except (DigestMismatch, OSError, ValueError) as e:
            raise self._blob_error(f, e) from e

    def _blob_error(self, f: FilePayload, e: Exception) -> Exception:
        """What a failed put of `f` means for the item."""
        if isinstance(e, DigestMismatch):
            return SourceChangedError(f"{f.local_path} changed after it was hashed ({e})")
        if isinstance(e, StoreIOError):
            return self._write_error(e)
        if isinstance(e, FileNotFoundError | NotADirectoryError):
            return SourceChangedError(f"{f.local_path} vanished before it was stored")
        if isinstance(e, PermissionError):
            return PermanentError(
                f"cannot read {f.local_path}: permission denied; fix its permissions"
            )
        if isinstance(e, ValueError):  # malformed digest: a bug upstream, not worth retrying
            return PermanentError(f"cannot store {f.local_path}: {e}")
        if isinstance(e, OSError):  # e.g. EIO on the source disk: may clear up
            return RetriableError(f"cannot read {f.local_path}: {e.strerror or e}")
        return e  # a bug: the sync step reports it as one

    def _put_batch_sync(
        self, items: Sequence[tuple[str, ItemPayload]]
    ) -> list[PutResult | Exception]:
        """Blobs of every item staged, synced and renamed as one group, then one catalog
        transaction for the items whose blobs all made it (so the catalog never refers
        to bytes the store does not hold). One item's failure is its own."""
        store = self._open()
        blobs = store.blobs
        results: list[PutResult | Exception | None] = [None] * len(items)
        files = [
            (i, f)
            for i, (_, item) in enumerate(items)
            for slot in item.slots
            for f in slot.files
            if not f.is_remote
        ]
        got = blobs.stage_many([(f.local_path, f.digest, f.size) for _, f in files])
        staged: list[StagedBlob] = []
        owner: list[int] = []  # item index of each staged blob
        try:
            for (i, f), s in zip(files, got, strict=True):
                if isinstance(s, StagedBlob):
                    staged.append(s)
                    owner.append(i)
                elif isinstance(s, Exception) and results[i] is None:
                    results[i] = self._blob_error(f, s)
            # An item with a file that failed stores none of its files.
            keep = [results[i] is None for i in owner]
            blobs.discard([s for s, k in zip(staged, keep, strict=True) if not k])
            staged = [s for s, k in zip(staged, keep, strict=True) if k]
            owner = [i for i, k in zip(owner, keep, strict=True) if k]
        except BaseException:
            blobs.discard([s for s in got if isinstance(s, StagedBlob)])
            raise
        published = blobs.publish(staged)
        for i, r in zip(owner, published, strict=True):
            if isinstance(r, StoreIOError) and results[i] is None:
                results[i] = self._write_error(r)
        todo = [i for i, r in enumerate(results) if r is None]
        entries = [
            (ds, item.path, item.name, [s.manifest() for s in item.slots], item.metadata)
            for ds, item in (items[i] for i in todo)
        ]
        try:
            upserted = store.catalog.upsert_items(entries)
        except sqlite3.Error as e:  # locked past busy_timeout, disk full, I/O error
            for i in todo:
                results[i] = self._catalog_error(e)
        else:
            for i, u in zip(todo, upserted, strict=True):
                key = items[i][1].key
                if isinstance(u, Exception):  # bad name or path, metadata not JSON
                    results[i] = PermanentError(f"cannot store item {key}: {u}")
                else:
                    results[i] = PutResult(backend_id=key, version=u[0], changed=u[1])
        return [r for r in results if r is not None]

    def _put_sync(
        self, dataset: str, item: ItemPayload, files: list[FilePayload]
    ) -> tuple[int, bool]:
        """Store `files` (those not stored yet), then the item's catalog entry."""
        for f in files:
            self._put_blob(f)

        def upsert(store: Store) -> tuple[int, bool]:
            slots = [s.manifest() for s in item.slots]
            try:
                return store.catalog.upsert_item(
                    dataset, item.path, item.name, slots, item.metadata
                )
            except (ValueError, TypeError) as e:  # bad name or path, metadata not JSON
                raise PermanentError(f"cannot store item {item.key}: {e}") from e

        return self._catalog_call(upsert)

    def _catalog_call(self, fn: Callable[[Store], T]) -> T:
        store = self._open()
        try:
            return fn(store)
        except sqlite3.Error as e:  # locked past busy_timeout, disk full, I/O error
            raise self._catalog_error(e) from e

    def _catalog_error(self, e: sqlite3.Error) -> RetriableError:
        if "disk is full" in str(e):
            return RetriableError(
                f"the local store at {self.root} is out of disk space (catalog: {e})",
                condition=SPACE,
            )
        return RetriableError(f"local store catalog at {self.root} failed: {e}")

    def _shutdown(self) -> None:
        if self._own_executor:
            # Not waiting: a copy the sync pool abandoned at shutdown may run for minutes.
            # It writes only a temp file, discarded when the store is next opened, and its
            # catalog step fails on the closed store.
            self._executor.shutdown(wait=False, cancel_futures=True)
        with self._open_lock:
            if self._store is not None:
                self._store.close()
                self._store = None


def _local_only(item: ItemPayload) -> bool:
    """Every file of the item is a local path or a reference (nothing is streamed)."""
    return all(f.opener is None for slot in item.slots for f in slot.files)
