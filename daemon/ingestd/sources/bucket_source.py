"""A bucket prefix (s3://, gs://, az://) as a Source (core.source).

Object stores have no change events worth trusting across clouds, so a bucket source has
no `events` feature and is polled; a watch that names its bucket's event queue gets
`Features.queue` and a feed of durable hints (sources/queues), listed only as repair: `changes` streams the listing and diffs it page by
page against the ledger's entries (sources/bucket_poll.py), memory following the page
size, never the bucket. The planner's reads are range reads and prefix listings
(BucketFiles); the sync step streams objects pinned to the listed ETag, downloads them
for media work, or registers their URLs (`transfer: register`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import tempfile
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ingestd.config import BucketUrl
from ingestd.core.errors import MediaError
from ingestd.core.model import Entry, SlotType
from ingestd.core.source import NOT_A_FILE, Changes, Features, Known, PathTest, SourceError
from ingestd.media.detect import type_of_prefix
from ingestd.plan.metadata import MAX_SIDECAR_BYTES, Sidecar, parse_sidecar
from ingestd.sources.bucket_poll import ListingOutOfOrder, StoreHandle, diff_pages, usable_key
from ingestd.sources.https_urls import https_object_url
from ingestd.sources.objects import BucketError, ObjectChanged, ObjectInfo, ObjectStore

if TYPE_CHECKING:
    from ingestd.media.dicom import DicomHeader
    from ingestd.sources.queues.feed import QueueFeed

T = TypeVar("T")

HEADER_BYTES = 256 * 1024  # what an image or DICOM header read fetches first
STORE_TIMEOUT = 300.0  # one store call made from a planning thread
STAT_CACHE = 10_000


def _entry(obj: ObjectInfo) -> Entry:
    return Entry(obj.key, obj.size, obj.mtime_ns, obj.etag)


class BucketSource:
    """A bucket prefix. Polled (no events), or hinted by its event queue; URLs; no
    local paths."""

    features = Features(events=False, local_paths=False, urls=True)

    def __init__(
        self,
        handle: StoreHandle,
        poll_interval: float | None = None,
        feed: QueueFeed | None = None,
    ) -> None:
        if poll_interval is not None:
            every = _every(poll_interval)
            self.features = Features(
                events=False,
                local_paths=False,
                urls=True,
                mode_reason=f"bucket prefixes have no events: polled every {every}",
            )
        if feed is not None:
            listing = f"full listing every {_every(poll_interval)}" if poll_interval else ""
            self.features = Features(
                events=False,
                local_paths=False,
                urls=True,
                queue=True,
                mode_reason="; ".join(s for s in (feed.describe, listing) if s),
            )
        self._feed = feed
        self.handle = handle
        self.url: BucketUrl = handle.url
        self.where = str(handle.url)
        self.files = BucketFiles(handle)

    def _store(self) -> ObjectStore:
        # The planner's threads call back into this loop: remember it on first use.
        self.files.loop = asyncio.get_running_loop()
        return self.handle.get()

    async def changes(
        self, subdir: str, known: Known, takes: PathTest, *, everything: bool = False
    ) -> AsyncIterator[Changes]:
        def accepts(key: str) -> bool:
            return usable_key(key) and takes.accepts(key)

        try:
            pages = self._store().list_pages(subdir)
            async for page in diff_pages(pages, known.between, accepts, all_changed=everything):
                yield Changes(
                    changed=[_entry(o) for o in page.changed],
                    gone=page.gone,
                    listed=page.listed,
                    last_key=page.last_key,
                )
        except ListingOutOfOrder as e:
            raise SourceError(
                "other",
                f"the store listed {self.url} out of key order ({e}); deletions cannot be "
                "detected safely, so none are applied",
            ) from None

    async def stat(self, relpath: str) -> Entry | None:
        info = await self._store().head(relpath)
        return _entry(info) if info is not None else None

    async def open(self, entry: Entry, *, chunk: int = 1 << 20) -> AsyncIterator[bytes]:
        store = self._store()
        async with contextlib.aclosing(
            store.stream(entry.relpath, etag=entry.etag, chunk=chunk)
        ) as chunks:
            async for data in chunks:
                yield data

    async def read_range(self, relpath: str, start: int, end: int) -> bytes:
        return await self._store().read_range(relpath, start, end)

    async def download(self, entry: Entry, dest: str) -> None:
        await self._store().download(entry.relpath, dest, etag=entry.etag)

    def url_of(self, relpath: str) -> str:
        return self.handle.get().object_url(relpath)

    def https_url_of(self, relpath: str) -> str | None:
        return https_object_url(self.handle.url, self.handle.options, relpath)

    def path_of(self, relpath: str) -> str:
        raise NotImplementedError("a bucket has no local paths (Features.local_paths is False)")

    def hint_feed(self) -> QueueFeed:
        if self._feed is None:
            raise NotImplementedError("this bucket watch names no queue (Features.queue)")
        return self._feed

    async def close(self) -> None:
        if self._feed is not None:
            with contextlib.suppress(Exception):
                await self._feed.close()
        await self.handle.close()


def _every(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:g}s"
    return f"{seconds / 60:g}m" if seconds < 3600 else f"{seconds / 3600:g}h"


class BucketFiles:
    """The planner's reads (core.source.SourceFiles) on an object store. Called from
    planning threads; each call runs on the daemon's event loop and is waited for."""

    def __init__(self, handle: StoreHandle, timeout: float = STORE_TIMEOUT) -> None:
        self.handle = handle
        self.timeout = timeout
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the runner starts
        # Objects seen by a recent `names` listing, so `stat` on them costs no request.
        self._seen: OrderedDict[str, ObjectInfo] = OrderedDict()

    def _call(self, fn: Callable[[ObjectStore], Coroutine[Any, Any, T]]) -> T:
        loop = self.loop
        assert loop is not None, (
            "BucketFiles used before its source was first used from the event loop"
        )

        async def run() -> T:
            return await fn(self.handle.get())

        fut = asyncio.run_coroutine_threadsafe(run(), loop)
        try:
            return fut.result(self.timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise BucketError(
                "unreachable", f"{self.handle.url}: no answer within {self.timeout:g}s"
            ) from None

    # -- whole small objects ------------------------------------------------------------

    def read_sidecar(self, relpath: str) -> tuple[Sidecar, Entry] | None:
        async def read(store: ObjectStore) -> tuple[Sidecar, Entry] | None:
            for _ in range(3):
                info = await store.head(relpath)
                if info is None:
                    return None
                entry = _entry(info)
                if info.size > MAX_SIDECAR_BYTES:
                    error = "larger than 1 MiB"
                    return Sidecar(relpath, info.size, info.mtime_ns, None, error), entry
                try:
                    raw = b"".join([c async for c in store.stream(relpath, etag=info.etag)])
                except ObjectChanged:
                    continue  # replaced between the HEAD and the GET: look again
                return parse_sidecar(relpath, info.size, info.mtime_ns, raw), entry
            raise BucketError("other", f"{store.object_url(relpath)} keeps changing")

        return self._call(read)

    # -- headers ------------------------------------------------------------------------

    def _head_bytes(self, relpath: str, n: int) -> bytes | None:
        async def read(store: ObjectStore) -> bytes | None:
            try:
                return await store.read_range(relpath, 0, n)
            except ObjectChanged:
                return None
            except BucketError as e:
                if e.kind == "not_found":
                    return None
                raise

        return self._call(read)

    def sniff(self, relpath: str) -> SlotType | None:
        head = self._head_bytes(relpath, 132)
        return type_of_prefix(head) if head is not None else None

    def _with_local_copy(self, relpath: str, read: Callable[[str], T]) -> T:
        """`read` on a local file holding the object's first bytes, and on the whole
        object when the prefix was not enough. The file is named like the object, so
        reasons from the media code name the object."""
        name = relpath.rsplit("/", 1)[-1]
        with tempfile.TemporaryDirectory(prefix="ingestd-plan-") as tmp:
            path = os.path.join(tmp, name)
            head = self._head_bytes(relpath, HEADER_BYTES + 1)
            if head is None:
                raise MediaError(f"{name}: vanished before it could be read")
            with open(path, "wb") as fh:
                fh.write(head)
            if len(head) <= HEADER_BYTES:
                return read(path)  # the whole object
            try:
                return read(path)
            except MediaError:
                pass  # the header runs past the prefix (a big EXIF block, a long DICOM header)

            async def download(store: ObjectStore) -> None:
                await store.download(relpath, path)

            self._call(download)
            return read(path)

    def image_size(self, relpath: str) -> tuple[int, int]:
        from ingestd.media.images import image_size

        return self._with_local_copy(relpath, image_size)

    def dicom_header(self, relpath: str, keywords: Sequence[str]) -> DicomHeader:
        from ingestd.media.dicom import read_header

        return self._with_local_copy(relpath, lambda p: read_header(p, keywords))

    # -- listings -----------------------------------------------------------------------

    def _list(self, subprefix: str, limit: int | None = None) -> list[ObjectInfo]:
        async def collect(store: ObjectStore) -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            pages = store.list_pages(subprefix)
            try:
                async for page in pages:
                    out += page
                    if limit is not None and len(out) >= limit:
                        break
            finally:
                aclose = getattr(pages, "aclose", None)
                if aclose is not None:
                    await aclose()
            return out

        return self._call(collect)

    def names(self, parent: str, start: str) -> set[str] | None:
        base = parent + "/" if parent else ""
        names: set[str] = set()
        for obj in self._list(base + start):
            rest = obj.key[len(base) :]
            names.add(rest.split("/", 1)[0])
            if "/" not in rest:
                self._seen[obj.key] = obj
                while len(self._seen) > STAT_CACHE:
                    self._seen.popitem(last=False)
        return names

    def stat(self, relpath: str) -> Entry | Literal["not-a-file"] | None:
        obj = self._seen.pop(relpath, None)
        if obj is not None:
            return _entry(obj)

        async def head(store: ObjectStore) -> ObjectInfo | None:
            return await store.head(relpath)

        info = self._call(head)
        if info is not None:
            return _entry(info)
        return NOT_A_FILE if self._list(relpath + "/", limit=1) else None

    def list_files(self, reldir: str) -> list[Entry]:
        base = reldir + "/" if reldir else ""
        return [_entry(o) for o in self._list(base) if "/" not in o.key[len(base) :]]
