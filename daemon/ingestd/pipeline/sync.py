"""The sync workers: claim due items from the ledger, prepare, send to the sink, record.

The backlog lives in the ledger; in memory there is only the set of items in flight
(a fixed multiple of `workers`), so memory stays flat whatever the backlog.

`workers` bounds the calls into the sink at once. Items are claimed and hashed ahead of
that, so a sink call does not wait for the ledger or for the hashing of its item. For a
sink with the optional batch put (sinks.base.BatchPutter, e.g. the local store), small
items of local files go in groups of up to GROUP_ITEMS, each group one task: one thread
hop hashes it, one sink call stores it (one disk sync, one catalog transaction), one
ledger transaction records it. At thousands of small files per second, per-item thread
hops, tasks and syncs, not bytes, are what costs; each item's outcome is still its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from ingestd.config import Watch
from ingestd.core.backoff import full_jitter
from ingestd.core.errors import (
    Abandoned,
    MediaError,
    PermanentError,
    RetriableError,
    SourceChangedError,
    SyncError,
)
from ingestd.core.fingerprint import fingerprint
from ingestd.core.model import (
    FilePayload,
    ItemPayload,
    ItemPlan,
    PlannedFile,
    PlannedSlot,
    SlotPayload,
    item_key,
)
from ingestd.ledger import AsyncLedger, Claim, Ledger, LedgerOp, key_conflict_reason
from ingestd.media.detect import type_of_prefix
from ingestd.media.transform import MediaSettings, transform_slot, transforms
from ingestd.sinks.base import BatchPutter, MetadataUpdater, PutResult, Sink
from ingestd.sources.bucket_poll import StoreHandle
from ingestd.sources.objects import BucketError, ObjectChanged, ObjectStore

log = structlog.get_logger("ingestd.sync")

BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
CHUNK = 1 << 20

# Items claimed per worker: a couple, so the next sink call's item is ready when a worker
# frees up; many more for a sink that takes groups, so that groups fill up.
AHEAD = 2
AHEAD_BATCHED = 16
# Small items of local files go in groups of up to GROUP_ITEMS: one thread hop hashes a
# group and one batch put stores it. Only small items: a big file would hold up the rest.
SMALL_ITEM = 1 << 20
GROUP_ITEMS = 64


def backoff_delay(attempts: int, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter, capped, honouring a server's Retry-After."""
    honoured = None if retry_after is None else min(retry_after, 3600.0)
    return max(full_jitter(attempts, BACKOFF_BASE, BACKOFF_CAP, honoured), 0.1)


Transfer = Literal["copy", "register"]


@dataclass(frozen=True, slots=True)
class WatchSide:
    """What a worker needs to know about the watch an item came from."""

    root: str  # a folder, or the bucket URL
    settle: float
    follow_symlinks: bool
    media: MediaSettings | None = None  # None: send files as they are
    store: StoreHandle | None = None  # bucket watches: where the objects are read
    # Bucket watches: None follows the sink (register where it takes remote URLs).
    transfer: Transfer | None = None
    on_delete: Literal["keep", "delete"] = "keep"  # also for an item an edit moved

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()


