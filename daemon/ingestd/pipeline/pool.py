"""The sync workers: claim due items from the ledger, hand them to the sync step, record.

The backlog lives in the ledger; in memory there is only the set of items in flight
(a fixed multiple of `workers`), so memory stays flat whatever the backlog.

`workers` bounds the calls into the sink at once. Items are claimed and hashed ahead of
that, so a sink call does not wait for the ledger or for the hashing of its item. For a
sink with the optional batch put (capabilities.batch: the local store, a Labelbox import
task, a Nucleus append, a V7 register_upload), small items of local files and bucket
objects registered by URL are claimed ahead from the backlog and go in groups as big as
the sink allows, each group one task: one thread hop hashes it, one sink call stores
it, one ledger transaction records it. Groups fill from the backlog, not from the
workers: `workers` bounds the sink calls at once, not the rows per call. Each item's
outcome is still its own.

Faults that are not the item's hold the pool rather than each item backing off alone.
An outcome that cannot be recorded (the ledger's disk is full) keeps its item claimed,
so it is not sent again, and is written once the ledger is writable; meanwhile nothing
new is claimed. An item that fails for a condition of the sink (out of space:
RetriableError.condition) holds the pool: `problem` says so, one item a second goes
as the probe, and when one goes through every item held by the condition is due at
once (op_wake_pending) and the pool runs at full speed again.

With a shared ledger (PostgreSQL, several daemons) a claim is a lease: `due` leases
the items to this daemon, the pool renews the leases of its items in flight every
third of the lease, and outcome ops end them. A daemon that dies stops renewing, and
its items are due for the others once the lease has run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import structlog

from ingestd.core.errors import SPACE
from ingestd.ledger import AsyncLedger, Claim, LedgerOp
from ingestd.ledger.ops import op_wake_pending
from ingestd.media.transform import transforms
from ingestd.pipeline.leases import Key, Leases
from ingestd.pipeline.outcome import Outcome, abandoned, crashed
from ingestd.pipeline.prepare import Preparer
from ingestd.pipeline.send import Sender, old_place
from ingestd.pipeline.side import WatchSide
from ingestd.pipeline.sync import SyncStep
from ingestd.sinks.base import BatchLimits, Sink

# Items claimed per worker: a couple, so the next sink call's item is ready when a worker
# frees up. A sink that takes groups gets two full groups more, so that the next group is
# ready while one is sent.
AHEAD = 2
GROUPS_AHEAD = 2
PROBE_EVERY = 1.0  # seconds between probe items while the pool is held
T = TypeVar("T")

log = structlog.get_logger("ingestd.sync")


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


class _Hold:
    """A sink condition holding the pool (out of space): what status says of it, the
    probe item in flight, and when the next probe may go."""

    def __init__(self) -> None:
        self.condition: str | None = None
        self.problem: str | None = None
        self.probe: tuple[str, str] | None = None
        self.next_probe = 0.0

    def free(self, free: int) -> int:
        """Items to claim now, of `free`: all, or while held one probe at a time."""
        if self.condition is None:
            return free
        if self.probe is not None or time.monotonic() < self.next_probe:
            return 0
        return min(free, 1)

    def probing(self, claims: list[Claim]) -> None:
        if claims and self.condition is not None:
            self.probe = (claims[0].watch, claims[0].source_id)
            self.next_probe = time.monotonic() + PROBE_EVERY

    def done(self, key: tuple[str, str]) -> None:
        if self.probe == key:
            self.probe = None

    def note(self, outcome: Outcome) -> list[LedgerOp]:
        """Hold on an outcome failed for a sink condition; release on a success while
        held. The ops to record with the outcome: the wake-up of the held items."""
        claim = outcome.claim
        if outcome.condition is not None:
            self.next_probe = time.monotonic() + PROBE_EVERY
            if self.condition is None:
                self.condition = outcome.condition
                fix = "free space there; " if outcome.condition == SPACE else ""
                self.problem = (
                    f"{outcome.error}; {fix}one item is retried every second and all "
                    "continue when it succeeds"
                )
                log.error(
                    "sync held until one item goes through",
                    condition=outcome.condition,
                    watch=claim.watch,
                    item=claim.key,
                    reason=outcome.error,
                )
            return []
        if self.condition is not None and outcome.result == "synced":
            held, self.condition, self.problem = self.condition, None, None
            log.info("sync resumed: the sink takes items again", watch=claim.watch, item=claim.key)
            return [op_wake_pending(held, time.time())]
        return []


async def _record(ledger: AsyncLedger, ops: list[LedgerOp]) -> None:
    """Write outcome ops. While the ledger cannot be written they are kept (and so their
    items stay claimed, not sent again) and written once it can."""
    while True:
        try:
            await ledger.write_many(ops)
            return
        except Exception as e:
            if not ledger.is_unwritable(e):
                # Not the disk: the items are claimed again later; not at once, which
                # would loop as fast as the op fails.
                log.exception("recording outcomes failed", items=len(ops))
                await asyncio.sleep(PROBE_EVERY)
                return
        await ledger.wait_writable()


async def _unless_unwritable(ledger: AsyncLedger, read: Awaitable[T]) -> T | None:
    """A ledger read, or None when the ledger cannot be reached (its problem says so;
    the pool waits for it to be writable again)."""
    try:
        return await read
    except Exception as e:
        if not ledger.is_unwritable(e):
            raise
        return None


def groupable(
    claim: Claim, limits: BatchLimits | None, side: WatchSide | None, sender: Sender
) -> int | None:
    """The bytes a group would move for the item, when it can go in one: a small
    item of local files sent as they are, or bucket objects registered by URL (no
    bytes), with no conflict to report. The common cases, which a group handles
    with a fraction of the per-item cost; None for the rest."""
    plan = claim.plan
    if limits is None or plan is None or side is None or claim.key_owner:
        return None
    if old_place(claim) is not None:  # rare; the per-item path handles the move
        return None
    if not side.source.features.local_paths:
        return 0 if sender.transfer(side) == "register" else None
    media = side.media
    # Images are checked (and maybe downscaled), DICOM headers checked, in one
    # media-pool trip per group; what derives more (frames, de-identified DICOM)
    # goes alone.
    if media is not None and any(
        transforms(s.type, media)
        and s.type != "image"
        and (s.type != "dicom" or media.dicom.deidentify)
        for s in plan.slots
    ):
        return None
    size = sum(f.size for slot in plan.slots for f in slot.files)
    return size if size <= limits.small else None


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
        self._leases = Leases(ledger, self._lost)
        self._sender = Sender(sink, self._slots, self._leases.fence if ledger.shared else None)
        self._preparer = Preparer(self._stop_event, spool_root, self._sender.transfer)
        self._step = SyncStep(self._preparer, self._sender)
        self._hold = _Hold()

    @property
    def sink(self) -> Sink:
        return self._sender.sink

    @property
    def problem(self) -> str | None:
        """What holds the pool (the sink out of space), for status; None normally."""
        return self._hold.problem

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def _depth(self) -> int:
        """Items claimed at most (between claim and sink result)."""
        limits = self._sender.batches()
        return self.workers * AHEAD + (GROUPS_AHEAD * limits.items if limits else 0)

    def replace_sink(self, sink: Sink) -> Sink:
        """Send new work to `sink` from now on (a reload changed the backend). Items in
        flight finish on the old sink, which is returned with `drain()` to await before
        closing it."""
        old = self._sender.replace(sink)
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
        renew = None
        if self.ledger.shared:
            renew = asyncio.create_task(self._leases.run())
        try:
            await self._run(poll)
        finally:
            if renew is not None:
                renew.cancel()

    async def _run(self, poll: float) -> None:
        while not self._stopping:
            self._wake.clear()
            if not self.ledger.writable.is_set():
                # Outcomes cannot be recorded: new claims would only be sent again.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.ledger.wait_writable(), poll)
                continue
            free = self._hold.free(self._depth() - self._busy)
            claims: list[Claim] = []
            if free > 0:
                got = await _unless_unwritable(self.ledger, self._claim(free, []))
                if got is None:
                    continue  # the ledger is gone (a shared one's server): wait above
                claims = got
                limits = self._sender.batches()
                if (
                    limits
                    and limits.linger > 0
                    and self._hold.condition is None
                    and 0 < len(claims) < min(free, limits.items)
                ):
                    # A short backlog: give the group `linger` to fill before it goes.
                    await asyncio.sleep(limits.linger)
                    claims += await self._claim(free - len(claims), claims)
                self._hold.probing(claims)
                self._dispatch(claims)
            held = self._hold.condition is not None
            if claims and self._busy < self._depth() and not held:
                continue
            timeout = poll
            if held and self._hold.probe is None:
                timeout = min(poll, max(0.0, self._hold.next_probe - time.monotonic()))
            elif free > 0 and not claims:
                # Items in flight are still pending in the ledger, and due: without them
                # excluded the wait would be 0 until they finish (a busy loop).
                nxt = await _unless_unwritable(
                    self.ledger,
                    self.ledger.call(
                        self.ledger.sync.next_due_time, list(self.watches), list(self._inflight)
                    ),
                )
                if nxt is not None:
                    timeout = min(poll, max(0.0, nxt - time.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _note(self, outcome: Outcome) -> list[LedgerOp]:
        ops = self._hold.note(outcome)
        if ops:
            self.wake()  # released: full speed
        return ops

    async def _claim(self, n: int, also: list[Claim]) -> list[Claim]:
        """Up to `n` due items, none of those in flight or in `also`."""
        exclude = list(self._inflight) + [(c.watch, c.source_id) for c in also]
        asked_at = time.monotonic()
        claims = await self.ledger.call(
            self.ledger.sync.due, time.time(), n, exclude, list(self.watches)
        )
        self._leases.claimed(claims, asked_at)
        return claims

    def _lost(self, keys: set[Key]) -> None:
        """Another daemon has these items now: stop an upload of one of them under way.
        A group's task is left to finish: its items are small, and the fence kept the
        lost ones out of its sink call."""
        for k in keys:
            task = self._inflight.get(k)
            if task is not None and sum(t is task for t in self._inflight.values()) == 1:
                task.cancel()

    def _dispatch(self, claims: list[Claim]) -> None:
        """A task per claim, or per group of small items for a sink that takes groups."""
        group: list[Claim] = []
        limits = self._sender.batches()
        group_bytes = 0
        for claim in claims:
            self._busy += 1
            size = groupable(claim, limits, self.watches.get(claim.watch), self._sender)
            if size is not None:
                assert limits is not None
                if group and group_bytes + size > limits.bytes:
                    task = asyncio.create_task(self._process_group(group))
                    for c in group:
                        self._inflight[(c.watch, c.source_id)] = task
                    group, group_bytes = [], 0
                group.append(claim)
                group_bytes += size
                if len(group) < limits.items:
                    continue
                group_bytes = 0
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
        self._preparer.shutdown()
        for side in self.watches.values():
            with contextlib.suppress(Exception):
                await side.close()

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
                side = self.watches.get(claim.watch)
                if side is None:  # a reload removed the watch after the claim: leave it be
                    outcome, op = abandoned(claim)
                else:
                    outcome, op = await self._step.sync_one(claim, side)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug: keep the item, back off, say so loudly
                outcome, op = crashed(claim, e)
            finally:
                # The worker is free once the sink is done; the item stays claimed until
                # its result is committed, so recording overlaps the next upload.
                self._busy -= 1
                self._wake.set()
            await _record(self.ledger, [op, *self._note(outcome)])
        finally:
            self._inflight.pop(k, None)
            self._hold.done(k)
            self._leases.done(k)
            self._wake.set()
        self._report(outcome)

    async def _process_group(self, claims: list[Claim]) -> None:
        """_process for a group of small local items (see groupable): one thread hop
        hashes them all, one batch put stores those that changed, one ledger
        transaction records every result. Each item's outcome is its own."""
        done: list[tuple[Outcome, LedgerOp | None]] = []
        try:
            try:
                done, synced = await self._sync_group(claims)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug: keep the items, back off, say so loudly
                done, synced = [crashed(c, e) for c in claims], None
            finally:
                self._busy -= len(claims)
                self._wake.set()
            ops = [op for _, op in done if op is not None]
            if synced is not None:
                ops.insert(0, synced)
            for outcome, _ in done:
                ops += self._note(outcome)
            await _record(self.ledger, ops)
        finally:
            for c in claims:
                k = (c.watch, c.source_id)
                self._inflight.pop(k, None)
                self._hold.done(k)
                self._leases.done(k)
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
                done.append(abandoned(c))
            else:
                kept.append((c, side))
        if not kept:
            return done, None
        more, synced = await self._step.sync_group([c for c, _ in kept], [s for _, s in kept])
        return done + more, synced
