"""A watch's planning: work queued by listings, events and deletions, planned one unit at
a time in a thread (the planner reads headers and sidecars), recorded in the ledger."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ingestd.core.model import Entry
from ingestd.core.source import SourceError
from ingestd.pipeline.recording import record_plans
from ingestd.pipeline.work import PlanWork
from ingestd.plan.groups import GroupMembership

if TYPE_CHECKING:
    from ingestd.pipeline.runner import WatchRunner

IGNORED_LOGGED = 10_000  # group folders whose ignored files were logged (bounded memory)


class PlanQueue:
    def __init__(self, runner: WatchRunner) -> None:
        self.runner = runner
        self._queue: asyncio.Queue[PlanWork] = asyncio.Queue()
        self._ignored_logged: set[str] = set()
        self._planning = 0

    @property
    def busy(self) -> bool:
        return bool(self._planning or not self._queue.empty())

    def put(self, work: PlanWork) -> None:
        self._queue.put_nowait(work)

    def log_ignored(self, rel: str, m: GroupMembership) -> None:
        key = m.group_dir or ""
        if key not in self._ignored_logged and len(self._ignored_logged) < IGNORED_LOGGED:
            self._ignored_logged.add(key)
            self.runner.log.debug("file below a group folder's first level ignored", path=rel)

    async def run(self) -> None:
        while True:
            work = await self._queue.get()
            self._planning += 1
            try:
                await self.plan(work)
            except Exception:
                self.runner.log.exception("planning failed; the next rescan tries again")
            finally:
                self._planning -= 1

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
        r = self.runner
        loose, groups = self._split(work)
        if not loose and not groups and not work.sidecars_gone:
            return
        try:
            batch = await asyncio.to_thread(
                r.planner.plan, loose, groups, r.settling.__contains__, work.sidecars_gone
            )
        except SourceError:
            if work.groups or work.sidecars_gone:
                # Re-plans after deletions are not found again by a listing (the other
                # entries did not change): try them again later.
                asyncio.get_running_loop().call_later(r.next_delay(), self.put, work)
            raise
        await record_plans(r, batch)
        r.on_planned()
