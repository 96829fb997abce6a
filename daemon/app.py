"""The runtime: builds watches and the sync pool from the config, supervises them, and
shuts down cleanly. `run` is the daemon; `sync_once` and `dry_run` are one-pass forms."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from daemon.config import Config, DarwinBackend, HttpBackend, LabelboxBackend, NucleusBackend
from daemon.ledger import DELETED, ITEM, AsyncLedger
from daemon.model import Entry
from daemon.service import PidLock, install_signals
from daemon.sinks.base import Sink
from daemon.sinks.local import LocalSink
from daemon.sync import Outcome, SyncPool, WatchSide, side_for
from daemon.watch import WatchRunner, make_runner

log = structlog.get_logger("ingestd")

SHUTDOWN_GRACE = 6.0  # in-flight uploads get this long; the whole stop stays under 10 s
ONE_PASS_MAX_ATTEMPTS = 5


def build_sink(config: Config) -> Sink:
    backend = config.backend
    if isinstance(backend, HttpBackend):
        from daemon.sinks.http import HttpSink

        return HttpSink(backend.url, backend.token(), workers=config.workers)
    if isinstance(backend, DarwinBackend):
        from daemon.sinks.darwin import DarwinSink

        return DarwinSink(backend, workers=config.workers)
    if isinstance(backend, LabelboxBackend):
        from daemon.sinks.labelbox import LabelboxSink

        return LabelboxSink(backend, workers=config.workers)
    if isinstance(backend, NucleusBackend):
        from daemon.sinks.nucleus import NucleusSink

        return NucleusSink(backend, workers=config.workers)
    return LocalSink(backend.path)


def deid_key(config: Config) -> bytes | None:
    """One key per state dir: the same UID always maps to the same new UID, across runs
    and watches, so series stay consistent."""
    if not any(w.dicom.deidentify for w in config.watches):
        return None
    from daemon.media.dicom import load_or_create_key

    return load_or_create_key(str(config.state_dir))


def _sides(config: Config, key: bytes | None) -> dict[str, WatchSide]:
    return {w.name: side_for(w, key) for w in config.watches}


class App:
    def __init__(self, config: Config, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.ledger = AsyncLedger(config.state_dir)
        self.sink: Sink | None = None
        self.pool: SyncPool | None = None
        self.runners: dict[str, WatchRunner] = {}
        self._stop = asyncio.Event()

    def _wake_pool(self) -> None:
        if self.pool is not None:
            self.pool.wake()

    def _source_changed(self, watch: str, relpaths: list[str]) -> None:
        runner = self.runners.get(watch)
        if runner is not None:
            runner.hint_changed(relpaths)

    async def _open(self, *, observe: bool, on_outcome: Callable[[Outcome], None] | None) -> None:
        await self.ledger.open()
        self.sink = build_sink(self.config)
        key = await asyncio.to_thread(deid_key, self.config)
        spool = self.config.state_dir / "spool"
        # Derived media of a previous run that ended mid-item: rebuilt when needed.
        await asyncio.to_thread(shutil.rmtree, spool, True)
        self.pool = SyncPool(
            self.ledger,
            self.sink,
            _sides(self.config, key),
            self.config.workers,
            on_source_changed=self._source_changed,
            on_outcome=on_outcome,
            spool_root=str(self.config.state_dir),
        )
        for w in self.config.watches:
            self.runners[w.name] = make_runner(
                w, self.ledger, self._wake_pool, observe=observe, deid_key=key
            )

    async def _close(self) -> None:
        for runner in self.runners.values():
            await runner.stop()
        if self.pool is not None:
            await self.pool.stop(SHUTDOWN_GRACE)
        if self.sink is not None:
            await self.sink.close()
        await self.ledger.close()

    # -- the daemon -------------------------------------------------------------------------

    async def run(self) -> int:
        lock = PidLock(self.config.state_dir)
        lock.acquire()
        try:
            loop = asyncio.get_running_loop()
            install_signals(loop, self._stop.set, self._rescan_all)
            await self._open(observe=True, on_outcome=None)
            assert self.pool is not None
            pool_task = asyncio.create_task(self.pool.run(), name="sync-pool")
            log.info(
                "ingestd started",
                config=str(self.config_path),
                watches=[w.name for w in self.config.watches],
                workers=self.config.workers,
            )
            if not self.config.watches:
                log.warning("the config has no watches; nothing to do")
            starts = [asyncio.create_task(r.start()) for r in self.runners.values()]
            stop_task = asyncio.create_task(self._stop.wait())
            await asyncio.wait([stop_task, *starts], return_when=asyncio.FIRST_COMPLETED)
            for t in starts:
                if t.done() and t.exception() is not None:
                    log.error("watch failed to start", error=str(t.exception()))
            await self._stop.wait()
            log.info("stopping: finishing in-flight uploads")
            for t in starts:
                t.cancel()
            await self._close()
            pool_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pool_task
            log.info("stopped")
            return 0
        finally:
            lock.release()

    def _rescan_all(self) -> None:
        log.info("rescan requested")
        for runner in self.runners.values():
            runner.request_rescan()

    # -- one pass ---------------------------------------------------------------------------

    async def sync_once(self, progress: Progress) -> int:
        lock = PidLock(self.config.state_dir)
        lock.acquire()
        try:
            await self._open(observe=False, on_outcome=progress.outcome)
            assert self.pool is not None
            pool_task = asyncio.create_task(self.pool.run(poll=0.2))
            try:
                await asyncio.gather(*(r.start() for r in self.runners.values()))
                while any(r.busy for r in self.runners.values()):
                    await asyncio.sleep(0.05)
                names = [w.name for w in self.config.watches]
                progress.begin(await self.ledger.call(_pending_count, self.ledger, names))
                while True:
                    pending, stuck = await self.ledger.call(_pending_state, self.ledger, names)
                    progress.tick()
                    if self.pool.inflight == 0 and (pending == 0 or pending == stuck):
                        break
                    await asyncio.sleep(0.05)
                counts = await self.ledger.call(self.ledger.sync.counts)
            finally:
                await self._close()
                pool_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pool_task
            progress.end()
            failed = sum(counts[n].failed for n in names if n in counts)
            left = sum(counts[n].pending for n in names if n in counts)
            for n in names:
                c = counts.get(n)
                if c is not None:
                    print(
                        f"{n}: {c.synced} synced, {c.pending} pending, {c.failed} failed",
                        file=sys.stderr,
                    )
            return 1 if failed or left else 0
        finally:
            lock.release()

    async def dry_run(self) -> list[str]:
        """What a sync would create, update or delete; changes nothing."""
        ledger_file = self.config.state_dir / "ledger.sqlite"
        with tempfile.TemporaryDirectory(prefix="ingestd-dry-") as tmp:
            state = self.config.state_dir if ledger_file.exists() else Path(tmp)
            self.ledger = AsyncLedger(state)
            await self.ledger.open()
            lines: list[str] = []
            try:
                for w in self.config.watches:
                    runner = WatchRunner(w, self.ledger, lambda: None, observe=False)
                    lines += await _dry_run_watch(runner, self.ledger)
            finally:
                await self.ledger.close()
            return lines


async def _dry_run_watch(runner: WatchRunner, ledger: AsyncLedger) -> list[str]:
    w = runner.watch
    found: list[Entry] = []
    result = await asyncio.to_thread(runner._scan_blocking, "", found.extend)
    if result.root_missing:
        return [f"error   {w.name}: source folder {w.source} is missing"]
    loose: list[Entry] = []
    groups: set[str] = set()
    for e in found:
        m = runner.planner.membership(e.relpath)
        if m.kind == "loose":
            loose.append(e)
        elif m.kind in ("member", "marker") and m.group_dir is not None:
            groups.add(m.group_dir)
    batch = await asyncio.to_thread(runner.planner.plan, loose, groups)
    lines = []
    for p in batch.planned:
        if p.plan is None:
            if p.error:
                lines.append(f"fail    {w.name} {p.source_id}: {p.error}")
            continue
        row = await ledger.call(ledger.sync.item_row, w.name, p.plan.source_id)
        if row is None or row["status"] == DELETED or row["synced_manifest"] is None:
            lines.append(f"create  {w.dataset} {p.plan.key}")
        elif row["desired_fp"] != p.plan.fingerprint or row["status"] == "pending":
            lines.append(f"update  {w.dataset} {p.plan.key}")
    known = await ledger.call(ledger.sync.known_items, w.name, sorted(result.gone))
    total = await ledger.call(ledger.sync.live_count, w.name)
    gone_items = [rel for rel, role in known if role == ITEM]
    if known and not w.max_delete.allows(len(known), total):
        lines.append(
            f"refuse  {w.name}: would delete {len(known)} of {total} items (max_delete {w.max_delete})"
        )
    else:
        for rel in gone_items:
            row = await ledger.call(ledger.sync.item_row, w.name, rel)
            key = row["key"] if row else rel
            verb = "delete " if w.on_delete == "delete" else "forget "
            lines.append(f"{verb} {w.dataset} {key}")
    return lines


def _pending_count(ledger: AsyncLedger, watches: list[str]) -> int:
    q = ",".join("?" * len(watches))
    (n,) = ledger.sync.conn.execute(
        f"SELECT count(*) FROM items WHERE status='pending' AND watch IN ({q})", watches
    ).fetchone()
    return int(n)


def _pending_state(ledger: AsyncLedger, watches: list[str]) -> tuple[int, int]:
    """(pending items, pending items that used up the one-pass attempts)."""
    q = ",".join("?" * len(watches))
    n, stuck = ledger.sync.conn.execute(
        f"SELECT count(*), coalesce(sum(attempts >= ?), 0) FROM items"
        f" WHERE status='pending' AND watch IN ({q})",
        (ONE_PASS_MAX_ATTEMPTS, *watches),
    ).fetchone()
    return int(n), int(stuck)


@dataclass
class Progress:
    """Progress of a one-pass sync: a rich bar on a TTY, plain lines otherwise."""

    tty: bool
    total: int = 0
    done: int = 0
    failed: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    _bar: object | None = None
    _task: object | None = None
    _last_line: float = 0.0

    def begin(self, total: int) -> None:
        self.total = total
        self.started = time.monotonic()
        if self.tty and total:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                MofNCompleteColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            bar = RichProgress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            bar.start()
            self._bar = bar
            self._task = bar.add_task("syncing", total=total)

    def outcome(self, o: Outcome) -> None:
        if o.result in ("synced", "unchanged", "deleted", "failed"):
            self.done += 1
        if o.result == "failed":
            self.failed += 1
        self.bytes += o.bytes
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)  # type: ignore[attr-defined]

    def tick(self) -> None:
        now = time.monotonic()
        if self._bar is None and self.total and now - self._last_line >= 2.0:
            self._last_line = now
            rate = self.done / max(now - self.started, 1e-6)
            print(
                f"synced {self.done}/{self.total} items, {self.bytes} bytes, {rate:.0f} items/s",
                file=sys.stderr,
            )

    def end(self) -> None:
        if self._bar is not None:
            self._bar.stop()  # type: ignore[attr-defined]
