"""One running watch: source hints → settle → plan → ledger.

The runner owns a watch's source (observer + walks), its settler, the planning of
settled files and the judgement of deletions (with the mass-deletion guard). It only
writes to the ledger; the shared sync pool takes it from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from ingestd.config import Watch
from ingestd.core.model import Entry
from ingestd.ledger import (
    MEMBER,
    SIDECAR,
    AsyncLedger,
    Ledger,
    connect,
    op_plan_settled,
    op_watch_settings,
)
from ingestd.pipeline.planner import PlanBatch, Planner, WatchFilter, failed_fingerprint
from ingestd.plan.groups import GroupMembership
from ingestd.plan.metadata import type_conflicts, value_type
from ingestd.sources.local import LocalSource, ScanResult
from ingestd.sources.settle import Settler, stat_many

log = structlog.get_logger("ingestd.watch")


@dataclass(slots=True)
class _Work:
    """A unit of planning: settled files, group folders to (re)plan, gone sidecars."""

    entries: list[Entry] = field(default_factory=list)
    groups: set[str] = field(default_factory=set)
    forced: bool = False  # plan the groups even if files in them are still settling
    sidecars_gone: list[str] = field(default_factory=list)


class WatchRunner:
    def __init__(
        self,
        watch: Watch,
        ledger: AsyncLedger,
        on_planned: Callable[[], None],
        *,
        observe: bool = True,
        deid_key: bytes | None = None,
    ) -> None:
        self.watch = watch
        self.ledger = ledger
        self.root = str(watch.source)
        self.filter = WatchFilter(watch)
        self.planner = Planner(watch, self.filter, deid_key)
        self.source = LocalSource(watch.source, self.filter, follow_symlinks=watch.follow_symlinks)
        self.settler = Settler(
            watch.settle,
            lambda rels: stat_many(self.root, rels, watch.follow_symlinks),
            self._on_ready,
            self._on_gone,
            on_overflow=self._settler_overflow,
        )
        self.log = log.bind(watch=watch.name)
        self._on_planned = on_planned
        self._observe = observe
        self._plan_queue: asyncio.Queue[_Work] = asyncio.Queue()
        self._ignored_logged: set[str] = set()
        self._planning = 0
        self._gone: set[str] = set()
        self._gone_at = 0.0
        self._rescan = asyncio.Event()
        self._subtrees: set[str] = set()
        self._subtree_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.scans = 0
        self.overflows = 0
        self.files_seen = 0  # files noticed new or changed (each write counted once)
        # The settings changed since the items were planned: full passes hand on every
        # file, not only changed ones, until one has been planned through.
        self.replan = False
        self._settler_overflows = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Install the observer first, then scan, so nothing created meanwhile is missed."""
        if self._observe:
            # Installing inotify watches walks the tree: keep that off the event loop.
            await self._start_observer()
        self._tasks = [
            asyncio.create_task(self.settler.run(), name=f"settle:{self.watch.name}"),
            asyncio.create_task(self._plan_loop(), name=f"plan:{self.watch.name}"),
        ]
        await self.check_settings()
        await self.scan("")
        if self._observe:
            self._tasks += [
                asyncio.create_task(self._rescan_loop(), name=f"rescan:{self.watch.name}"),
                asyncio.create_task(self._subtree_loop(), name=f"subtree:{self.watch.name}"),
                asyncio.create_task(self._gone_loop(), name=f"gone:{self.watch.name}"),
                asyncio.create_task(self._health_loop(), name=f"health:{self.watch.name}"),
            ]

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
            self._on_planned()
        if replan:
            self.log.info("item settings changed; planning every file again")
            self.replan = True

    def _full_pass_planned_all(self) -> None:
        """A full pass handed on every file: once they are all planned (and nothing was
        dropped on the way), record the settings they were planned with."""
        overflows = self._settler_overflows

        async def finish() -> None:
            while self.busy:
                await asyncio.sleep(0.05)
            if self._settler_overflows != overflows:
                return  # files were dropped: the rescan this asked for hands on all again
            await self.ledger.write(op_plan_settled(self.watch.name, self.watch.plan_identity()))
            self.replan = False
            self.log.info("every file planned with the new item settings")

        self._tasks.append(asyncio.create_task(finish(), name=f"replan:{self.watch.name}"))

    def _settler_overflow(self) -> None:
        self._settler_overflows += 1
        self.request_rescan()

    async def _start_observer(self) -> None:
        loop = asyncio.get_running_loop()

        def deliver(kind: str, rel: str, is_dir: bool) -> None:
            loop.call_soon_threadsafe(self._on_event, kind, rel, is_dir)

        def overflow() -> None:
            loop.call_soon_threadsafe(self._on_overflow)

        try:
            await asyncio.to_thread(self.source.start, deliver, overflow)
        except OSError as e:
            self.log.error("cannot watch the source folder; relying on rescans", error=str(e))

    async def stop(self) -> None:
        self.source.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def request_rescan(self) -> None:
        self._rescan.set()

    @property
    def busy(self) -> bool:
        """Files are still settling or being planned (one-pass sync waits for this)."""
        return bool(len(self.settler) or self._planning or not self._plan_queue.empty())

    # -- hints ----------------------------------------------------------------------------

    def _on_event(self, kind: str, rel: str, is_dir: bool) -> None:
        if is_dir:
            if not self.filter.prunes_dir(rel):
                self._subtrees.add(rel)
                self._subtree_event.set()
            return
        if not self.filter.accepts(rel):
            return
        m = self.planner.membership(rel)
        if m.kind == "marker" and kind != "gone":
            # The writer says the folder is complete: no need to wait for it to settle.
            assert m.group_dir is not None
            self._plan_queue.put_nowait(_Work(groups={m.group_dir}, forced=True))
            return
        if m.kind == "ignored":
            self._log_ignored(rel, m)
            return
        if self.settler.hint(rel) and kind != "gone":
            self.files_seen += 1

    def _on_overflow(self) -> None:
        self.overflows += 1
        self.log.warning("filesystem events were lost (inotify queue overflow); rescanning")
        self.request_rescan()

    def hint_changed(self, relpaths: Sequence[str]) -> None:
        """The sync step saw these files change under it: look again."""
        for rel in relpaths:
            self.settler.hint(rel)

    # -- scanning -------------------------------------------------------------------------

    async def scan(self, subdir: str) -> ScanResult:
        loop = asyncio.get_running_loop()
        started = time.monotonic()

        def emit(chunk: list[Entry]) -> None:
            loop.call_soon_threadsafe(self._hint_scanned, chunk)

        replan = self.replan and not subdir
        result = await asyncio.to_thread(self._scan_blocking, subdir, emit, replan)
        self.scans += 1
        now = time.time()
        if result.root_missing:
            problem = (
                f"source folder {self.root} is missing (unmounted disk? deleted?); "
                "nothing is deleted while it is missing, and it is checked again on every rescan"
            )
            if await self.ledger.write(Ledger.op_set_problem(self.watch.name, problem, now)):
                self.log.error("source folder missing", folder=self.root)
            return result
        for rel in result.errors:
            self.log.warning("cannot read folder or file during scan", path=rel)
        self._gone.update(result.gone)
        if not subdir:
            # A full pass judges all its deletions together, as one batch.
            await self._apply_gone(full_pass=True)
            if replan:
                # Folders it could not read are not planned again now; recording anyway
                # keeps a lasting unreadable folder from re-planning everything each pass.
                self._full_pass_planned_all()
        else:
            self._gone_at = time.monotonic()
        self.log.debug(
            "scan done",
            subdir=subdir or "/",
            files=result.files,
            changed=result.changed,
            gone=len(result.gone),
            seconds=round(time.monotonic() - started, 3),
        )
        return result

    def _scan_blocking(
        self, subdir: str, emit: Callable[[list[Entry]], None], emit_all: bool = False
    ) -> ScanResult:
        conn = connect(self.ledger.sync.path, readonly=True)
        name = self.watch.name
        try:

            def known_in_dir(reldir: str) -> dict[str, tuple[int, int]]:
                rows = conn.execute(
                    "SELECT relpath, size, mtime_ns FROM entries WHERE watch=? AND parent=?",
                    (name, reldir),
                ).fetchall()
                return {r: (sz, m) for r, sz, m in rows}

            def known_dirs(sub: str) -> set[str]:
                if not sub:
                    q = conn.execute("SELECT DISTINCT parent FROM entries WHERE watch=?", (name,))
                else:
                    q = conn.execute(
                        "SELECT DISTINCT parent FROM entries WHERE watch=? AND"
                        " (parent=? OR (parent >= ? AND parent < ?))",
                        (name, sub, sub + "/", sub + "0"),
                    )
                return {r for (r,) in q}

            return self.source.scan(subdir, known_in_dir, known_dirs, emit, emit_all=emit_all)
        finally:
            conn.close()

    def _hint_scanned(self, chunk: list[Entry]) -> None:
        for e in chunk:
            self.files_seen += self.settler.hint(e.relpath, stat=(e.size, e.mtime_ns))

    async def _rescan_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rescan.wait(), self.watch.rescan)
            self._rescan.clear()
            try:
                await self.scan("")
            except Exception:
                self.log.exception("rescan failed; trying again at the next one")

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
                    await self.scan(sub)
                except Exception:
                    self.log.exception("folder scan failed", folder=sub)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(5)
            if not self.source.alive() and os.path.isdir(self.root):
                self.log.warning("file watcher stopped; restarting it and rescanning")
                await asyncio.to_thread(self.source.stop)
                await self._start_observer()
                self.request_rescan()

    # -- planning -------------------------------------------------------------------------

    def _on_ready(self, entries: list[Entry]) -> None:
        self._plan_queue.put_nowait(_Work(entries=entries))

    def _log_ignored(self, rel: str, m: GroupMembership) -> None:
        key = m.group_dir or ""
        if key not in self._ignored_logged and len(self._ignored_logged) < 10_000:
            self._ignored_logged.add(key)
            self.log.debug("file below a group folder's first level ignored", path=rel)

    async def _plan_loop(self) -> None:
        while True:
            work = await self._plan_queue.get()
            self._planning += 1
            try:
                await self._plan(work)
            except Exception:
                self.log.exception("planning failed; the next rescan tries again")
            finally:
                self._planning -= 1

    def _split(self, work: _Work) -> tuple[list[Entry], set[str]]:
        """Loose files to plan now, and group folders that are ready as a whole."""
        loose: list[Entry] = []
        touched: set[str] = set()
        for e in work.entries:
            m = self.planner.membership(e.relpath)
            if m.kind == "loose":
                loose.append(e)
            elif m.kind in ("member", "marker"):
                assert m.group_dir is not None
                touched.add(m.group_dir)
            else:
                self._log_ignored(e.relpath, m)
        ready = set(work.groups) if work.forced else set()
        # A group settles as a whole: wait while any of its files is still settling.
        for g in touched | (set() if work.forced else work.groups):
            if not self.settler.pending_under(g + "/"):
                ready.add(g)
        return loose, ready

    async def _plan(self, work: _Work) -> None:
        loose, groups = self._split(work)
        if not loose and not groups and not work.sidecars_gone:
            return
        batch = await asyncio.to_thread(
            self.planner.plan, loose, groups, self.settler.__contains__, work.sidecars_gone
        )
        await self.record(batch)

    async def record(self, batch: PlanBatch) -> None:
        """Write a planning result to the ledger and log the items that failed."""
        now = time.time()
        w = self.watch
        ops = []
        for p in batch.planned:
            if p.plan is not None:
                ops.append(
                    Ledger.op_apply_plan(
                        w.name, w.dataset, p.plan, p.entries, type_conflicts, value_type, now
                    )
                )
            elif p.error is not None:
                fp = failed_fingerprint(p.entries)
                ops.append(
                    Ledger.op_plan_failed(
                        w.name, w.dataset, p.source_id, p.key, fp, p.entries, p.error, now
                    )
                )
            else:
                ops.append(Ledger.op_put_entries(w.name, p.entries))
        if batch.entries_only:
            ops.append(Ledger.op_put_entries(w.name, batch.entries_only))
        for group_dir, source_ids in batch.groups.items():
            existing = await self.ledger.call(self.ledger.sync.group_items, w.name, group_dir)
            stale = [sid for sid in existing if sid not in source_ids]
            if stale:
                ops.append(Ledger.op_drop_items(w.name, stale, w.on_delete, now))
        results = await self.ledger.write_many(ops)
        for p, result in zip(batch.planned, results, strict=False):
            if result == "failed":
                reason = p.error
                if reason is None:
                    row = await self.ledger.call(self.ledger.sync.item_row, w.name, p.source_id)
                    reason = row["last_error"] if row else None
                self.log.error("item failed", item=p.key, source=p.source_id, reason=reason)
        self._on_planned()

    # -- deletions ------------------------------------------------------------------------

    def _on_gone(self, relpaths: list[str]) -> None:
        self._gone.update(relpaths)
        self._gone_at = time.monotonic()

    async def _gone_loop(self) -> None:
        # Deletions seen through events are judged in batches: a batch closes once no
        # deletion arrived for `settle`, so an `rm -rf` is one batch for the guard.
        quiet = max(self.watch.settle, 0.5)
        while True:
            await asyncio.sleep(quiet / 2)
            if self._gone and time.monotonic() - self._gone_at >= quiet:
                try:
                    await self._apply_gone(full_pass=False)
                except Exception:
                    self.log.exception("applying deletions failed; the next rescan tries again")

    async def _apply_gone(self, *, full_pass: bool) -> None:
        w = self.watch
        gone, self._gone = sorted(self._gone), set()
        now = time.time()
        known = await self.ledger.call(self.ledger.sync.known_items, w.name, gone)
        # Items affected: single files, plus each group folder losing files.
        affected = {rel for rel, role in known if role != MEMBER}
        affected |= {
            self.planner.membership(rel).group_dir or rel for rel, role in known if role == MEMBER
        }
        total = await self.ledger.call(self.ledger.sync.live_count, w.name)
        if affected and not w.max_delete.allows(len(affected), total):
            share = len(affected) / total if total else 1.0
            problem = (
                f"refused to delete {len(affected)} of {total} items ({share:.0%}) at once: more "
                f"than max_delete {w.max_delete}. Is the source folder mounted and complete? If "
                "the deletion is intended, raise max_delete for this watch and restart"
            )
            if await self.ledger.write(Ledger.op_set_problem(w.name, problem, now)):
                self.log.error("mass deletion refused", deletions=len(affected), items=total)
            return
        if gone:
            replan = await self.ledger.write(Ledger.op_gone(w.name, gone, w.on_delete, now))
            if affected:
                self.log.info("source files gone", items=len(affected), on_delete=w.on_delete)
            groups = {g for rel in replan[MEMBER] if (g := self.planner.membership(rel).group_dir)}
            if groups or replan[SIDECAR]:
                self._plan_queue.put_nowait(
                    _Work(groups=groups, forced=True, sidecars_gone=replan[SIDECAR])
                )
            self._on_planned()
        if full_pass and await self.ledger.write(Ledger.op_set_problem(w.name, None, now)):
            self.log.info("watch healthy again")


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
    observe: bool = True,
    deid_key: bytes | None = None,
) -> WatchRunner:
    """The runner for one configured watch: a folder's, or a bucket prefix's poller."""
    if watch.bucket is not None:
        from ingestd.pipeline.bucket_runner import BucketWatchRunner  # imports this module

        return BucketWatchRunner(watch, ledger, on_planned, observe=observe, deid_key=deid_key)
    return WatchRunner(watch, ledger, on_planned, observe=observe, deid_key=deid_key)