def side_for(watch: Watch, deid_key: bytes | None) -> WatchSide:
    """What the workers need to know about one configured watch."""
    media = MediaSettings(
        watch.images, watch.video, watch.dicom, deid_key if watch.dicom.deidentify else None
    )
    url = watch.bucket
    if url is None:
        return WatchSide(
            watch.source, watch.settle, watch.follow_symlinks, media, on_delete=watch.on_delete
        )
    store = StoreHandle(url, watch.source_options)
    return WatchSide(
        str(url), watch.settle, False, media, store, watch.transfer, on_delete=watch.on_delete
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    claim: Claim
    result: str  # synced | unchanged | deleted | retry | failed | changed
    bytes: int = 0
    error: str | None = None


def hash_sources(
    side: WatchSide, plan: ItemPlan, stop: threading.Event | None = None
) -> tuple[str, list[str]]:
    """Check each file still is what was planned and hash it (blocking; run in a thread).
    Returns a key for everything the sent item depends on, and the files' digests.
    A file that changed since it settled, or while it was read, raises
    SourceChangedError so the half-read version is never sent. Setting `stop` abandons
    the work between chunks, so a shutdown never waits for a large file."""
    digests = [
        _hash_checked(
            os.path.join(side.root, f.relpath), f.size, f.mtime_ns, side.follow_symlinks, stop
        )
        for slot in plan.slots
        for f in slot.files
    ]
    media = (
        side.media.identity(
            [(s.type, [os.path.join(side.root, f.relpath) for f in s.files]) for s in plan.slots]
        )
        if side.media is not None
        else None
    )
    # Content, not stat: a touch changes mtime but must not count as a change.
    return fingerprint([_shape(plan), digests, media]), digests


def hash_many(
    jobs: Sequence[tuple[WatchSide, ItemPlan]], stop: threading.Event | None = None
) -> list[tuple[str, list[str]] | Exception]:
    """hash_sources for a group of items in one thread hop; each item's error is its own."""
    out: list[tuple[str, list[str]] | Exception] = []
    for side, plan in jobs:
        try:
            out.append(hash_sources(side, plan, stop))
        except Exception as e:
            out.append(e)
    return out


def _shape(plan: ItemPlan) -> list[object]:
    """Everything about an item but its files' bytes."""
    return [
        plan.path,
        plan.name,
        plan.metadata,
        [[s.name, s.type, s.extra, [f.name for f in s.files]] for s in plan.slots],
    ]


def build_payload(
    side: WatchSide,
    plan: ItemPlan,
    digests: list[str],
    spool: str,
    stop: threading.Event | None = None,
) -> ItemPayload:
    """The item as sent: source files as they are, or what the media rules derive from
    them in `spool` (blocking, CPU-heavy: run in the media pool)."""
    source_digest = {}
    i = 0
    for slot in plan.slots:
        for f in slot.files:
            source_digest[os.path.join(side.root, f.relpath)] = (digests[i], f.size)
            i += 1
    slots = []
    derived = False
    for slot in plan.slots:
        files = [(f.name, os.path.join(side.root, f.relpath)) for f in slot.files]
        if side.media is not None:
            prepared = transform_slot(slot.type, files, side.media, spool, stop)
            slot_type, files, extra = (
                prepared.type,
                prepared.files,
                {**slot.extra, **prepared.extra},
            )
        else:
            slot_type, extra = slot.type, slot.extra
        payload_files = []
        for name, path in files:
            if path in source_digest:
                digest, size = source_digest[path]
            else:
                derived = True
                st = os.stat(path)
                size = st.st_size
                digest = _hash_checked(path, size, st.st_mtime_ns, True, stop)
            payload_files.append(FilePayload(name, path, size, digest))
        slots.append(SlotPayload(slot.name, slot_type, tuple(payload_files), extra))
    if derived:
        # Derived files were made from whatever the sources held while they were read.
        for slot in plan.slots:
            for f in slot.files:
                _check_unchanged(os.path.join(side.root, f.relpath), f.size, f.mtime_ns)
    return ItemPayload(plan.path, plan.name, tuple(slots), plan.metadata)


def _check_unchanged(path: str, size: int, mtime_ns: int) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SourceChangedError(f"{path} vanished while it was prepared") from None
    if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
        raise SourceChangedError(f"{path} changed while it was prepared")


def _hash_checked(
    path: str, size: int, mtime_ns: int, follow_symlinks: bool, stop: threading.Event | None
) -> str:
    try:
        before = os.stat(path, follow_symlinks=follow_symlinks)
        if (before.st_size, before.st_mtime_ns) != (size, mtime_ns):
            raise SourceChangedError(f"{path} changed after it settled")
        h = hashlib.sha256()
        flags = os.O_RDONLY | (0 if follow_symlinks else os.O_NOFOLLOW)
        fd = os.open(path, flags)
        try:
            with os.fdopen(fd, "rb", buffering=0) as fh:
                fd = -1
                while chunk := fh.read(CHUNK):
                    h.update(chunk)
                    if stop is not None and stop.is_set():
                        raise Abandoned(path)
                after = os.fstat(fh.fileno())
        finally:
            if fd >= 0:
                os.close(fd)
    except FileNotFoundError:
        raise SourceChangedError(f"{path} vanished before it could be read") from None
    except PermissionError:
        raise PermanentError(
            f"cannot read {path}: permission denied; fix its permissions (e.g. chmod a+r). "
            "It is retried when the file changes or on `ingestd retry`"
        ) from None
    except IsADirectoryError:
        raise SourceChangedError(f"{path} is now a folder") from None
    except OSError as e:
        if e.errno in (40,):  # ELOOP: a symlink where we do not follow them
            raise PermanentError(f"cannot read {path}: {e.strerror}") from None
        raise RetriableError(f"cannot read {path}: {e.strerror}") from None
    if (after.st_size, after.st_mtime_ns) != (size, mtime_ns):
        raise SourceChangedError(f"{path} changed while it was read")
    return f"sha256:{h.hexdigest()}"


class _Slots:
    """At most `limit()` holders at once; the limit is read on every entry, so a changed
    `workers` applies from the next call (`poke` after raising it wakes the waiters)."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> None:
        while self._used >= self._limit():
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
        self._used += 1

    async def __aexit__(self, *exc: object) -> None:
        self._used -= 1
        self.poke()

    def poke(self) -> None:
        free = self._limit() - self._used
        for fut in list(self._waiters):
            if free <= 0:
                break
            if not fut.done():
                fut.set_result(None)
                free -= 1


class SyncPool:
    def __init__(
        self,
        ledger: AsyncLedger,
        sink: Sink,
        watches: Mapping[str, WatchSide],
        workers: int,
        *,
        on_source_changed: Callable[[str, list[str]], None] | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
        spool_root: str = "",
    ) -> None:
        self.ledger = ledger
        self.sink = sink
        self.watches = dict(watches)
        self.workers = workers  # sink calls at once; may change while running (reload)
        self._on_source_changed = on_source_changed
        self._on_outcome = on_outcome
        # Items claimed and not yet recorded, and the task working on each (a group's
        # items share one task).
        self._inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._busy = 0  # items between claim and sink result
        self._slots = _Slots(lambda: self.workers)
        self._wake = asyncio.Event()
        self._stopping = False
        self._stop_event = threading.Event()
        # CPU-heavy media work (frames, resizing, de-identification) gets its own small
        # pool so that it cannot starve hashing and store I/O.
        self._media_pool = ThreadPoolExecutor(
            max(1, os.cpu_count() or 1), thread_name_prefix="media"
        )
        self.spool_root = spool_root
        self._datasets_ready: set[str] = set()
        self._dataset_lock = asyncio.Lock()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def _batches(self) -> bool:
        """Whether the sink takes groups (the optional batch put). Not a sink whose
        put_item wants the previous manifest: the batch put does not carry it."""
        return isinstance(self.sink, BatchPutter) and not _takes_previous(self.sink)

    def _depth(self) -> int:
        """Items claimed at most (between claim and sink result)."""
        return self.workers * (AHEAD_BATCHED if self._batches() else AHEAD)

    def replace_sink(self, sink: Sink) -> Sink:
        """Send new work to `sink` from now on (a reload changed the backend). Items in
        flight finish on the old sink, which is returned with `drain()` to await before
        closing it."""
        old, self.sink = self.sink, sink
        self._datasets_ready.clear()
        self.wake()
        return old

    async def drain(self) -> None:
        """Wait for the items in flight now (not for ones claimed later)."""
        tasks = set(self._inflight.values())
        if tasks:
            await asyncio.wait(tasks)

    def wake(self) -> None:
        self._wake.set()
        self._slots.poke()  # `workers` may have been raised

    async def run(self, poll: float = 1.0) -> None:
        """Dispatch until stopped. Polls the ledger at least every `poll` seconds so that
        `ingestd retry` from another process and backoff timers are picked up."""
        while not self._stopping:
            self._wake.clear()
            free = self._depth() - self._busy
            claims: list[Claim] = []
            if free > 0:
                claims = await self.ledger.call(
                    self.ledger.sync.due,
                    time.time(),
                    free,
                    list(self._inflight),
                    list(self.watches),
                )
                self._dispatch(claims)
            if claims and self._busy < self._depth():
                continue
            timeout = poll
            if free > 0 and not claims:
                # Items in flight are still pending in the ledger, and due: without them
                # excluded the wait would be 0 until they finish (a busy loop).
                nxt = await self.ledger.call(
                    self.ledger.sync.next_due_time, list(self.watches), list(self._inflight)
                )
                if nxt is not None:
                    timeout = min(poll, max(0.0, nxt - time.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _dispatch(self, claims: list[Claim]) -> None:
        """A task per claim, or per group of small items for a sink that takes groups."""
        group: list[Claim] = []
        batches = self._batches()
        for claim in claims:
            self._busy += 1
            if batches and self._groupable(claim):
                group.append(claim)
                if len(group) < GROUP_ITEMS:
                    continue
                claim_group, group = group, []
                task = asyncio.create_task(self._process_group(claim_group))
                for c in claim_group:
                    self._inflight[(c.watch, c.source_id)] = task
            else:
                self._inflight[(claim.watch, claim.source_id)] = asyncio.create_task(
                    self._process(claim)
                )
        if group:
            task = asyncio.create_task(self._process_group(group))
            for c in group:
                self._inflight[(c.watch, c.source_id)] = task

    def _groupable(self, claim: Claim) -> bool:
        """A small item of local files that go as they are, with no conflict to report:
        the common case, which a group handles with a fraction of the per-item cost."""
        plan = claim.plan
        side = self.watches.get(claim.watch)
        if plan is None or side is None or side.store is not None or claim.key_owner:
            return False
        if old_place(claim) is not None:  # rare; the per-item path handles the move
            return False
        media = side.media
        if media is not None and any(transforms(s.type, media) for s in plan.slots):
            return False
        return _plan_bytes(plan) <= SMALL_ITEM

    async def stop(self, grace: float) -> None:
        """Stop taking work; give in-flight items `grace` seconds, then abandon them.
        An abandoned item is still pending in the ledger and is redone (idempotently)
        on the next start."""
        self._stopping = True
        self._wake.set()
        tasks = set(self._inflight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            self._stop_event.set()  # reading threads give up at their next chunk
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        self._media_pool.shutdown(wait=False, cancel_futures=True)
        for side in self.watches.values():
            with contextlib.suppress(Exception):
                await side.close()

    def transfer(self, side: WatchSide) -> Transfer:
        """How a bucket watch's items move: as configured, else by what the sink takes
        (asked per item, so a reload that switches the backend switches this too)."""
        if side.transfer is not None:
            return side.transfer
        return "register" if self.sink.capabilities.remote_urls else "copy"

    def _spool_for(self, claim: Claim) -> str:
        tag = hashlib.sha256(f"{claim.watch}\0{claim.source_id}".encode()).hexdigest()[:24]
        return os.path.join(self.spool_root or tempfile.gettempdir(), "spool", tag)

    def _report(self, outcome: Outcome) -> None:
        claim = outcome.claim
        if outcome.result == "changed" and self._on_source_changed and claim.plan is not None:
            self._on_source_changed(
                claim.watch, [f.relpath for s in claim.plan.slots for f in s.files]
            )
        if self._on_outcome is not None:
            self._on_outcome(outcome)

    async def _process(self, claim: Claim) -> None:
        k = (claim.watch, claim.source_id)
        try:
            try:
                outcome, op = await self._sync_one(claim)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug: keep the item, back off, say so loudly
                outcome, op = _crashed(claim, e)
            finally:
                # The worker is free once the sink is done; the item stays claimed until
                # its result is committed, so recording overlaps the next upload.
                self._busy -= 1
                self._wake.set()
            await self.ledger.write(op)
        finally:
            self._inflight.pop(k, None)
            self._wake.set()
        self._report(outcome)

    async def _process_group(self, claims: list[Claim]) -> None:
        """_process for a group of small local items (see _groupable): one thread hop
        hashes them all, one batch put stores those that changed, one ledger
        transaction records every result. Each item's outcome is its own."""
        done: list[tuple[Outcome, LedgerOp | None]] = []
        try:
            try:
                done, synced = await self._sync_group(claims)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug: keep the items, back off, say so loudly
                done, synced = [_crashed(c, e) for c in claims], None
            finally:
                self._busy -= len(claims)
                self._wake.set()
            ops = [op for _, op in done if op is not None]
            await self.ledger.write_many([synced, *ops] if synced is not None else ops)
        finally:
            for c in claims:
                self._inflight.pop((c.watch, c.source_id), None)
            self._wake.set()
        for outcome, _ in done:
            self._report(outcome)

    async def _sync_group(
        self, claims: list[Claim]
    ) -> tuple[list[tuple[Outcome, LedgerOp | None]], LedgerOp | None]:
        """Each item's outcome with the op recording it, except that the items the sink
        took are recorded together by the second value."""
        done: list[tuple[Outcome, LedgerOp | None]] = []
        kept: list[tuple[Claim, WatchSide]] = []
        for c in claims:
            side = self.watches.get(c.watch)
            if side is None:  # a reload removed the watch after the claim: leave the row be
                done.append((Outcome(c, "abandoned"), _retry_op(c, None, 0.0, count=False)))
            else:
                kept.append((c, side))
        if not kept:
            return done, None
        more, synced = await self._sync_kept([c for c, _ in kept], [s for _, s in kept])
        return done + more, synced

    async def _sync_kept(
        self, claims: list[Claim], sides: list[WatchSide]
    ) -> tuple[list[tuple[Outcome, LedgerOp | None]], LedgerOp | None]:
        jobs = [(side, c.plan) for side, c in zip(sides, claims, strict=True)]
        done: list[tuple[Outcome, LedgerOp | None] | None] = [None] * len(claims)
        # Bound once: each call on the module's lazy logger builds a logger anew.
        glog = log.bind()
        recorded: list[tuple[Claim, dict[str, Any], str | None]] = []
        try:
            hashed = await asyncio.to_thread(hash_many, jobs, self._stop_event)  # type: ignore[arg-type]
        except Exception as e:
            hashed = [e] * len(claims)
        sink = self.sink
        send: list[tuple[int, str, ItemPayload]] = []  # (index, source key, payload)
        for i, (claim, side, h) in enumerate(zip(claims, sides, hashed, strict=True)):
            try:
                if isinstance(h, Exception):
                    raise h
                assert claim.plan is not None
                source_key, digests = h
                synced = claim.synced_manifest
                if _unchanged(claim, source_key):
                    assert synced is not None
                    glog.debug("unchanged content, nothing sent", watch=claim.watch, item=claim.key)
                    op = Ledger.op_synced(claim, synced, claim.backend_id, time.time())
                    done[i] = Outcome(claim, "unchanged"), op
                    continue
                send.append((i, source_key, build_payload(side, claim.plan, digests, "")))
            except Exception as e:
                done[i] = self._failed(claim, side, e)
        if send:
            results = await self._put_group(sink, [(claims[i], p) for i, _, p in send])
            for (i, source_key, payload), result in zip(send, results, strict=True):
                claim = claims[i]
                if isinstance(result, Exception):
                    done[i] = self._failed(claim, sides[i], result)
                    continue
                size = _payload_bytes(payload)
                glog.info(
                    "synced",
                    watch=claim.watch,
                    item=claim.key,
                    version=result.version,
                    bytes=size,
                    changed=result.changed,
                )
                manifest = _synced_manifest(payload, source_key, claim.dataset)
                recorded.append((claim, manifest, result.backend_id))
                done[i] = Outcome(claim, "synced", bytes=size), None
        synced = Ledger.op_synced_many(recorded, time.time()) if recorded else None
        return [d for d in done if d is not None], synced

    async def _put_group(
        self, sink: Sink, items: list[tuple[Claim, ItemPayload]]
    ) -> list[PutResult | Exception]:
        """Send prepared items: as one batch put, except metadata-only changes (an
        in-place update each). Each item's result or error, in order."""
        out: list[PutResult | Exception | None] = [None] * len(items)
        whole: list[int] = []
        try:
            for dataset in {claim.dataset for claim, _ in items}:
                await self._ensure_dataset(sink, dataset)
        except Exception as e:
            return [e] * len(items)
        for i, (claim, payload) in enumerate(items):
            if _updates_metadata(sink, claim.synced_manifest, payload):
                try:
                    async with self._slots:
                        bound = log.bind(watch=claim.watch, item=claim.key)
                        out[i] = await self._send(sink, claim, payload, bound)
                except Exception as e:
                    out[i] = e
            else:
                whole.append(i)
        if whole:
            assert isinstance(sink, BatchPutter)
            try:
                async with self._slots:  # a group is one sink call
                    results = await sink.put_items(
                        [(items[i][0].dataset, items[i][1]) for i in whole]
                    )
            except Exception as e:  # the whole call failed: each item hears why
                results = [e] * len(whole)
            for i, r in zip(whole, results, strict=True):
                out[i] = r
        return [r for r in out if r is not None]

    async def _sync_one(self, claim: Claim) -> tuple[Outcome, LedgerOp]:
        """Do the work for one claim; return its outcome and the ledger op recording it."""
        # Each item runs in its own task: what the sink logs names the watch and item too.
        structlog.contextvars.bind_contextvars(watch=claim.watch, item=claim.key)
        bound = log.bind(watch=claim.watch, item=claim.key)
        side = self.watches.get(claim.watch)
        if side is None:  # a reload removed the watch after the claim: leave the row be
            return Outcome(claim, "abandoned"), _retry_op(claim, None, 0.0, count=False)
        now = time.time
        try:
            if claim.plan is None:
                return await self._delete(claim, bound)
            if claim.key_owner is not None:
                raise _Conflict(key_conflict_reason(claim.key, claim.source_id, claim.key_owner))
            source_key, digests = await self._source_key(side, claim.plan)
            synced = claim.synced_manifest
            if _unchanged(claim, source_key):
                assert synced is not None
                # touched, or re-planned with identical content: nothing to send
                bound.debug("unchanged content, nothing sent")
                op = Ledger.op_synced(claim, synced, claim.backend_id, now())
                return Outcome(claim, "unchanged"), op
            media = side.media
            spooled = media is not None and any(transforms(s.type, media) for s in claim.plan.slots)
            sink = self.sink
            if side.store is None and not spooled:
                # Local files as they are: nothing to read to prepare them, so the item
                # takes a sink slot only to be sent.
                payload = build_payload(side, claim.plan, digests, "")
                await self._ensure_dataset(sink, claim.dataset)
                async with self._slots:
                    result = await self._send(sink, claim, payload, bound)
            else:
                # Downloads and derived media take room in the spool: only `workers`
                # items make theirs at once, as they are sent.
                spool = self._spool_for(claim)
                async with self._slots:
                    try:
                        payload = await self._payload(side, claim.plan, digests, spool, spooled)
                        await self._ensure_dataset(sink, claim.dataset)
                        result = await self._send(sink, claim, payload, bound)
                    finally:
                        if spooled:
                            await asyncio.to_thread(shutil.rmtree, spool, True)
            size = _payload_bytes(payload)
            bound.info("synced", version=result.version, bytes=size, changed=result.changed)
            await self._drop_old_place(sink, claim, side, bound)
            manifest = _synced_manifest(payload, source_key, claim.dataset)
            op = Ledger.op_synced(claim, manifest, result.backend_id, now())
            return Outcome(claim, "synced", bytes=size), op
        except (SyncError, Abandoned) as e:
            return self._failed(claim, side, e, bound)

    def _failed(
        self,
        claim: Claim,
        side: WatchSide,
        e: Exception,
        bound: structlog.typing.FilteringBoundLogger | None = None,
    ) -> tuple[Outcome, LedgerOp]:
        """The outcome of an item whose sync step raised `e`, and the op recording it."""
        if bound is None:
            bound = log.bind(watch=claim.watch, item=claim.key)
        if isinstance(e, SourceChangedError):
            # Not an attempt: the file is still moving. The source re-plans it once it
            # settles; the retry here is a backstop in case no event arrives.
            bound.info("file changed while syncing; waiting for it to settle", reason=e.reason)
            op = _retry_op(claim, None, side.settle + 1.0, count=False)
            return Outcome(claim, "changed", error=e.reason), op
        if isinstance(e, Abandoned):
            return Outcome(claim, "abandoned"), _retry_op(claim, None, 0.0, count=False)
        if isinstance(e, RetriableError):
            delay = backoff_delay(claim.attempts, e.retry_after)
            # During an outage the sink logs it once; one line per item would flood.
            emit = bound.warning if getattr(self.sink, "reachable", True) else bound.debug
            emit("sync failed, will retry", reason=e.reason, retry_in=round(delay, 1))
            return Outcome(claim, "retry", error=e.reason), _retry_op(
                claim, e.reason, delay, count=True
            )
        if isinstance(e, PermanentError):
            if isinstance(e, MediaError) and self._stop_event.is_set():
                return Outcome(claim, "abandoned"), _retry_op(claim, None, 0.0, count=False)
            kind = (
                "conflict"
                if isinstance(e, _Conflict)
                else "media"
                if isinstance(e, MediaError)
                else "sink"
            )
            bound.error("item failed", reason=e.reason)
            return Outcome(claim, "failed", error=e.reason), Ledger.op_failed(
                claim, e.reason, kind, time.time()
            )
        return _crashed(claim, e)

    async def _send(
        self,
        sink: Sink,
        claim: Claim,
        payload: ItemPayload,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> PutResult:
        """One item to `sink` (the caller holds a sink slot)."""
        # An item an edit moved is new where it goes: no update in place, and what the
        # old place held says nothing about the new one.
        synced = claim.synced_manifest if old_place(claim) is None else None
        if _updates_metadata(sink, synced, payload):
            # Same bytes, new metadata (e.g. a sidecar edit): no re-upload.
            assert isinstance(sink, MetadataUpdater)
            result = await sink.update_metadata(claim.dataset, payload, claim.backend_id)
            bound.info("metadata updated in place")
            return result
        if _takes_previous(sink):
            # The sink can tell a real content change from a re-send by it.
            return await sink.put_item(claim.dataset, payload, previous=synced)  # type: ignore[call-arg]
        return await sink.put_item(claim.dataset, payload)

    async def _ensure_dataset(self, sink: Sink, dataset: str) -> None:
        """Once per dataset and sink (one call at a time: the first items of a new
        dataset all arrive together)."""
        if dataset in self._datasets_ready:
            return
        async with self._dataset_lock:
            if dataset in self._datasets_ready:
                return
            await sink.ensure_dataset(dataset)
            if sink is self.sink:
                self._datasets_ready.add(dataset)

    async def _source_key(self, side: WatchSide, plan: ItemPlan) -> tuple[str, list[str]]:
        """A key for everything the sent item depends on (equal keys: nothing to send),
        and the files' digests where finding the key needed them. Bucket objects are
        keyed by ETag and size, so an unchanged object is never downloaded."""
        if side.store is None:
            return await asyncio.to_thread(hash_sources, side, plan, self._stop_event)
        return bucket_source_key(side, plan, self.transfer(side)), []

    async def _payload(
        self, side: WatchSide, plan: ItemPlan, digests: list[str], spool: str, spooled: bool
    ) -> ItemPayload:
        """The item as sent. `spooled`: some slot is derived by the media rules (in the
        media pool, into `spool`); otherwise local files go as they are, no thread hop."""
        if side.store is not None:
            if self.transfer(side) == "register":
                return await register_payload(side, plan)
            return await self._copy_payload(side, plan, spool)
        if spooled:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._media_pool, build_payload, side, plan, digests, spool, self._stop_event
            )
        return build_payload(side, plan, digests, spool)

    async def _copy_payload(self, side: WatchSide, plan: ItemPlan, spool: str) -> ItemPayload:
        """Bucket objects with their bytes: streamed to the sink when sent as they are
        (hashed by one etag-pinned GET, sent by another), downloaded to `spool` when the
        media rules must read or derive them."""
        store = _store_of(side)
        media = side.media
        slots = []
        for i, slot in enumerate(plan.slots):
            if media is None or not transforms(slot.type, media):
                files = [await _streamed_file(store, f, self._stop_event) for f in slot.files]
                slots.append(
                    SlotPayload(slot.name, slot.type, tuple(files), _plain_extra(slot, media))
                )
                continue
            local: list[tuple[str, str]] = []
            for j, f in enumerate(slot.files):
                dest = os.path.join(spool, "src", f"{i:04d}-{j:06d}", f.name)
                await _download(store, f, dest)
                local.append((f.name, dest))
            loop = asyncio.get_running_loop()
            slots.append(
                await loop.run_in_executor(
                    self._media_pool,
                    _prepare_slot,
                    slot,
                    local,
                    media,
                    os.path.join(spool, "out", f"{i:04d}"),
                    self._stop_event,
                )
            )
        return ItemPayload(plan.path, plan.name, tuple(slots), plan.metadata)

    async def _drop_old_place(
        self,
        sink: Sink,
        claim: Claim,
        side: WatchSide,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> None:
        """An edit moved the item (dataset, path or name): with on_delete: delete, the
        item at its old place goes now that the new one is in. A failure leaves it there
        and says so; the item itself is synced."""
        old = old_place(claim)
        if old is None or side.on_delete != "delete" or not sink.capabilities.delete:
            return
        dataset, path, name = old
        try:
            async with self._slots:
                await sink.delete_item(dataset, path, name)
        except SyncError as e:
            bound.warning(
                "the item moved; its old copy could not be deleted, delete it by hand",
                old_dataset=dataset,
                old_key=item_key(path, name),
                reason=e.reason,
            )
            return
        bound.info(
            "the item moved; deleted its old copy (on_delete: delete)",
            old_dataset=dataset,
            old_key=item_key(path, name),
        )

    async def _delete(
        self, claim: Claim, bound: structlog.typing.FilteringBoundLogger
    ) -> tuple[Outcome, LedgerOp]:
        m = claim.synced_manifest
        sink = self.sink
        if m is not None and sink.capabilities.delete:
            async with self._slots:
                await sink.delete_item(m.get("dataset", claim.dataset), m["path"], m["name"])
            bound.info("deleted from the dataset (on_delete: delete)")
        return Outcome(claim, "deleted"), Ledger.op_synced(claim, None, None, time.time())


# -- bucket objects -------------------------------------------------------------------------


def bucket_source_key(side: WatchSide, plan: ItemPlan, transfer: Transfer) -> str:
    """The bucket counterpart of hash_sources' key: an object's ETag and size stand for
    its bytes (no download), and the transfer mode is part of what was sent."""
    files = [[f.relpath, f.size, f.etag or f.mtime_ns] for s in plan.slots for f in s.files]
    media = (
        side.media.identity([(s.type, None) for s in plan.slots])
        if side.media is not None
        else None
    )
    return fingerprint([_shape(plan), files, media, transfer])


def _store_of(side: WatchSide) -> ObjectStore:
    assert side.store is not None
    try:
        return side.store.get()
    except BucketError as e:
        raise _bucket_sync_error(e) from None


def _bucket_sync_error(e: BucketError) -> SyncError:
    if e.kind == "not_found":
        return SourceChangedError(e.message)
    if e.kind == "denied":
        return PermanentError(
            f"{e.message}. The item is tried again when the object changes or on `ingestd retry`"
        )
    return RetriableError(e.message)


@contextlib.asynccontextmanager
async def _reading_object(url: str) -> AsyncIterator[None]:
    """Store failures while reading an object, as the sync step's errors: a changed or
    vanished object waits for the next listing to plan it again."""
    try:
        yield
    except ObjectChanged as e:
        raise SourceChangedError(f"{url} changed since it was listed ({e})") from None
    except BucketError as e:
        raise _bucket_sync_error(e) from None


class _ObjectOpener:
    """FilePayload.opener for a bucket object: a fresh etag-pinned stream per attempt.
    `where` names the object for a sink's messages."""

    def __init__(self, store: ObjectStore, f: PlannedFile) -> None:
        self.store = store
        self.key = f.relpath
        self.etag = f.etag
        self.where = store.object_url(f.relpath)

    def __call__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        async with (
            _reading_object(self.where),
            contextlib.aclosing(self.store.stream(self.key, etag=self.etag)) as chunks,
        ):
            async for chunk in chunks:
                yield chunk


async def _streamed_file(
    store: ObjectStore, f: PlannedFile, stop: threading.Event | None
) -> FilePayload:
    """Hash the object (one etag-pinned GET, nothing on disk) and hand the sink an
    opener that streams the same version again."""
    opener = _ObjectOpener(store, f)
    h = hashlib.sha256()
    n = 0
    async with contextlib.aclosing(opener()) as chunks:
        async for chunk in chunks:
            if len(chunk) >= 1 << 18:
                await asyncio.to_thread(h.update, chunk)  # sha256 lets go of the GIL
            else:
                h.update(chunk)
            n += len(chunk)
            if stop is not None and stop.is_set():
                raise Abandoned(opener.where)
    if n != f.size:
        raise SourceChangedError(f"{opener.where} has {n} bytes, not the {f.size} listed")
    return FilePayload(f.name, "", f.size, f"sha256:{h.hexdigest()}", etag=f.etag, opener=opener)


async def _download(store: ObjectStore, f: PlannedFile, dest: str) -> None:
    url = store.object_url(f.relpath)
    async with _reading_object(url):
        await store.download(f.relpath, dest, etag=f.etag)
    size = await asyncio.to_thread(os.path.getsize, dest)
    if size != f.size:
        raise SourceChangedError(f"{url} has {size} bytes, not the {f.size} listed")


def _prepare_slot(
    slot: PlannedSlot,
    files: list[tuple[str, str]],
    media: MediaSettings,
    spool: str,
    stop: threading.Event | None,
) -> SlotPayload:
    """A slot of downloaded objects through the media rules (blocking: media pool)."""
    prepared = transform_slot(slot.type, files, media, spool, stop)
    out = []
    for name, path in prepared.files:
        st = os.stat(path)
        digest = _hash_checked(path, st.st_size, st.st_mtime_ns, True, stop)
        out.append(FilePayload(name, path, st.st_size, digest))
    return SlotPayload(slot.name, prepared.type, tuple(out), {**slot.extra, **prepared.extra})


def _plain_extra(slot: PlannedSlot, media: MediaSettings | None) -> dict[str, object]:
    """A slot's extra keys when it goes untransformed (what transform_slot adds then)."""
    if media is not None and slot.type == "video" and media.video.mode == "native":
        return {**slot.extra, "fps": media.video.fps}
    return slot.extra


async def register_payload(side: WatchSide, plan: ItemPlan) -> ItemPayload:
    """The item as references to its objects (`transfer: register`): no bytes move.
    Images go as they are (not decoded, not downscaled). What needs the bytes to be
    made (sampled frames, de-identified DICOM) fails with a reason naming the fix."""
    store = _store_of(side)
    media = side.media
    slots = []
    for slot in plan.slots:
        if media is not None:
            await _check_registrable(store, slot, media)
        files = []
        for f in slot.files:
            url = store.object_url(f.relpath)
            async with _reading_object(url):
                info = await store.head(f.relpath)
            if info is None:
                raise SourceChangedError(f"{url} vanished since it was listed")
            if f.etag and info.etag != f.etag:
                raise SourceChangedError(f"{url} changed since it was listed")
            files.append(FilePayload(f.name, "", f.size, "", url=url, etag=f.etag))
        slots.append(SlotPayload(slot.name, slot.type, tuple(files), _plain_extra(slot, media)))
    return ItemPayload(plan.path, plan.name, tuple(slots), plan.metadata)


async def _check_registrable(store: ObjectStore, slot: PlannedSlot, media: MediaSettings) -> None:
    names = ", ".join(f.relpath for f in slot.files[:3]) + (", …" if len(slot.files) > 3 else "")
    if slot.type == "video" and media.video.mode == "frames":
        raise PermanentError(
            f"{names}: video.mode frames samples frames from the video's bytes, which "
            "transfer: register never reads; set transfer: copy or video.mode: native"
        )
    deidentified = media.dicom.deidentify and slot.type in ("dicom", "file")
    if deidentified and (slot.type == "dicom" or await _any_dicom(store, slot)):
        raise PermanentError(
            f"{names}: dicom.deidentify must strip the file before it leaves, and "
            "transfer: register would hand out the original; set transfer: copy"
        )


async def _any_dicom(store: ObjectStore, slot: PlannedSlot) -> bool:
    """Whether a slot of generic files holds DICOM by content (the safety net that
    transform_slot applies to local files, done here with the first bytes only)."""
    for f in slot.files:
        async with _reading_object(store.object_url(f.relpath)):
            head = await store.read_range(f.relpath, 0, 132)
        if type_of_prefix(head) == "dicom":
            return True
    return False


def _metadata_only(synced: Mapping[str, Any] | None, payload: ItemPayload) -> bool:
    """The item the sink holds differs from `payload` in its metadata alone."""
    if synced is None:
        return False
    now = payload.manifest()
    return (
        all(synced.get(k) == now[k] for k in ("path", "name", "slots"))
        and synced.get("metadata") != now["metadata"]
    )


def _takes_previous(sink: Sink) -> bool:
    """Whether the sink's put_item accepts the last synced manifest (`previous=`)."""
    method = sink.put_item
    fn = getattr(method, "__func__", method)
    known = _TAKES_PREVIOUS.get(fn)
    if known is None:
        try:
            known = "previous" in inspect.signature(method).parameters
        except (TypeError, ValueError):
            known = False
        _TAKES_PREVIOUS[fn] = known
    return known


# inspect.signature per item was 5 % of the event loop's time at thousands of items/s.
_TAKES_PREVIOUS: dict[object, bool] = {}


def _updates_metadata(sink: Sink, synced: Mapping[str, Any] | None, payload: ItemPayload) -> bool:
    """The item goes as an in-place metadata update (sinks that can do one)."""
    return (
        synced is not None
        and sink.capabilities.metadata_update
        and isinstance(sink, MetadataUpdater)
        and _metadata_only(synced, payload)
    )


def _synced_manifest(payload: ItemPayload, source_key: str, dataset: str) -> dict[str, Any]:
    """What the ledger records of a synced item: its content identity, the key of what
    it was made from, and where it went (to tell when an edit moves it)."""
    return {**payload.manifest(), "source_key": source_key, "dataset": dataset}


def _unchanged(claim: Claim, source_key: str) -> bool:
    """The sink already holds exactly this, at this place: nothing to send."""
    synced = claim.synced_manifest
    return (
        synced is not None and synced.get("source_key") == source_key and old_place(claim) is None
    )


def old_place(claim: Claim) -> tuple[str, str, str] | None:
    """(dataset, path, name) the item was synced to, when an edit has moved it since
    (manifests recorded before datasets were recorded count as the same dataset)."""
    m = claim.synced_manifest
    if m is None or claim.plan is None or "path" not in m:
        return None
    old = (str(m.get("dataset", claim.dataset)), str(m["path"]), str(m["name"]))
    return None if old == (claim.dataset, claim.plan.path, claim.plan.name) else old


def _plan_bytes(plan: ItemPlan) -> int:
    return sum(f.size for slot in plan.slots for f in slot.files)


def _payload_bytes(payload: ItemPayload) -> int:
    """The bytes an item moves (registered objects move none)."""
    return sum(f.size for s in payload.slots for f in s.files if not f.is_remote)


def _crashed(claim: Claim, e: Exception) -> tuple[Outcome, LedgerOp]:
    """A bug in the sync step: keep the item, back off, say so loudly."""
    log.error(
        "sync step crashed",
        watch=claim.watch,
        item=claim.key,
        exc_info=(type(e), e, e.__traceback__),
    )
    reason = f"internal error: {type(e).__name__}: {e}"
    op = _retry_op(claim, reason, backoff_delay(claim.attempts), count=True)
    return Outcome(claim, "retry", error=reason), op


def _retry_op(claim: Claim, reason: str | None, delay: float, *, count: bool) -> LedgerOp:
    now = time.time()
    return Ledger.op_retry_later(claim, reason, now + delay, count_attempt=count, now=now)


class _Conflict(PermanentError):
    pass
