"""One running watch, on any Source: listing passes and hints → settle → plan → ledger.

The runner is the same for a local folder, a bucket prefix or the in-memory test source:
it asks the source's declared features, never its type. Every kind of source is listed
in full passes (`Source.changes`, compared with the ledger) at start, on a timer and on
request; a failed pass is a watch problem, retried with backoff, and deletes nothing. A
source with events (`Features.events`) also delivers hints between passes (events.py);
how a listed file settles depends on the same feature (settling.py). It only writes to
the ledger; the shared sync pool takes it from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from ingestd.config import Watch
from ingestd.core.model import Entry
from ingestd.core.source import Source, SourceError
from ingestd.ledger import AsyncLedger, Ledger, op_plan_settled, op_watch_settings
from ingestd.pipeline.deletions import apply_gone
from ingestd.pipeline.events import EventHints
from ingestd.pipeline.plan_queue import PlanQueue
from ingestd.pipeline.planner import Planner, WatchFilter
from ingestd.pipeline.queue_hints import QueueHints
from ingestd.pipeline.settling import ListedSettling, ObservedSettling, Settling
from ingestd.pipeline.work import LedgerKnown, PassStats, PlanWork
from ingestd.plan.groups import GroupMembership
from ingestd.sources import open_source

log = structlog.get_logger("ingestd.watch")

STOP_TIMEOUT = 2.0  # a stopping runner waits this long for its tasks (a stuck thread stays)

# Why a full pass ran, as `status` shows it.
REASONS = ("start", "timer", "request", "overflow", "folder appeared", "backlog full")


@dataclass(frozen=True, slots=True)
class Rescan:
    """The last full pass that completed. `found`: files it listed new or changed, and
    known files it found gone. `repaired`: those of them no event had announced, i.e.
    not held for settling after a hint and not already noted gone; for a source without
    events every one counts. (A pass handing on every file after a settings change
    counts every file; a file planned in the moment between its settling and its
    ledger record may count once too.)"""

    at: float  # wall-clock time the pass ended
    reason: str
    found: int
    repaired: int

    def as_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "reason": self.reason,
            "found": self.found,
            "repaired": self.repaired,
        }


class _Takes:
    """What a listing takes: the watch's filter, less files below a group's first level
    (logged once per group folder)."""

    def __init__(self, runner: WatchRunner) -> None:
        self.runner = runner

    def accepts(self, relpath: str) -> bool:
        r = self.runner
        if not r.filter.accepts(relpath):
            return False
        m = r.planner.membership(relpath)
        if m.kind == "ignored":
            r.log_ignored(relpath, m)
            return False
        return True

    def prunes_dir(self, reldir: str) -> bool:
        return self.runner.filter.prunes_dir(reldir)


# The parts that stand alone already live apart (events.py, plan_queue.py, settling.py,
# deletions.py); what is left shares the runner's state.
# long: one watch's whole life: start, passes and what status shows of them, deletions
class WatchRunner:
    backoff_base = 5.0  # first retry after a failed pass, at most
    backoff_cap = 300.0
    # Set while the watch's root is missing: the first time ("waiting for") differs
    # from a root that went away (an unmounted disk).
    root_missing = False

    def __init__(
        self,
        watch: Watch,
        ledger: AsyncLedger,
        on_planned: Callable[[], None],
        *,
        source: Source | None = None,
        observe: bool = True,
        deid_key: bytes | None = None,
    ) -> None:
        self.watch = watch
        self.ledger = ledger
        self.source = source if source is not None else open_source(watch)
        self.filter = WatchFilter(watch)
        self.planner = Planner(watch, self.filter, deid_key, files=self.source.files)
        self.log = log.bind(watch=watch.name)
        self.events = self.source.features.events
        self.settling: Settling = (
            ObservedSettling(
                self.source,
                watch.settle,
                self._on_ready,
                self._on_gone,
                self._settler_overflow,
                # Ready files wait in the settler while the plan queue is full.
                downstream=lambda: self.plans.room(),
            )
            if self.events
            else ListedSettling(watch.settle)
        )
        self.hints = EventHints(self) if self.events and observe else None
        # A bucket's event queue (Features.queue): durable hints, taken by the daemon only
        self.queue_hints = QueueHints(self) if self.source.features.queue and observe else None
        self.known = LedgerKnown(ledger, watch.name)
        self.takes = _Takes(self)
        self.on_planned = on_planned
        self._observe = observe
        self.plans = PlanQueue(self)
        self._passing = 0
        self.gone: set[str] = set()
        self.gone_at = 0.0
        self._rescan = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_pass = 0.0
        self.scans = 0
        self.last_pass: PassStats | None = None  # the last pass that completed
        self.overflows = 0
        self.last_overflow: float | None = None  # wall-clock time of the last event overflow
        self.last_rescan: Rescan | None = None
        self._reasons: list[str] = []  # why rescans were asked for since the last one
        self._listed = False  # a full pass completed since the runner started
        self._settings_checked = False
        self.problem: str | None = None  # a failure of the runner itself (not the source)
        self.failures = 0  # passes failed in a row
        self.files_seen = 0  # files noticed new or changed (each version counted once)
        # The settings changed since the items were planned: full passes hand on every
        # file, not only changed ones, until one has been planned through.
        self.replan = False
        self._settler_overflows = 0
        # A shared ledger (several daemons): one of them lists a bucket watch at a time,
        # by lease; a local folder is listed by the daemon whose machine has it.
        self._leased = bool(getattr(ledger, "shared", False)) and not (
            self.source.features.local_paths
        )
        self.lister: str | None = None  # who holds the listing lease, when leased

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Install the observer first, then list, so nothing created meanwhile is missed.
        Whatever fails here (no folder yet, the ledger) is shown and retried by the pass
        loop, which runs in any case: a watch never stops for a failed start. Without a
        folder the observer cannot start; the health check installs it once the folder
        is there."""
        name = self.watch.name
        features = self.source.features
        self.log.info(
            "watch mode",
            mode=self.mode,
            reason=features.mode_reason or None,
        )
        if self.hints is not None:
            await self.hints.start_observer()
        self._tasks = [
            asyncio.create_task(self.settling.run(), name=f"settle:{name}"),
            asyncio.create_task(self.plans.run(), name=f"plan:{name}"),
        ]
        if self.queue_hints is not None:
            self._tasks += self.queue_hints.tasks()  # messages wait in the queue meanwhile
        try:
            await self._full_pass("start")
        except Exception as e:
            self.failures += 1
            self.log.exception("watch start failed; trying again with backoff", error=str(e))
        if self._observe or not self.events:
            self._tasks.append(asyncio.create_task(self._pass_loop(), name=f"pass:{name}"))
        if self._leased:
            self._tasks.append(asyncio.create_task(self._lease_loop(), name=f"lease:{name}"))
        if self.hints is not None:
            self._tasks += self.hints.tasks()

    @property
    def mode(self) -> str:
        """How the watch learns of changes: events (inotify), queue (a bucket's event
        queue), or poll."""
        features = self.source.features
        return "events" if features.events else "queue" if features.queue else "poll"

    async def stop(self) -> None:
        """Cancel the watch's tasks and wait for them at most STOP_TIMEOUT: a task stuck
        on a thread (a hung mount, a planner that never returns) is left behind rather
        than holding up the daemon's stop."""
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT)
            if stuck:
                self.log.warning(
                    "watch tasks did not stop in time; leaving them",
                    tasks=sorted(t.get_name() for t in stuck),
                )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.source.close(), STOP_TIMEOUT)

    async def _full_pass(self, reason: str) -> None:
        """A full pass, after the settings check if that has not succeeded yet. An
        exception (the ledger) is the runner's problem until a pass completes. With a
        shared ledger only the holder of the watch's listing lease lists it."""
        if not await self._may_list():
            return
        try:
            if not self._settings_checked:
                await self.check_settings()
                self._settings_checked = True
            await self.scan("", reason=reason)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.problem = f"{type(e).__name__}: {e}; trying again with backoff"
            raise
        self.problem = None

    async def check_settings(self) -> None:
        """Compare the watch's settings with those its items were made with (the config
        was edited, while the daemon ran or while it was down): queue the synced items
        again when media or transfer settings changed, and plan every file again when
        the item shape (folders, metadata, grouping, filters) changed."""
        w = self.watch
        replan, requeued = await self.ledger.write(
            op_watch_settings(w.name, w.plan_identity(), w.send_identity(), time.time())
        )
        if requeued:
            self.log.info(
                "media or transfer settings changed; checking synced items again", items=requeued
            )
            self.on_planned()
        if replan:
            self.log.info("item settings changed; planning every file again")
            self.replan = True

    async def _may_list(self) -> bool:
        """Take or renew the listing lease (always ours without a shared ledger)."""
        if not self._leased:
            return True
        held, self.lister = await self.ledger.call(self.ledger.sync.hold_watch, self.watch.name)
        return bool(held)

    async def _lease_loop(self) -> None:
        """Renew the listing lease while listing; take it over, and list at once, when
        the lister stopped renewing it (died). A lost server is the ledger's problem."""
        me = self.ledger.at.holder
        while True:
            await asyncio.sleep(self.ledger.at.lease / 3)
            was = self.lister == me
            with contextlib.suppress(Exception):
                if await self._may_list() and not was:
                    self.log.info("listing this watch now (lease taken over)")
                    self.request_rescan("start")

    def request_rescan(self, reason: str = "request") -> None:
        """A full pass soon. `reason` is one of REASONS; an overflow is also timed."""
        if reason == "overflow":
            self.last_overflow = time.time()
        if reason not in self._reasons:
            self._reasons.append(reason)
        self._rescan.set()

    def live(self) -> dict[str, Any]:
        """What the running watch adds to `status`: how it is watched, its last event
        overflow and its last full pass."""
        features = self.source.features
        return {
            "mode": self.mode,
            "mode_reason": features.mode_reason,
            "last_overflow": self.last_overflow,
            "last_rescan": self.last_rescan.as_json() if self.last_rescan else None,
            **({"lister": self.lister} if self._leased else {}),
        }

    def hint_changed(self, relpaths: Sequence[str]) -> None:
        """The sync step saw these files change under it: look again."""
        if self.queue_hints is not None:
            self.queue_hints.look_again(relpaths)  # a HEAD each, not a listing of the prefix
            return
        if not self.events:
            self.request_rescan()  # a listing is the only way to look at an object
        for rel in relpaths:
            self.settling.hint(rel)

    @property
    def busy(self) -> bool:
        """Files are still settling or being planned (one-pass sync waits for this). A
        pass takes ready files out of settling before it plans them, so a pass in
        progress counts as busy too."""
        return bool(self._passing or len(self.settling) or self.plans.busy)

    def next_delay(self) -> float:
        """Seconds until the next full pass: the interval, backing off after failures
        (from at most `backoff_base` up to `backoff_cap`, jittered)."""
        w = self.watch
        interval = w.rescan if self.events else w.poll_interval
        if self.root_missing:
            # Looking for a folder costs one stat: keep looking often, without backoff.
            return min(interval, self.backoff_base)
        if self.failures:
            base = min(interval, self.backoff_base)
            step = min(self.backoff_cap, base * 2 ** min(self.failures - 1, 20))
            return random.uniform(step / 2, step)
        if not self._observe and not self.events and len(self.settling):
            # One-pass sync waits for young objects: list again sooner than the daemon.
            return min(interval, max(w.settle, 0.5))
        return interval

    async def _pass_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rescan.wait(), self.next_delay())
            self._rescan.clear()
            # Requests may come in bursts; a listing may be long: at most one per second.
            await asyncio.sleep(max(0.0, self._last_pass + 1.0 - time.monotonic()))
            reasons, self._reasons = self._reasons, []
            reason = "overflow" if "overflow" in reasons else (reasons or ["timer"])[0]
            try:
                await self._full_pass(reason)
            except Exception as e:  # recording the pass failed (the ledger): try again
                if self.ledger.is_unwritable(e):
                    # Not the source's fault: pass again as soon as the ledger takes it.
                    self.log.warning("pass not recorded; passing again once the ledger is writable")
                    await self.ledger.wait_writable()
                    self._rescan.set()
                    continue
                self.failures += 1
                self.log.exception("pass failed; trying again with backoff")

    # -- passes ---------------------------------------------------------------------------

    async def poll(self) -> bool:
        """One full pass; whether the listing completed."""
        return await self.scan("")

    async def scan(self, subdir: str, *, reason: str = "request") -> bool:
        """One listing pass of `subdir` ('' for all): plan what is ready, judge what is
        gone. A failure becomes the watch's problem and is retried; it deletes nothing.
        A full pass that completes is `last_rescan`, with `reason` (one of REASONS)."""
        self._passing += 1
        try:
            return await self._scan(subdir, reason)
        finally:
            self._passing -= 1
            self._last_pass = time.monotonic()

    async def _scan(self, subdir: str, reason: str) -> bool:
        self.scans += 1
        pass_no = self.scans
        started = time.monotonic()
        replan = self.replan and not subdir
        gone: list[str] = []
        changed = listed = errors = 0
        groups: dict[str, PlanWork] = {}  # group folders the listing is still inside
        unheld = 0  # changed files settling did not hold: no event had announced them
        try:
            async for batch in self.source.changes(
                subdir, self.known, self.takes, everything=replan
            ):
                listed += batch.listed
                changed += len(batch.changed)
                gone += batch.gone
                errors += len(batch.errors)
                for rel in batch.errors:
                    self.log.warning("cannot read folder or file during scan", path=rel)
                unheld += await self._take(batch.changed, pass_no, groups, batch.last_key)
                if self.queue_hints is not None and not subdir:
                    self.queue_hints.listed(batch.changed)
            for work in groups.values():
                await self._plan(work)
        except SourceError as e:
            await self._pass_failed(e)
            return False
        self.failures = 0
        self.settling.end_pass(pass_no)
        unannounced = sum(1 for g in gone if g not in self.gone)
        self.gone.update(gone)
        if subdir:
            self.gone_at = time.monotonic()
        else:
            # A full pass judges all its deletions together, as one batch.
            await self.apply_gone(full_pass=True)
            if replan:
                # Folders it could not read are not planned again now; recording anyway
                # keeps a lasting unreadable folder from re-planning everything each pass.
                self._full_pass_planned_all()
            if self.queue_hints is not None:
                await self.queue_hints.pass_done(complete=not errors)
        seconds = round(time.monotonic() - started, 3)
        self.last_pass = PassStats(listed, changed, len(gone), errors, seconds)
        if not subdir:
            if self.root_missing:
                reason = "folder appeared"
                self.log.info("source folder is there; watching it", source=self.source.where)
            self.root_missing = False
            self._listed = True
            repaired = unheld + unannounced
            self.last_rescan = Rescan(time.time(), reason, changed + len(gone), repaired)
            if self.events and repaired and reason not in ("start", "folder appeared"):
                self.log.info("rescan found what events had missed", reason=reason, files=repaired)
        self.log.debug(
            "scan done",
            subdir=subdir or "/",
            files=listed,
            changed=changed,
            gone=len(gone),
            seconds=seconds,
        )
        return True

    async def _take(
        self, changed: list[Entry], pass_no: int, groups: dict[str, PlanWork], last: str | None
    ) -> int:
        """Files a listing found new or changed: to settling, and what is ready to plan.
        A ready marker means its folder is complete: planned without waiting. Returns
        how many settling did not hold already."""
        offered: list[Entry] = []
        for e in changed:
            m = self.planner.membership(e.relpath)
            if m.kind == "marker" and m.group_dir is not None:
                work = groups.setdefault(m.group_dir, PlanWork())
                work.groups.add(m.group_dir)
                work.forced = True
            else:
                offered.append(e)
        # Backpressure: the listing waits here, not in memory, while settling is full.
        await self.settling.room()
        new, ready = self.settling.offer(offered, pass_no)
        self.files_seen += new
        loose: list[Entry] = []
        for e in ready:
            m = self.planner.membership(e.relpath)
            if m.kind == "member" and m.group_dir is not None:
                groups.setdefault(m.group_dir, PlanWork()).entries.append(e)
            else:
                loose.append(e)
        if loose:
            await self._plan(PlanWork(entries=loose))
        if last is not None:
            # Keys sharing a prefix are listed together: once an ordered listing is past
            # a group folder, all its files have been seen and it can be judged.
            for g in [g for g in groups if not last.startswith(g + "/")]:
                await self._plan(groups.pop(g))
        return new

    async def _pass_failed(self, e: SourceError) -> None:
        self.failures += 1
        if e.kind == "missing" and not self._listed:
            # Never seen since the start: a mount that has not arrived yet, say. The
            # daemon must not create it (files would land under the mount point).
            problem = (
                f"waiting for folder {self.source.where} (not there yet; nothing is "
                "created, an unmounted mount point must stay empty)"
            )
        elif e.kind == "missing":
            problem = (
                f"{e.message}; nothing is deleted while it is missing, and it is checked "
                "again on every rescan"
            )
        else:
            problem = f"{e.kind}: {e.message}; retried with backoff, nothing is deleted meanwhile"
        self.root_missing = e.kind == "missing"
        now = time.time()
        if await self.ledger.write(Ledger.op_set_problem(self.watch.name, problem, now)):
            self.log.error("listing failed", source=self.source.where, problem=problem)
        else:
            self.log.debug("listing failed again", failures=self.failures)

    def _full_pass_planned_all(self) -> None:
        """A full pass handed on every file: once they are all planned (and nothing was
        dropped on the way), record the settings they were planned with."""
        overflows = self._settler_overflows

        async def finish() -> None:
            while self.plans.busy or len(self.settling):
                await asyncio.sleep(0.05)
            if self._settler_overflows != overflows:
                return  # files were dropped: the rescan this asked for hands on all again
            await self.ledger.write(op_plan_settled(self.watch.name, self.watch.plan_identity()))
            self.replan = False
            self.log.info("every file planned with the new item settings")

        self._tasks.append(asyncio.create_task(finish(), name=f"replan:{self.watch.name}"))

    def _settler_overflow(self) -> None:
        self._settler_overflows += 1
        self.request_rescan("backlog full")

    # -- planning -------------------------------------------------------------------------

    def queue_plan(self, work: PlanWork) -> None:
        self.plans.put(work)

    def _on_ready(self, entries: list[Entry]) -> None:
        self.plans.put(PlanWork(entries=entries))

    def log_ignored(self, rel: str, m: GroupMembership) -> None:
        self.plans.log_ignored(rel, m)

    async def _plan(self, work: PlanWork) -> None:
        await self.plans.plan(work)

    # -- deletions ------------------------------------------------------------------------

    def _on_gone(self, relpaths: list[str]) -> None:
        self.gone.update(relpaths)
        self.gone_at = time.monotonic()

    async def apply_gone(self, *, full_pass: bool) -> None:
        gone, self.gone = sorted(self.gone), set()
        await apply_gone(self, gone, full_pass=full_pass)


def runner_stats(runners: Mapping[str, WatchRunner]) -> dict[str, dict[str, float]]:
    """Per watch: files seen, scans and overflows since its runner started (for /metrics
    and the dashboard)."""
    return {
        name: {
            "files_seen": float(r.files_seen),
            "scans": float(r.scans),
            "overflows": float(r.overflows),
        }
        for name, r in runners.items()
    }


def make_runner(
    watch: Watch,
    ledger: AsyncLedger,
    on_planned: Callable[[], None],
    *,
    source: Source | None = None,
    observe: bool = True,
    deid_key: bytes | None = None,
) -> WatchRunner:
    """The runner for one configured watch, on its source (opened here unless given)."""
    return WatchRunner(watch, ledger, on_planned, source=source, observe=observe, deid_key=deid_key)
