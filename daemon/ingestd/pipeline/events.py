"""Change hints of a source with events (Features.events: a local folder's inotify).

Events are only hints: a created or closed file is looked at again (settled), a new
folder is walked, a deletion is judged in a batch once deletions stop arriving, and an
overflow or a dead watcher means a full pass now. The truth is always the next listing.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING

from ingestd.pipeline.work import PlanWork

if TYPE_CHECKING:
    from ingestd.pipeline.runner import WatchRunner

HEALTH_EVERY = 5.0  # seconds between checks that the watcher thread still runs


class EventHints:
    def __init__(self, runner: WatchRunner) -> None:
        self.runner = runner
        self.log = runner.log
        self._subtrees: set[str] = set()
        self._subtree_event = asyncio.Event()
        self._folder_missing = False  # the observer waits for the folder to appear

    async def start_observer(self) -> None:
        loop = asyncio.get_running_loop()
        r = self.runner

        def deliver(kind: str, rel: str, is_dir: bool) -> None:
            loop.call_soon_threadsafe(self.on_event, kind, rel, is_dir)

        def overflow() -> None:
            loop.call_soon_threadsafe(self.on_overflow)

        self._folder_missing = not os.path.isdir(r.source.where)
        if self._folder_missing:
            # Not an error: the watch shows "waiting for folder"; the health loop starts
            # the observer once the folder is there.
            self.log.info("no folder to watch yet; the file watcher starts when it appears")
            return
        try:
            # Installing inotify watches walks the tree: keep that off the event loop.
            await asyncio.to_thread(r.source.start, deliver, overflow)
        except OSError as e:
            self.log.error("cannot watch the source folder; relying on rescans", error=str(e))

    def tasks(self) -> list[asyncio.Task[None]]:
        name = self.runner.watch.name
        return [
            asyncio.create_task(self._subtree_loop(), name=f"subtree:{name}"),
            asyncio.create_task(self._gone_loop(), name=f"gone:{name}"),
            asyncio.create_task(self._health_loop(), name=f"health:{name}"),
        ]

    def on_event(self, kind: str, rel: str, is_dir: bool) -> None:
        r = self.runner
        if is_dir:
            if not r.filter.prunes_dir(rel):
                self._subtrees.add(rel)
                self._subtree_event.set()
            return
        if not r.filter.accepts(rel):
            return
        m = r.planner.membership(rel)
        if m.kind == "marker" and kind != "gone":
            # The writer says the folder is complete: no need to wait for it to settle.
            assert m.group_dir is not None
            r.queue_plan(PlanWork(groups={m.group_dir}, forced=True))
            return
        if m.kind == "ignored":
            r.log_ignored(rel, m)
            return
        if r.settling.hint(rel) and kind != "gone":
            r.files_seen += 1

    def on_overflow(self) -> None:
        self.runner.overflows += 1
        self.log.warning("filesystem events were lost (inotify queue overflow); rescanning")
        self.runner.request_rescan("overflow")

    async def _subtree_loop(self) -> None:
        while True:
            await self._subtree_event.wait()
            self._subtree_event.clear()
            subtrees, self._subtrees = self._subtrees, set()
            # A parent's walk covers its children.
            for sub in sorted(subtrees):
                if any(sub.startswith(p + "/") for p in subtrees if p != sub):
                    continue
                try:
                    await self.runner.scan(sub)
                except Exception:
                    self.log.exception("folder scan failed", folder=sub)

    async def _gone_loop(self) -> None:
        # Deletions seen through events are judged in batches: a batch closes once no
        # deletion arrived for `settle`, so an `rm -rf` is one batch for the guard.
        r = self.runner
        quiet = max(r.watch.settle, 0.5)
        while True:
            await asyncio.sleep(quiet / 2)
            if r.gone and time.monotonic() - r.gone_at >= quiet:
                try:
                    await r.apply_gone(full_pass=False)
                except Exception:
                    self.log.exception("applying deletions failed; the next rescan tries again")

    async def _health_loop(self) -> None:
        r = self.runner
        while True:
            await asyncio.sleep(HEALTH_EVERY)
            if not r.source.alive() and os.path.isdir(r.source.where):
                if self._folder_missing:
                    self.log.info("the folder appeared; watching it and scanning")
                else:
                    self.log.warning("file watcher stopped; restarting it and rescanning")
                await asyncio.to_thread(r.source.stop)
                await self.start_observer()
                r.request_rescan()
