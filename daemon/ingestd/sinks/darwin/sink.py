"""The `darwin` sink: items go to a V7 Darwin dataset (docs/platforms.md), at V7's
request floor.

- Identity is dataset + `path` + `name`, as V7's own. V7 has no upsert: registering a
  name it holds is refused per slot as `ALREADY_EXISTS`.
- An item the ledger never synced (`previous` is None) is registered straight away,
  many items per `register_upload` (or `register_existing` for bucket objects): no
  lookup first. Only an `ALREADY_EXISTS` makes the sink look the item up: a complete
  item holding the same slots, file names and sizes is adopted (a restart after V7
  took the item but before the ledger recorded it); a half-uploaded one is deleted; any
  other is replaced (archived, or deleted with `replace: delete`), then registered.
- An item the ledger synced before is looked up (many per request) and compared with
  the digests the ledger recorded: unchanged content is left alone (V7 holds no
  metadata of ours), changed content replaces the item, a missing item is made again.
- Local bytes: after registration, per V7 file `sign`, a streamed `PUT` to the
  pre-signed URL and `confirm`, for all files of a group at once (bounded). An item
  whose file changed while it streamed is deleted again, so V7 keeps no item stuck in
  `uploading` for a file that may never come back.

V7's limit of 1,000 API requests a minute per key counts API requests; PUTs to the
pre-signed storage URLs are not API requests and are not budgeted.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from ingestd.config import DarwinBackend
from ingestd.core.errors import PermanentError, RetriableError, SourceChangedError, SyncError
from ingestd.core.model import ItemPayload, item_key
from ingestd.sinks.base import (
    BatchFirstSink,
    BatchItem,
    BatchLimits,
    Capabilities,
    Manifest,
    PutResult,
)
from ingestd.sinks.darwin.api import (
    ALREADY_EXISTS,
    EXISTING_CHUNK,
    UPLOAD_CHUNK,
    Dataset,
    blocked_error,
    complete,
    holds,
    identity,
    key_of,
)
from ingestd.sinks.darwin.calls import V7, DatasetGone
from ingestd.sinks.darwin.shapes import Shape, preload, shape_of
from ingestd.sinks.kit.batches import chunked
from ingestd.sinks.kit.datasets import DatasetCache
from ingestd.sinks.kit.errors import worst

log = structlog.get_logger("ingestd.sink.darwin")

ROUNDS = 3  # register, and after an ALREADY_EXISTS look up and register again, at most
# Small files are read ahead whole, a group's in one thread trip, and sent from memory.
PRELOAD_FILE = 256 << 10
PRELOAD_GROUP = 32 << 20


@dataclass
class _Work:
    """One item of a put on its way: its place in the answer, and its V7 version."""

    index: int
    item: ItemPayload
    previous: Manifest | None
    shape: Shape
    version: int = 1
    merged: bool = False  # V7 merged our new slot names into an item it held (#937)


class DarwinSink(BatchFirstSink):
    capabilities = Capabilities(
        remote_urls=True,
        metadata_update=False,
        delete=True,
        # One register_upload takes up to 500 items; files up to 16 MiB go in groups
        # (the API cost per file is the same whatever its size).
        batch=BatchLimits(items=UPLOAD_CHUNK, bytes=256 << 20, linger=0.05, small=16 << 20),
    )

    def __init__(self, backend: DarwinBackend, workers: int = 8) -> None:
        self.team = backend.team
        self.storage_slug = backend.storage_slug
        # V7 registers bucket objects only from an external storage connected to the
        # team: without one, `transfer` defaults to copy instead of failing every item.
        self.capabilities = dataclasses.replace(
            DarwinSink.capabilities, remote_urls=bool(self.storage_slug)
        )
        self.replace = backend.replace
        # Files in flight at once across the sink's calls: each is sign, PUT, confirm.
        self.files_at_once = max(16, 4 * workers)
        self.v7 = V7(backend, connections=self.files_at_once)
        self._datasets: DatasetCache[Dataset] = DatasetCache(self.v7.find_or_create)
        self._files = asyncio.Semaphore(self.files_at_once)

    def __repr__(self) -> str:  # never the key
        return f"DarwinSink(team={self.team!r}, base={self.v7.base!r})"

    async def ensure_dataset(self, dataset: str) -> None:
        await self._datasets.get(dataset)

    async def close(self) -> None:
        await self.v7.close()

    async def put_items(self, items: Sequence[BatchItem]) -> list[PutResult | Exception]:
        out: list[PutResult | Exception | None] = [None] * len(items)
        by_dataset: dict[str, list[int]] = {}
        for i, b in enumerate(items):
            by_dataset.setdefault(b.dataset, []).append(i)
        for name, indexes in by_dataset.items():
            await self._put_dataset(name, [(i, items[i]) for i in indexes], out)
        lost = RetriableError("V7: no result for the item (a bug); sent again later")
        return [r if r is not None else lost for r in out]

    async def delete_item(self, dataset: str, path: str, name: str) -> None:
        """`on_delete: delete`: the item is deleted from V7 (not archived: `replace`
        governs replacements, and the watch asked for deletion). Archived
        predecessors of it are left alone."""
        ds = await self._datasets.get(dataset)
        k = key_of(path, name)
        found = (await self.v7.find(ds, [k]))[k]
        ids = [str(i["id"]) for i in found.live]
        await self.v7.remove(ds, ids, "delete", f"item {item_key(path, name)}")

    # --- one dataset's items ---------------------------------------------------------

    async def _put_dataset(
        self, name: str, entries: list[tuple[int, BatchItem]], out: list[Any]
    ) -> None:
        try:
            ds = await self._datasets.get(name)
        except SyncError as e:
            for i, _ in entries:
                out[i] = e
            return
        works: list[_Work] = []
        for i, b in entries:
            try:
                shape = await shape_of(b.item, self.storage_slug, self.team)
            except SyncError as e:
                out[i] = e
                continue
            works.append(_Work(i, b.item, b.previous, shape))
        uploads: list[asyncio.Task[None]] = []
        try:
            pending = [w for w in works if w.previous is None]
            synced = [w for w in works if w.previous is not None]
            if synced:
                pending += await self._reconcile(ds, synced, out, conflict=False)
            for _ in range(ROUNDS):
                if not pending:
                    break
                conflicts = await self._register(ds, pending, out, uploads)
                pending = await self._reconcile(ds, conflicts, out, conflict=True)
            for w in pending:
                out[w.index] = RetriableError(
                    f"V7 item {w.item.key} in dataset {name!r} kept changing while it was "
                    "registered; will try again"
                )
            if uploads:
                await asyncio.gather(*uploads)
        finally:
            for t in uploads:
                t.cancel()

    async def _read_ahead(self, works: list[_Work], out: list[Any]) -> list[_Work]:
        """Read the small files of items about to be registered: a file that changed
        or went away fails its item here, and V7 never hears of it."""
        sources = [src for w in works for _, src in w.shape.uploads()]
        if not sources:
            return works
        errors = await asyncio.to_thread(preload, sources, PRELOAD_FILE, PRELOAD_GROUP)
        failed = {id(src): e for src, e in zip(sources, errors, strict=True) if e is not None}
        kept = []
        for w in works:
            error = next((failed[id(s)] for _, s in w.shape.uploads() if id(s) in failed), None)
            if error is None:
                kept.append(w)
            else:
                out[w.index] = error
        return kept

    async def _reconcile(
        self, ds: Dataset, works: list[_Work], out: list[Any], *, conflict: bool
    ) -> list[_Work]:
        """Look the items up and decide: unchanged ones are answered here, the rest
        are returned to be registered (what stood in their way removed). `conflict`:
        V7 refused their names (ALREADY_EXISTS)."""
        if not works:
            return []
        try:
            found = await self.v7.find(ds, [key_of(w.item.path, w.item.name) for w in works])
        except SyncError as e:
            for w in works:
                out[w.index] = e
            return []
        archive: list[str] = []
        delete: list[str] = []
        again: list[_Work] = []
        for w in works:
            f = found[key_of(w.item.path, w.item.name)]
            w.version = f.archived + 1
            changed = w.previous is not None and identity(
                w.previous.get("slots") or []
            ) != identity(w.item.slots)
            expect = w.shape.expect()
            same = [o for o in f.live if complete(o) and not changed and holds(o, expect)]
            if same:
                log.debug("already on V7: kept", item=w.item.key, dataset=ds.name)
                out[w.index] = PutResult(str(same[0]["id"]), w.version, changed=False)
                continue
            if conflict and not f.live and f.archived:
                out[w.index] = PermanentError(
                    f"V7 refuses item {w.item.key}: an archived item still holds its name. "
                    "Restore or delete the archived item in V7, or set backend.replace: delete"
                )
                continue
            for old in f.live:
                # A half-made item is nobody's; one we merged slots into was whole before.
                how = self.replace if complete(old) or w.merged else "delete"
                log.info(
                    "replacing item on V7",
                    item=w.item.key,
                    dataset=ds.name,
                    old_id=old["id"],
                    old_status=old.get("status"),
                    how=how,
                )
                if how == "archive":
                    archive.append(str(old["id"]))
                    w.version += 1  # the archived one keeps its number
                else:
                    delete.append(str(old["id"]))
            again.append(w)
        try:
            await self.v7.remove(ds, archive, "archive", f"{len(archive)} replaced item(s)")
            await self.v7.remove(ds, delete, "delete", f"{len(delete)} replaced item(s)")
        except SyncError as e:
            for w in again:
                out[w.index] = e
            return []
        return again

    async def _register(
        self, ds: Dataset, works: list[_Work], out: list[Any], uploads: list[asyncio.Task[None]]
    ) -> list[_Work]:
        """Register the items, as many per request as V7 takes; start the uploads of
        those registered. Returns the items V7 refused as ALREADY_EXISTS."""
        conflicts: list[_Work] = []
        local = [w for w in works if not w.shape.remote]
        remote = [w for w in works if w.shape.remote]
        for group, size, slug in (
            (local, UPLOAD_CHUNK, None),
            (remote, EXISTING_CHUNK, self.storage_slug),
        ):
            for chunk in chunked(group, size):
                if slug is None:
                    chunk = await self._read_ahead(chunk, out)
                    if not chunk:
                        continue
                what = (
                    f"registering item {chunk[0].item.key}"
                    if len(chunk) == 1
                    else f"registering {len(chunk)} items in dataset {ds.name!r}"
                )
                try:
                    answer = await self.v7.register(
                        ds, [w.shape.payload(w.item) for w in chunk], slug, what
                    )
                except DatasetGone as e:
                    # Deleted in V7 since it was looked up: the next attempt makes it again.
                    self._datasets.forget(ds.name)
                    for w in chunk:
                        out[w.index] = e
                    continue
                except SyncError as e:
                    for w in chunk:
                        out[w.index] = e
                    continue
                half: list[str] = []
                for w in chunk:
                    k = key_of(w.item.path, w.item.name)
                    created = answer.created.get(k)
                    reasons = answer.blocked.get(k)
                    if reasons is not None and ALREADY_EXISTS in reasons:
                        w.merged = created is not None
                        conflicts.append(w)
                    elif reasons is not None:
                        if created is not None:  # half-registered: not worth keeping
                            half.append(str(created["id"]))
                        out[w.index] = blocked_error(w.item.key, reasons)
                    elif created is None:
                        out[w.index] = RetriableError(
                            f"V7 {what}: the answer does not list item {w.item.key}"
                        )
                    elif w.shape.remote:
                        out[w.index] = PutResult(str(created["id"]), w.version, changed=True)
                    else:
                        uploads.append(asyncio.create_task(self._upload(ds, w, created, out)))
                await self._drop(ds, half, "half-registered item(s)")
        return conflicts

    async def _upload(self, ds: Dataset, w: _Work, created: dict[str, Any], out: list[Any]) -> None:
        """Every V7 file of one registered item, at once (bounded across the sink)."""
        key = w.item.key
        ids: dict[tuple[str, str], str] = {}
        for s in created.get("slots") or []:
            if isinstance(s, dict) and s.get("upload_id") is not None:
                ids[(str(s.get("slot_name")), str(s.get("file_name")))] = str(s["upload_id"])
        jobs = [(src, ids.get((slot, src.file_name))) for slot, src in w.shape.uploads()]
        if any(uid is None for _, uid in jobs):
            await self._drop(ds, [str(created["id"])], f"item {key} (no upload id)")
            out[w.index] = RetriableError(f"V7 registered item {key} without an upload per file")
            return
        gate = self._files

        async def one(src: Any, uid: str) -> None:
            async with gate:
                await self.v7.upload(src, uid, key)

        results = await asyncio.gather(
            *(one(src, uid) for src, uid in jobs if uid is not None), return_exceptions=True
        )
        error = worst([r for r in results if isinstance(r, BaseException)])
        if isinstance(error, asyncio.CancelledError):
            raise error
        if error is None:
            log.debug("uploaded to V7", item=key, dataset=ds.name, id=created["id"])
            out[w.index] = PutResult(str(created["id"]), w.version, changed=True)
            return
        if isinstance(error, SourceChangedError | PermanentError):
            # Nothing will finish this upload: V7 would show it `uploading` for good.
            await self._drop(ds, [str(created["id"])], f"item {key} (upload failed)")
        out[w.index] = error

    async def _drop(self, ds: Dataset, ids: list[str], what: str) -> None:
        """Delete items we made and cannot finish; a failure leaves them for the next
        attempt, which finds them incomplete and deletes them then."""
        try:
            await self.v7.remove(ds, ids, "delete", what)
        except SyncError as e:
            log.warning("could not delete on V7", dataset=ds.name, what=what, reason=e.reason)
