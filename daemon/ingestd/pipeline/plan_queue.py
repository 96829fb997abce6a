"""A watch's planning: work queued by listings, events and deletions, planned one unit at
a time in a thread (the planner reads headers and sidecars), recorded in the ledger.

A unit whose planning or recording fails is kept, never dropped: while the ledger cannot
be written the queue waits for it (AsyncLedger.wait_writable) and plans the unit again;
any other failure is retried with backoff (1 s doubling to 30 s) and is the watch's
problem until planning succeeds again."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from ingestd.core.model import Entry
from ingestd.core.source import SourceError
from ingestd.ledger import Ledger
from ingestd.pipeline.recording import record_plans
from ingestd.pipeline.work import PlanWork
from ingestd.plan.groups import GroupMembership

if TYPE_CHECKING:
    from ingestd.pipeline.runner import WatchRunner

# Files queued for planning at most before producers that can wait do (the settler, a
# pass): the backlog of a first pass stays on disk and in the source, not here.
QUEUED_FILES = 10_000
IGNORED_LOGGED = 10_000  # group folders whose ignored files were logged (bounded memory)
RETRY_FIRST = 1.0  # seconds before a failed unit is planned again, doubling...
RETRY_CAP = 30.0  # ...up to this


class PlanQueue:
    def __init__(self, runner: WatchRunner) -> None:
        self.runner = runner
        self._queue: asyncio.Queue[PlanWork] = asyncio.Queue()
        self._queued_files = 0  # entries of the units in _queue
        self.max_files = QUEUED_FILES
        self._room = asyncio.Event()
        self._ignored_logged: set[str] = set()
        self._planning = 0
        # Failures so far of the units that failed (by id: each is kept alive by its
        # retry timer or the queue until it succeeds); whether the watch's problem is
        # planning's.
        self._failures: dict[int, int] = {}
        self._problem = False

    @property
    def busy(self) -> bool:
        # Units waiting for a retry are not counted: a one-pass sync would wait forever
        # on one that keeps failing (the log and the watch's problem say so).
        return bool(self._planning or not self._queue.empty())

    @property
    def queued_files(self) -> int:
        return self._queued_files

    def put(self, work: PlanWork) -> None:
        """Queue `work` now. Never blocks (hints, retry timers); producers that can wait
        call `room` first."""
        self._queued_files += len(work.entries)
        self._queue.put_nowait(work)

    async def room(self) -> None:
        """Wait until fewer than `max_files` files are queued."""
        while self._queued_files >= self.max_files:
            self._room.clear()
            await self._room.wait()

    def log_ignored(self, rel: str, m: GroupMembership) -> None:
        key = m.group_dir or ""
        if key not in self._ignored_logged and len(self._ignored_logged) < IGNORED_LOGGED:
            self._ignored_logged.add(key)
            self.runner.log.debug("file below a group folder's first level ignored", path=rel)

    async def run(self) -> None:
        while True:
            work = await self._queue.get()
            self._queued_files -= len(work.entries)
            if self._queued_files < self.max_files:
                self._room.set()
            self._planning += 1
            try:
                await self._plan_kept(work)
            finally:
                self._planning -= 1

    async def _plan_kept(self, work: PlanWork) -> None:
        """Plan `work` until it is recorded, or hand it to a retry timer."""
        r = self.runner
        while True:
            try:
                await self._plan_once(work)
            except Exception as e:
                if r.ledger.is_unwritable(e):
                    # Nothing can be recorded: wait (the ledger says why, once).
                    r.log.debug("planning waits for the ledger to be writable")
                    await r.ledger.wait_writable()
                    continue
                await self._failed(work, e)
                return
            break
        self._failures.pop(id(work), None)
        if self._problem and not self._failures:
            try:
                cleared = await r.ledger.write(
                    Ledger.op_set_problem(r.watch.name, None, time.time())
                )
            except Exception:  # kept as the problem; the next success clears it
                return
            self._problem = False
            if cleared:
                r.log.info("planning works again")

    async def _failed(self, work: PlanWork, e: Exception) -> None:
        """Keep `work`: plan it again after a backoff, and make it the watch's problem."""
        r = self.runner
        failures = self._failures.get(id(work), 0) + 1
        self._failures[id(work)] = failures
        delay = min(RETRY_CAP, RETRY_FIRST * 2 ** min(failures - 1, 10))
        r.log.error(
            "planning failed; kept and retried",
            error=f"{type(e).__name__}: {e}",
            retry_in=delay,
            exc_info=(type(e), e, e.__traceback__),
        )
        asyncio.get_running_loop().call_later(delay, self.put, work)
        problem = f"planning failed: {e}; retried in {delay:.0f}s"
        try:
            await r.ledger.write(Ledger.op_set_problem(r.watch.name, problem, time.time()))
            self._problem = True
        except Exception:  # the ledger may refuse too; the log has said it
            r.log.debug("cannot record the planning problem")

    def _split(self, work: PlanWork) -> tuple[list[Entry], set[str]]:
        """Loose files to plan now, and group folders that are ready as a whole."""
        r = self.runner
        loose: list[Entry] = []
        touched: set[str] = set()
        for e in work.entries:
            m = r.planner.membership(e.relpath)
            if m.kind == "loose":
                loose.append(e)
            elif m.kind in ("member", "marker"):
                assert m.group_dir is not None
                touched.add(m.group_dir)
            else:
                self.log_ignored(e.relpath, m)
        ready = set(work.groups) if work.forced else set()
        # A group settles as a whole: wait while any of its files is still settling.
        for g in touched | (set() if work.forced else work.groups):
            if not r.settling.pending_under(g + "/"):
                ready.add(g)
        return loose, ready

    async def plan(self, work: PlanWork) -> None:
        """Plan `work` now (a pass's). A source error is the pass's (it fails, and
        the groups it re-plans are tried again later); any other failure keeps the
        work in the queue, which retries it."""
        try:
            await self._plan_once(work)
        except SourceError:
            if work.groups or work.sidecars_gone:
                # Re-plans after deletions are not found again by a listing (the other
                # entries did not change): try them again later.
                asyncio.get_running_loop().call_later(self.runner.next_delay(), self.put, work)
            raise
        except Exception as e:
            if not self.runner.ledger.is_unwritable(e):
                await self._failed(work, e)
            else:
                self.put(work)

    async def _plan_once(self, work: PlanWork) -> None:
        r = self.runner
        loose, groups = self._split(work)
        if not loose and not groups and not work.sidecars_gone:
            return
        batch = await asyncio.to_thread(
            r.planner.plan, loose, groups, r.settling.__contains__, work.sidecars_gone
        )
        await record_plans(r, batch)
        r.on_planned()
