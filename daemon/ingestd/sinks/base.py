"""The sink interface: what the sync step needs from any backend.

Kept deliberately narrow (httpx-transport style): ensure a dataset exists, put an item,
delete an item, close. Optional abilities are declared in `Capabilities` so the sync
step can test for them instead of guessing (rclone-backend style).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import aiofiles

from ingestd.core.errors import PermanentError, RetriableError, SourceChangedError, SyncError
from ingestd.core.model import FilePayload, ItemPayload


@dataclass(frozen=True, slots=True)
class Capabilities:
    remote_urls: bool = False  # can register an object URL without moving bytes
    metadata_update: bool = False  # can change metadata without re-sending slots
    delete: bool = False  # can delete an item
    video_fps: bool = False  # takes a video with an fps hint and samples it itself


@dataclass(frozen=True, slots=True)
class PutResult:
    backend_id: str  # the backend's identity for the item (for later deletes/lookups)
    version: int  # the backend's version of the item after the put (1 when created)
    changed: bool  # False when the backend already held exactly this item


def read_error(where: str, e: OSError) -> SyncError:
    """A local read failure in the terms the sync step understands: the file went away
    (wait for it to settle again), cannot be read (the operator must fix permissions), or
    the disk failed (may clear up)."""
    if isinstance(e, FileNotFoundError | NotADirectoryError | IsADirectoryError):
        return SourceChangedError(f"{where} vanished before it was sent")
    if isinstance(e, PermissionError):
        return PermanentError(f"cannot read {where}: permission denied; fix its permissions")
    return RetriableError(f"cannot read {where}: {e.strerror or e}")


@contextlib.contextmanager
def reading(where: str) -> Iterator[None]:
    """Raise read_error for an OSError while reading `where`."""
    try:
        yield
    except OSError as e:
        raise read_error(where, e) from e


async def read_chunks(f: FilePayload, chunk: int = 1 << 20) -> AsyncIterator[bytes]:
    """The bytes of a local or streamed file, fresh on every call (one per attempt).
    A remote reference (`f.url`) has no bytes here: the sink registers the URL."""
    if f.opener is not None:
        async for block in f.opener():
            yield block
        return
    if not f.local_path:
        raise ValueError(f"{f.name} is a remote reference ({f.url}); it has no local bytes")
    async with aiofiles.open(f.local_path, "rb") as fh:
        while block := await fh.read(chunk):
            yield block


@runtime_checkable
class MetadataUpdater(Protocol):
    """Optional (capabilities.metadata_update): change an item's metadata in place, for a
    change that touches nothing but metadata (e.g. a sidecar edit). The sync step calls
    it only for an item this sink already holds (`backend_id` is what put_item returned)
    whose slots (file digests or URLs) are exactly those of `item`; `item` is the full
    prepared payload, so a sink that cannot change metadata in place for some item may
    fall back to a put. The new metadata replaces the old (absent keys are removed)."""

    async def update_metadata(
        self, dataset: str, item: ItemPayload, backend_id: str | None
    ) -> PutResult: ...


@runtime_checkable
class BatchPutter(Protocol):
    """Optional: put several items in one call, for backends where a group is much
    cheaper than its items one by one (the local store syncs a group's files to disk
    together and records them in one catalog transaction). The sync step tests for it
    and sends small items this way, a few dozen at a time; other items, and sinks
    without it, go through put_item. Returns, in order, each item's PutResult or the
    exception put_item would have raised for it, so one bad item fails alone; an
    exception raised by the call itself applies to every item of the group."""

    async def put_items(
        self, items: Sequence[tuple[str, ItemPayload]]
    ) -> list[PutResult | Exception]: ...


@runtime_checkable
class Sink(Protocol):
    """One backend. Implementations raise ingestd.core.errors.RetriableError for transient
    trouble, PermanentError when the backend rejects the item, and SourceChangedError
    when a file's bytes did not match the digest the prepare step computed."""

    capabilities: Capabilities

    async def ensure_dataset(self, dataset: str) -> None: ...

    async def put_item(self, dataset: str, item: ItemPayload) -> PutResult: ...

    async def delete_item(self, dataset: str, path: str, name: str) -> None: ...

    async def close(self) -> None: ...
