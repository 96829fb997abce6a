"""The runtime: builds watches and the sync pool from the config, supervises them, and
shuts down cleanly. `run` is the daemon; `sync_once` and `dry_run` are one-pass forms."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from ingestd.config import (
    Config,
    ConfigDiff,
    ConfigError,
    DarwinBackend,
    HttpBackend,
    LabelboxBackend,
    NucleusBackend,
    Problem,
    backend_identity,
    diff_config,
    load_config,
)
from ingestd.ledger import AsyncLedger, op_switch_backend
from ingestd.observe.status import status_data, write_rejected
from ingestd.pipeline.dry_run import dry_run_watch
from ingestd.pipeline.runner import WatchRunner, make_runner, runner_stats
from ingestd.pipeline.sync import Outcome, SyncPool, WatchSide, side_for
from ingestd.runtime import logs
from ingestd.runtime.config_watch import ConfigWatcher, content_digest
from ingestd.runtime.progress import Progress
from ingestd.runtime.service import Notifier, PidLock, install_signals, watchdog_loop
from ingestd.sinks.base import Sink
from ingestd.sinks.local import LocalSink

if TYPE_CHECKING:
    from ingestd.observe.control import ControlServer

log = structlog.get_logger("ingestd")

STATUS_EVERY = 5.0  # seconds between systemd STATUS= updates
SHUTDOWN_GRACE = 6.0  # in-flight uploads get this long; the whole stop stays under 10 s
ONE_PASS_MAX_ATTEMPTS = 5


def build_sink(config: Config) -> Sink:
    backend = config.backend
    if isinstance(backend, HttpBackend):
        from ingestd.sinks.http import HttpSink

        return HttpSink(backend.url, backend.token(), workers=config.workers)
    if isinstance(backend, DarwinBackend):
        from ingestd.sinks.darwin import DarwinSink

        return DarwinSink(backend, workers=config.workers)
    if isinstance(backend, LabelboxBackend):
        from ingestd.sinks.labelbox import LabelboxSink

        return LabelboxSink(backend, workers=config.workers)
    if isinstance(backend, NucleusBackend):
        from ingestd.sinks.nucleus import NucleusSink

        return NucleusSink(backend, workers=config.workers)
    return LocalSink(backend.path)


def deid_key(config: Config) -> bytes | None:
    """One key per state dir: the same UID always maps to the same new UID, across runs
    and watches, so series stay consistent."""
    if not any(w.dicom.deidentify for w in config.watches):
        return None
    from ingestd.media.dicom import load_or_create_key

    return load_or_create_key(str(config.state_dir))


def _sides(config: Config, key: bytes | None) -> dict[str, WatchSide]:
    return {w.name: side_for(w, key) for w in config.watches}


class App:
    """The running daemon (and the one-pass forms). For the control endpoint it is the
    `ControlTarget`: status, retry, counters and sync outcomes."""

    def __init__(self, config: Config, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.ledger = AsyncLedger(config.state_dir)
        self.sink: Sink | None = None
        self.pool: SyncPool | None = None
        self.runners: dict[str, WatchRunner] = {}
        self.rejected: list[Problem] = []  # problems of the last refused config edit
        self.reloads = 0
        self._stop = asyncio.Event()
        self._deid_key: bytes | None = None
        self._starts: dict[str, asyncio.Task[None]] = {}
        self._outcome_listeners: list[Callable[[Outcome], None]] = []
        self._reload_lock = asyncio.Lock()
        self._reload_wanted = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.notifier = Notifier()
        self.control: ControlServer | None = None
        self._pool_task: asyncio.Task[None] | None = None
        self.config_watcher: ConfigWatcher | None = None

    def _wake_pool(self) -> None:
        if self.pool is not None:
            self.pool.wake()

    def _source_changed(self, watch: str, relpaths: list[str]) -> None:
        runner = self.runners.get(watch)
        if runner is not None:
            runner.hint_changed(relpaths)

    def _outcome(self, outcome: Outcome) -> None:
        for fn in self._outcome_listeners:
            try:
                fn(outcome)
            except Exception:  # an observer must never break syncing
                log.exception("outcome listener failed")

    async def _open(self, *, observe: bool, on_outcome: Callable[[Outcome], None] | None) -> None:
        await self.ledger.open()
        if on_outcome is not None:
            self._outcome_listeners.append(on_outcome)
        self.sink = build_sink(self.config)
        await self._note_backend()
        self._deid_key = key = await asyncio.to_thread(deid_key, self.config)
        spool = self.config.state_dir / "spool"
        # Derived media of a previous run that ended mid-item: rebuilt when needed.
        await asyncio.to_thread(shutil.rmtree, spool, True)
        self.pool = SyncPool(
            self.ledger,
            self.sink,
            _sides(self.config, key),
            self.config.workers,
            on_source_changed=self._source_changed,
            on_outcome=self._outcome,
            spool_root=str(self.config.state_dir),
        )
        for w in self.config.watches:
            self.runners[w.name] = make_runner(
                w, self.ledger, self._wake_pool, observe=observe, deid_key=key
            )

    async def _note_backend(self) -> None:
        """Items synced to another backend than the configured one are sent again."""
        n = await self.ledger.write(op_switch_backend(backend_identity(self.config), time.time()))
        if n:
            log.warning(
                "the backend changed since items were synced; sending them to the new one",
                items=n,
            )
            self._wake_pool()

    async def _close(self) -> None:
        for task in self._starts.values():
            task.cancel()
        for runner in self.runners.values():
            await runner.stop()
        if self.pool is not None:
            await self.pool.stop(SHUTDOWN_GRACE)
        if self.sink is not None:
            await self.sink.close()
        await self.ledger.close()

    def _start_runner(self, name: str) -> None:
        runner = self.runners[name]

        async def start() -> None:
            try:
                await runner.start()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("watch failed to start", watch=name, error=str(e))

        self._starts[name] = asyncio.create_task(start(), name=f"start:{name}")

    async def _stop_runner(self, name: str) -> None:
        task = self._starts.pop(name, None)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        runner = self.runners.pop(name, None)
        if runner is not None:
            await runner.stop()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- the daemon -------------------------------------------------------------------------

    async def run(self) -> int:
        lock = PidLock(self.config.state_dir)
        lock.acquire()
        try:
            loop = asyncio.get_running_loop()
            install_signals(loop, self._stop.set, self._rescan_all, self.request_reload)
            await self._open(observe=True, on_outcome=None)
            assert self.pool is not None
            self._pool_task = pool_task = asyncio.create_task(self.pool.run(), name="sync-pool")
            await asyncio.to_thread(write_rejected, self.config.state_dir, [])
            await self._start_control()
            log.info(
                "ingestd started",
                config=str(self.config_path),
                watches=[w.name for w in self.config.watches],
                workers=self.config.workers,
            )
            if not self.config.watches:
                log.warning("the config has no watches; nothing to do")
            for name in self.runners:
                self._start_runner(name)
            await asyncio.sleep(0)  # the first scans are under way
            self.notifier.ready()
            await self._update_status()
            await self._watch_config_file()
            self._spawn(self._reload_loop(), "reload")
            self._spawn(self._status_loop(), "notify-status")
            self._spawn(watchdog_loop(self.notifier, self._healthy), "watchdog")
            await self._stop.wait()
            self.notifier.stopping()
            log.info("stopping: finishing in-flight uploads")
            for task in list(self._background):
                task.cancel()
            if self.config_watcher is not None:
                await self.config_watcher.stop()
            if self.control is not None:
                await self.control.stop()
            await self._close()
            pool_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pool_task
            log.info("stopped")
            return 0
        finally:
            lock.release()

    def _healthy(self) -> bool:
        """Worth a watchdog ping: not stopping, and the sync pool is still running."""
        return (
            not self._stop.is_set() and self._pool_task is not None and not self._pool_task.done()
        )

    def _rescan_all(self) -> None:
        log.info("rescan requested")
        for runner in self.runners.values():
            runner.request_rescan()

    async def _start_control(self) -> None:
        listen = self.config.status.listen
        if listen is None:
            self.control = None
            return
        try:  # TEMPORARY until the control server lands
            from ingestd.observe.control import ControlServer
        except ImportError:
            return
        self.control = ControlServer(self, listen, self.config.state_dir)
        await self.control.start()

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY)
            with contextlib.suppress(Exception):
                await self._update_status()

    async def _update_status(self) -> None:
        counts = await self.ledger.call(self.ledger.sync.counts)
        names = list(self.runners)
        pending = sum(counts[n].pending for n in names if n in counts)
        failed = sum(counts[n].failed for n in names if n in counts)
        self.notifier.status(f"{len(names)} watches, {pending} pending, {failed} failed")

    # -- live reload ------------------------------------------------------------------------

    def request_reload(self, reason: str = "SIGHUP") -> None:
        """SIGHUP (also `systemctl reload`, `ingestd reload`) or an edit of the file."""
        log.info("reload requested", reason=reason, config=str(self.config_path))
        self._reload_wanted.set()

    async def _watch_config_file(self) -> None:
        if self.config.watch_config and self.config_watcher is None:
            self.config_watcher = ConfigWatcher(
                self.config_path, lambda: self.request_reload("config file edited")
            )
            await self.config_watcher.start()
        elif not self.config.watch_config and self.config_watcher is not None:
            await self.config_watcher.stop()
            self.config_watcher = None

    async def _reload_loop(self) -> None:
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            try:
                await self.reload()
            except Exception:
                log.exception("reload failed; the previous config stays in effect")

    async def reload(self) -> bool:
        """Re-read the config file. A bad one is refused (each problem logged with its
        field, shown in `status`) and the running config stays; a good one is applied as
        a diff by watch name. Returns whether the file's config is now in use."""
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                digest = await asyncio.to_thread(content_digest, self.config_path)
                if self.config_watcher is not None:
                    self.config_watcher.mark_loaded(digest)
                try:
                    new = await asyncio.to_thread(load_config, self.config_path)
                except ConfigError as e:
                    self.rejected = list(e.problems)
                    await asyncio.to_thread(write_rejected, self.config.state_dir, self.rejected)
                    for p in e.problems:
                        log.error(
                            "config edit refused; the previous config stays in effect",
                            field=p.field or None,
                            error=p.error,
                            config=str(self.config_path),
                        )
                    return False
                if self.rejected:
                    self.rejected = []
                    await asyncio.to_thread(write_rejected, self.config.state_dir, [])
                diff = diff_config(self.config, new)
                if diff.empty:
                    log.info("config reloaded: nothing changed", config=str(self.config_path))
                    return True
                await self._apply(new, diff)
                self.reloads += 1
                log.info("config reloaded", config=str(self.config_path), **diff.summary())
                return True
            finally:
                self.notifier.ready()
                with contextlib.suppress(Exception):
                    await self._update_status()

    async def _apply(self, new: Config, diff: ConfigDiff) -> None:
        assert self.pool is not None
        if diff.state_dir:
            log.warning(
                "state_dir changes apply at the next start; the running daemon keeps its "
                "ledger where it is",
                running=str(self.config.state_dir),
                configured=str(new.state_dir),
            )
            new = new.model_copy(update={"state_dir": self.config.state_dir})
        if diff.log:
            logs.setup(new.log.level, new.log.format)
        if self._deid_key is None and any(w.dicom.deidentify for w in new.watches):
            self._deid_key = await asyncio.to_thread(deid_key, new)
        old_config, self.config = self.config, new
        if diff.backend:
            sink = build_sink(new)
            old = self.pool.replace_sink(sink)
            self.sink = sink
            await self._note_backend()
            self._spawn(self._retire_sink(old), "retire-sink")
        if diff.workers:
            self.pool.workers = new.workers
            self.pool.wake()
        sides = _sides(new, self._deid_key)
        for name in (*diff.removed, *diff.changed):
            await self._stop_runner(name)
            side = self.pool.watches.pop(name, None)
            if side is not None:
                self._spawn(self._retire_side(side), "retire-side")
            if name in diff.removed:
                log.info("watch removed; its ledger rows stay", watch=name)
        for name in (*diff.changed, *diff.added):
            w = new.watch(name)
            self.pool.watches[name] = sides[name]
            self.runners[name] = make_runner(
                w, self.ledger, self._wake_pool, observe=True, deid_key=self._deid_key
            )
            self._start_runner(name)
            log.info("watch " + ("restarted" if name in diff.changed else "added"), watch=name)
        if diff.watch_config:
            await self._watch_config_file()
        if diff.status and old_config.status != new.status:
            if self.control is not None:
                await self.control.stop()
            await self._start_control()

    async def _retire_side(self, side: WatchSide) -> None:
        """Close a replaced watch's object-store client once its items in flight are done."""
        assert self.pool is not None
        await self.pool.drain()
        await side.close()

    async def _retire_sink(self, old: Sink) -> None:
        assert self.pool is not None
        await self.pool.drain()
        await old.close()

    # -- what the control endpoint asks ------------------------------------------------------

    def status_json(self) -> dict[str, Any]:
        data = status_data(self.config, self.config_path)
        data["config"]["rejected"] = [{"field": p.field, "error": p.error} for p in self.rejected]
        return data

    async def retry(self, watch: str | None, source_id: str | None) -> int:
        n = await self.ledger.call(self.ledger.sync.retry, watch, None, source_id)
        for name, runner in self.runners.items():
            if watch is None or name == watch:
                runner.request_rescan()
        self._wake_pool()
        return n

    def watch_stats(self) -> dict[str, dict[str, float]]:
        return runner_stats(self.runners)

    def queue_depth(self) -> int:
        return self.pool.inflight if self.pool is not None else 0

    def add_outcome_listener(self, fn: Callable[[Outcome], None]) -> None:
        self._outcome_listeners.append(fn)

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
                progress.begin(names)
                while True:
                    per_watch = await self.ledger.call(_pending_state, self.ledger, names)
                    progress.tick({n: p for n, (p, _) in per_watch.items()})
                    pending = sum(p for p, _ in per_watch.values())
                    stuck = sum(s for _, s in per_watch.values())
                    if self.pool.inflight == 0 and (pending == 0 or pending == stuck):
                        break
                    await asyncio.sleep(0.05)
                counts = await self.ledger.call(self.ledger.sync.counts)
                problems = await self.ledger.call(self.ledger.sync.watch_problems)
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
            # A watch that could not be listed, or whose deletions were refused, is not in
            # step even when none of its known items failed.
            troubled = {n: problems[n] for n in names if n in problems}
            for n, problem in troubled.items():
                print(f"{n}: {problem}", file=sys.stderr)
            return 1 if failed or left or troubled else 0
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
                    runner = make_runner(w, self.ledger, lambda: None, observe=False)
                    try:
                        lines += await dry_run_watch(runner, self.ledger)
                    finally:
                        await runner.stop()
            finally:
                await self.ledger.close()
            return lines


def _pending_state(ledger: AsyncLedger, watches: list[str]) -> dict[str, tuple[int, int]]:
    """Per watch: (pending items, pending items that used up the one-pass attempts)."""
    q = ",".join("?" * len(watches))
    rows = ledger.sync.conn.execute(
        f"SELECT watch, count(*), coalesce(sum(attempts >= ?), 0) FROM items"
        f" WHERE status='pending' AND watch IN ({q}) GROUP BY watch",
        (ONE_PASS_MAX_ATTEMPTS, *watches),
    ).fetchall()
    return {w: (int(n), int(stuck)) for w, n, stuck in rows}
