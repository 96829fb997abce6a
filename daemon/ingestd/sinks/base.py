"""The sink interface: what the sync step needs from any backend.

Kept deliberately narrow (httpx-transport style): ensure a dataset exists, put an item,
delete an item, say whether the backend is reachable, close. Optional abilities are
declared once in `Capabilities`, as data, and are true: the sync step asks them and
never probes a sink's methods (rclone's `Features`). What is declared is implemented;
tests/conformance checks it for every sink.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import aiofiles

from ingestd.core.errors import PermanentError, RetriableError, SourceChangedError, SyncError
from ingestd.core.model import FilePayload, ItemPayload


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """How big a group the sink's batch put takes: the sync step claims items ahead from
    the backlog and hands over up to `items` items (about `bytes` bytes of files to
    move) in one call, waiting at most `linger` seconds for a group to fill when the
    backlog is short. `small` is the largest item (bytes to move) that goes in a group;
    bigger ones go alone through put_item."""

    items: int = 64
    bytes: int = 64 << 20
    linger: float = 0.05
    small: int = 1 << 20


@dataclass(frozen=True, slots=True)
class Capabilities:
    remote_urls: bool = False  # can register an object URL without moving bytes
    metadata_update: bool = False  # implements MetadataUpdater.update_metadata
    delete: bool = False  # delete_item removes the item (else items are left on delete)
    batch: BatchLimits | None = None  # implements BatchPutter.put_items with these limits


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


Manifest = Mapping[str, Any]  # what the ledger recorded of the last put (ItemPayload.manifest)


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One item of a batch put: where it goes, what it is, and what the backend was
    last given for it (None for an item the ledger has never synced)."""

    dataset: str
    item: ItemPayload
    previous: Manifest | None = None


@runtime_checkable
class BatchPutter(Protocol):
    """Optional (capabilities.batch): put several items in one call, for backends where
    a group is much cheaper than its items one by one (one Labelbox import task, one
    Nucleus append, one V7 register_upload, one catalog transaction of the local
    store). The sync step fills groups from the backlog up to capabilities.batch; other
    items go through put_item. Returns, in order, each item's PutResult or the
    exception put_item would have raised for it, so one bad item fails alone; an
    exception raised by the call itself applies to every item of the group."""

    async def put_items(self, items: Sequence[BatchItem]) -> list[PutResult | Exception]: ...


@runtime_checkable
class Sink(Protocol):
    """One backend. Implementations raise ingestd.core.errors.RetriableError for transient
    trouble, PermanentError when the backend rejects the item, and SourceChangedError
    when a file's bytes did not match the digest the prepare step computed.

    `previous` is what the ledger recorded of the item's last put (None when it was
    never synced): a sink may use it to skip a lookup for a new item, or to tell a real
    content change from a re-send. `reachable` is False while the sink knows of an
    outage it has already reported (failures are then logged quietly)."""

    capabilities: Capabilities

    @property
    def reachable(self) -> bool: ...

    async def ensure_dataset(self, dataset: str) -> None: ...

    async def put_item(
        self, dataset: str, item: ItemPayload, previous: Manifest | None = None
    ) -> PutResult: ...

    async def delete_item(self, dataset: str, path: str, name: str) -> None: ...

    async def close(self) -> None: ...


class SinkBase:
    """The defaults a sink may inherit: no optional features, always reachable,
    nothing to close."""

    capabilities = Capabilities()

    @property
    def reachable(self) -> bool:
        return True

    async def close(self) -> None:
        return None


class BatchFirstSink(SinkBase):
    """For a sink whose batch put is its one way to send (a platform where one item is
    a group of one): put_item is put_items of one."""

    async def put_items(self, items: Sequence[BatchItem]) -> list[PutResult | Exception]:
        raise NotImplementedError

    async def put_item(
        self, dataset: str, item: ItemPayload, previous: Manifest | None = None
    ) -> PutResult:
        [result] = await self.put_items([BatchItem(dataset, item, previous)])
        if isinstance(result, Exception):
            raise result
        return result
