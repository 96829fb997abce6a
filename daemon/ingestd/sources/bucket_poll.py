"""What a bucket watch needs below its runner: a lazily opened store, the diff of one
listing against the ledger, and the settle rule for objects.

The diff is a merge of two sorted streams. Object stores list keys in lexicographic
order of their UTF-8 bytes (S3, GCS and Azure all do), which is also how SQLite orders
TEXT and how Python orders str. So each page of the listing is compared with the
ledger's entries in the same key range, one page at a time: memory follows the page
size, never the size of the bucket, and a known entry missing from its range is gone.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from ingestd.config import BucketUrl, SourceOptions
from ingestd.sources.objects import ObjectInfo, ObjectStore

# relpath -> (size, mtime_ns, etag) of the ledger's entries in a key range
KnownRange = Callable[[str | None, str | None], Awaitable[dict[str, tuple[int, int, str | None]]]]


class StoreHandle:
    """One ObjectStore for one user (a runner, or the sync workers of a watch), opened on
    first use: opening may fail (no credentials yet) and that must be a watch problem
    retried later, not a failure to start the daemon."""

    def __init__(
        self,
        url: BucketUrl,
        options: SourceOptions,
        store: ObjectStore | None = None,
        *,
        owned: bool = True,
    ) -> None:
        self.url = url
        self.options = options
        self._store = store
        self._owned = owned

    @classmethod
    def of(cls, store: ObjectStore) -> StoreHandle:
        """A handle on a store someone else opened and closes (tests, shared stores)."""
        return cls(store.url, SourceOptions(), store, owned=False)

    def get(self) -> ObjectStore:
        if self._store is None:
            from ingestd.sources.bucket import open_store

            self._store = open_store(self.url, self.options)
        return self._store

    async def close(self) -> None:
        store, self._store = self._store, None
        if store is not None and self._owned:
            await store.close()


def usable_key(key: str) -> bool:
    """Keys that can name an item: no empty, `.` or `..` segment (S3 allows `a//b` and
    `../x`; as folder paths they would be ambiguous or escape the dataset)."""
    return bool(key) and all(seg not in ("", ".", "..") for seg in key.split("/"))


def same_object(known: tuple[int, int, str | None], obj: ObjectInfo) -> bool:
    """Whether the ledger's entry still describes the listed object. ETag and size decide
    when there is an ETag: last-modified alone changes on metadata-only rewrites, and a
    HEAD may report it at a coarser precision than the listing."""
    size, mtime_ns, etag = known
    if obj.etag and etag:
        return size == obj.size and etag == obj.etag
    return size == obj.size and mtime_ns == obj.mtime_ns


class ListingOutOfOrder(Exception):
    """The store listed keys out of order: the page-wise diff cannot tell gone keys."""


@dataclass(slots=True)
class PageDiff:
    changed: list[ObjectInfo] = field(default_factory=list)  # new or changed, accepted
    gone: list[str] = field(default_factory=list)  # known in this page's range, not listed
    listed: int = 0  # accepted objects in the page
    last_key: str | None = None  # the page's last key (accepted or not)


async def diff_pages(
    pages: AsyncIterator[list[ObjectInfo]],
    known_range: KnownRange,
    takes: Callable[[str], bool],
    *,
    all_changed: bool = False,
) -> AsyncIterator[PageDiff]:
    """Compare a listing with the ledger, page by page. Objects `takes` refuses are as
    if not listed (an entry for one is gone); with `all_changed` every accepted object
    counts as changed (to plan them all again). The last diff covers the known entries
    after the last key. Raises ListingOutOfOrder when keys do not ascend; a caller
    that stops early (an error) must not apply the gone keys of an unfinished pass."""
    after: str | None = None
    async for page in pages:
        if not page:
            continue
        diff = PageDiff(last_key=page[-1].key)
        known = await known_range(after, diff.last_key)
        prev = after
        for obj in page:
            if prev is not None and obj.key <= prev:
                raise ListingOutOfOrder(f"{obj.key!r} listed after {prev!r}")
            prev = obj.key
            if not takes(obj.key):
                continue
            diff.listed += 1
            seen = known.pop(obj.key, None)
            if seen is None or all_changed or not same_object(seen, obj):
                diff.changed.append(obj)
        diff.gone = list(known)
        after = diff.last_key
        yield diff
    rest = await known_range(after, None)
    yield PageDiff(gone=list(rest), last_key=after)


class PendingObjects:
    """Objects seen new or changed that are not ready yet. An object is ready when it is
    older than `settle` (by its last-modified), or when a later pass lists it unchanged
    (a writer that keeps replacing an object keeps it here). Only young objects stay,
    so memory follows the rate of change, not the bucket."""

    def __init__(self, settle: float, clock: Callable[[], float] = time.time) -> None:
        self.settle = settle
        self._clock = clock
        # key -> (size, etag, mtime_ns, pass in which it was last listed)
        self._state: dict[str, tuple[int, str, int, int]] = {}

    def __len__(self) -> int:
        return len(self._state)

    def __contains__(self, key: str) -> bool:
        return key in self._state

    def pending_under(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self._state)

    def holds(self, obj: ObjectInfo) -> bool:
        """Was this very version of the object listed before and is it still waiting?"""
        prev = self._state.get(obj.key)
        return prev is not None and prev[:3] == (obj.size, obj.etag, obj.mtime_ns)

    def observe(self, obj: ObjectInfo, pass_no: int) -> bool:
        """Record a listing of a new or changed object; True when it is ready."""
        sig = (obj.size, obj.etag, obj.mtime_ns)
        prev = self._state.get(obj.key)
        if self._clock() - obj.mtime_ns / 1e9 >= self.settle or (
            prev is not None and prev[:3] == sig and prev[3] < pass_no
        ):
            self._state.pop(obj.key, None)
            return True
        self._state[obj.key] = (*sig, pass_no)
        return False

    def end_pass(self, pass_no: int) -> None:
        """After a complete pass: forget objects it did not list as new or changed (they
        went away, or went back to what the ledger holds)."""
        self._state = {k: v for k, v in self._state.items() if v[3] >= pass_no}

    def forget(self) -> None:
        self._state.clear()
