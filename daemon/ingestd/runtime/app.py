"""The daemon: builds watches and the sync pool from the config, supervises them, and
shuts down cleanly. Live reload is reload.py; the one-pass forms (`ingestd sync`, its
dry run) are once.py; what the backend and watches turn into is backend.py."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from ingestd.config import Config, Problem, backend_identity
from ingestd.ledger import AsyncLedger, op_switch_backend
from ingestd.observe.status import ledger_at, status_data, write_rejected
from ingestd.pipeline.outcome import Outcome
from ingestd.pipeline.pool import SyncPool
from ingestd.pipeline.runner import WatchRunner, make_runner, runner_stats
from ingestd.runtime.backend import build_sink, deid_key, sides
from ingestd.runtime.config_watch import ConfigWatcher, content_digest
from ingestd.runtime.reload import Reloader
from ingestd.runtime.service import Notifier, PidLock, install_signals, watchdog_loop
from ingestd.sinks.base import Sink

if TYPE_CHECKING:
    from ingestd.observe.control import ControlServer

log = structlog.get_logger("ingestd")

STATUS_EVERY = 5.0  # seconds between systemd STATUS= updates
HEARTBEAT_EVERY = 3.0  # seconds between heartbeats in a shared ledger's `daemons`
SHUTDOWN_GRACE = 6.0  # in-flight uploads get this long; the whole stop stays under 10 s
SINK_CLOSE_TIMEOUT = 1.0  # closing the sink's connections, at most


class App:
    """The running daemon (and what the one-pass forms open). For the control endpoint
    it is the `ControlTarget`: status, retry, counters and sync outcomes."""

    def __init__(self, config: Config, config_path: Path, loaded: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        # What the config file held when `config` was read: an edit during the start is seen.
        self.loaded = loaded if loaded is not None else content_digest(config_path)
        self.ledger = AsyncLedger(ledger_at(config))
        self.sink: Sink | None = None
        self.pool: SyncPool | None = None
        self.runners: dict[str, WatchRunner] = {}
        self.rejected: list[Problem] = []  # problems of the last refused config edit
        self.reloads = 0
        self.deid: bytes | None = None  # the DICOM de-identification key, once one is needed
        self.notifier = Notifier()
        self.control: ControlServer | None = None
        self.config_watcher: ConfigWatcher | None = None
        self.reloader = Reloader(self)
        self._stop = asyncio.Event()
        self._starts: dict[str, asyncio.Task[None]] = {}
        self._outcome_listeners: list[Callable[[Outcome], None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._pool_task: asyncio.Task[None] | None = None

    def wake_pool(self) -> None:
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

    # -- opening and closing ----------------------------------------------------------------

    async def open(self, *, observe: bool, on_outcome: Callable[[Outcome], None] | None) -> None:
        """Open the ledger and the sink, and build the sync pool and one runner per
        watch (not started). `observe`: runners follow file events, not only scans.
        `run` opens the ledger before (`_open_ledger`); the one-pass forms here."""
        if not self.ledger.is_open:
            await self.ledger.open()
        if on_outcome is not None:
            self._outcome_listeners.append(on_outcome)
        self.sink = build_sink(self.config)
        await self.note_backend()
        self.deid = key = await asyncio.to_thread(deid_key, self.config)
        spool = self.config.state_dir / "spool"
        # Derived media of a previous run that ended mid-item: rebuilt when needed.
        await asyncio.to_thread(shutil.rmtree, spool, True)
        self.pool = SyncPool(
            self.ledger,
            self.sink,
            sides(self.config, key),
            self.config.workers,
            on_source_changed=self._source_changed,
            on_outcome=self._outcome,
            spool_root=str(self.config.state_dir),
        )
        for w in self.config.watches:
            self.runners[w.name] = make_runner(
                w, self.ledger, self.wake_pool, observe=observe, deid_key=key
            )

    async def note_backend(self) -> None:
        """Items synced to another backend than the configured one are sent again."""
        n = await self.ledger.write(op_switch_backend(backend_identity(self.config), time.time()))
        if n:
            log.warning(
                "the backend changed since items were synced; sending them to the new one",
                items=n,
            )
            self.wake_pool()

    async def close(self) -> None:
        """Stop everything within a bound, then close the ledger. Runners stop while
        the pool's in-flight items have their grace: each part waits for its own tasks
        a bounded time and leaves a task stuck on a thread behind (`run_app` then exits
        without waiting for that thread)."""
        for task in self._starts.values():
            task.cancel()
        stops = [asyncio.create_task(r.stop()) for r in self.runners.values()]
        if self.pool is not None:
            await self.pool.stop(SHUTDOWN_GRACE)
        if stops:
            await asyncio.wait(stops)  # each runner's stop is bounded (runner.STOP_TIMEOUT)
        if self.sink is not None:
            try:
                await asyncio.wait_for(self.sink.close(), SINK_CLOSE_TIMEOUT)
            except Exception as e:  # its connections die with the process anyway
                log.warning("closing the sink failed", error=str(e) or type(e).__name__)
        await self.ledger.close()

    # -- supervision ------------------------------------------------------------------------

    def start_runner(self, name: str) -> None:
        """Start a watch's runner in the background: a watch that fails to start is
        logged and does not hold up the others."""
        runner = self.runners[name]

        async def start() -> None:
            try:
                await runner.start()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("watch failed to start", watch=name, error=str(e))

        self._starts[name] = asyncio.create_task(start(), name=f"start:{name}")

    async def stop_runner(self, name: str) -> None:
        task = self._starts.pop(name, None)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        runner = self.runners.pop(name, None)
        if runner is not None:
            await runner.stop()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run a background task until it ends or the daemon stops."""
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
            await asyncio.to_thread(write_rejected, self.config.state_dir, [])
            if not await self._open_ledger():
                return 0
            await self.open(observe=True, on_outcome=None)
            assert self.pool is not None
            self._pool_task = pool_task = asyncio.create_task(self.pool.run(), name="sync-pool")
            log.info(
                "ingestd started",
                config=str(self.config_path),
                watches=[w.name for w in self.config.watches],
                workers=self.config.workers,
            )
            if not self.config.watches:
                log.warning("the config has no watches; nothing to do")
            for name in self.runners:
                self.start_runner(name)
            await asyncio.sleep(0)  # the first scans are under way
            self.notifier.ready()
            await self.update_status()
            await self.watch_config_file()
            self.spawn(self.reloader.loop(), "reload")
            self.spawn(self._status_loop(), "notify-status")
            if self.ledger.shared:
                self.spawn(self._heartbeat_loop(), "heartbeat")
            await self._stop.wait()
            self.notifier.stopping()
            log.info("stopping: finishing in-flight uploads")
            for task in list(self._background):
                task.cancel()
            if self.config_watcher is not None:
                await self.config_watcher.stop()
            if self.control is not None:
                await self.control.stop()
            await self.close()
            pool_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pool_task
            log.info("stopped")
            return 0
        finally:
            lock.release()

    async def _open_ledger(self) -> bool:
        """Serve the control endpoint and ping the watchdog, then open the ledger
        (`open_when_reachable`). False: told to stop first, and stopped."""
        await self.start_control()
        self.spawn(watchdog_loop(self.notifier, self._healthy), "watchdog")
        opened = False
        try:
            opened = await open_when_reachable(self.ledger, self._stop, self.notifier)
        finally:
            if not opened:
                for task in list(self._background):
                    task.cancel()
                if self.control is not None:
                    await self.control.stop()
                await self.ledger.close()
        return opened

    def _healthy(self) -> bool:
        """Worth a watchdog ping: not stopping, the pool running (or waiting for the ledger)."""
        return not self._stop.is_set() and (self._pool_task is None or not self._pool_task.done())

    def _rescan_all(self) -> None:
        log.info("rescan requested")
        for runner in self.runners.values():
            runner.request_rescan()

    async def start_control(self) -> None:
        listen = self.config.status.listen
        if listen is None:
            self.control = None
            return
        # Imported only when the daemon serves the endpoint: the one-pass forms never do.
        from ingestd.observe.control import ControlServer

        self.control = ControlServer(self, listen, self.config.state_dir)
        await self.control.start()

    async def restart_control(self) -> None:
        """After `status` changed in a reload: serve where it now says."""
        if self.control is not None:
            await self.control.stop()
        await self.start_control()

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY)
            with contextlib.suppress(Exception):
                await self.update_status()

    async def _heartbeat_loop(self) -> None:
        """A shared ledger's `daemons` row: `status` on any machine shows this daemon
        and when it was last heard of. A failed beat is the ledger's problem (call)."""
        while True:
            with contextlib.suppress(Exception):
                await self.ledger.call(self.ledger.sync.heartbeat)
            await asyncio.sleep(HEARTBEAT_EVERY)

    async def update_status(self) -> None:
        counts = await self.ledger.call(self.ledger.sync.counts)
        names = list(self.runners)
        pending = sum(counts[n].pending for n in names if n in counts)
        failed = sum(counts[n].failed for n in names if n in counts)
        self.notifier.status(f"{len(names)} watches, {pending} pending, {failed} failed")

    # -- live reload (reload.py) --------------------------------------------------------------

    def request_reload(self, reason: str = "SIGHUP", content: bytes | None = None) -> None:
        """SIGHUP (also `systemctl reload`, `ingestd reload`) or an edit of the file
        (with the bytes the config watcher read)."""
        self.reloader.request(reason, content)

    async def reload(self) -> bool:
        """Re-read the config file now; whether the file's config is now in use."""
        return await self.reloader.reload()

    async def watch_config_file(self) -> None:
        """Follow edits of the config file while `watch_config` says so."""
        if self.config.watch_config and self.config_watcher is None:
            edited = functools.partial(self.request_reload, "config file edited")
            self.config_watcher = ConfigWatcher(self.config_path, edited, self.loaded)
            await self.config_watcher.start()
        elif not self.config.watch_config and self.config_watcher is not None:
            await self.config_watcher.stop()
            self.config_watcher = None

    # -- what the control endpoint asks ------------------------------------------------------

    def status_json(self) -> dict[str, Any]:
        """The ledger's report with the live part merged in. Runs on a worker thread
        (control.py): it only reads plain attributes of the runners, pool and ledger."""
        data = status_data(self.config, self.config_path)
        data["config"]["rejected"] = [{"field": p.field, "error": p.error} for p in self.rejected]
        data["daemon"]["live"] = True
        # The ledger and the sink are shared: their trouble is every watch's.
        shared = [self.ledger.problem, self.pool.problem if self.pool is not None else None]
        _merge_live(data["watches"], self.runners, shared, self.ledger.is_open)
        return data

    async def retry(self, watch: str | None, source_id: str | None) -> int:
        n = await self.ledger.call(self.ledger.sync.retry, watch, None, source_id)
        for name, runner in self.runners.items():
            if watch is None or name == watch:
                runner.request_rescan()
        self.wake_pool()
        return n

    def watch_stats(self) -> dict[str, dict[str, float]]:
        return runner_stats(self.runners)

    def queue_depth(self) -> int:
        return self.pool.inflight if self.pool is not None else 0

    def add_outcome_listener(self, fn: Callable[[Outcome], None]) -> None:
        self._outcome_listeners.append(fn)


def _merge_live(
    watches: list[dict[str, Any]],
    runners: dict[str, WatchRunner],
    shared: list[str | None],
    ledger_open: bool,
) -> None:
    """Each watch's live part and problems: the recorded one, the runner's, and the
    daemon-wide ones (also before the runners exist, while it waits for its ledger)."""
    for w in watches:
        runner = runners.get(w["name"])
        if runner is not None:  # None: not built yet, or just removed by a reload
            w.update(runner.live())
        own = runner.problem if runner is not None else None
        # Not open yet: what the ledger read says is "unreachable", said already.
        recorded = w["problem"] if ledger_open else None
        problems = [p for p in (recorded, own, *shared) if p]
        w["problem"] = "; ".join(dict.fromkeys(problems)) or None


async def open_when_reachable(ledger: AsyncLedger, stop: asyncio.Event, notifier: Notifier) -> bool:
    """Open the ledger, waiting for a shared ledger's server that does not answer yet:
    that is the ledger's problem on every watch in `status` (and systemd's status
    line), not an exit that systemd would turn into a restart loop. False when `stop`
    is set first."""

    def waiting(problem: str) -> None:
        notifier.ready()  # up, and saying why it waits: not a start that timed out
        notifier.status(problem)

    opening = asyncio.create_task(ledger.open(wait=True, on_waiting=waiting))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({opening, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if opening.done():
        opening.result()  # raises what is not worth waiting for
        return True
    opening.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await opening
    return False


def run_app(app: App) -> int:
    """`asyncio.run(app.run())`, except that its end never waits for executor threads.

    asyncio.run joins the default executor's threads without a time limit, so a single
    thread stuck in a blocking call (a planner reading from a hung mount, a media
    decoder that never returns) kept a stopped daemon alive until systemd killed it.
    By the time `app.run()` returns, the ledger is committed and closed: what such a
    thread was doing is redone at the next start. The threads are left running; the
    caller (cli.py) exits the process without waiting for them."""
    loop = asyncio.new_event_loop()
    # Named, so that a straggler is recognisable in a thread dump.
    executor = ThreadPoolExecutor(thread_name_prefix="ingestd-blocking")
    loop.set_default_executor(executor)
    asyncio.set_event_loop(loop)
    try:
        rc = loop.run_until_complete(app.run())
        left = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in left:
            task.cancel()
        if left:
            # Cancelled tasks end at their next await; one stuck on a thread is left.
            loop.run_until_complete(asyncio.wait(left, timeout=1.0))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        asyncio.set_event_loop(None)
        loop.close()  # shuts the default executor down without waiting, too
    return rc
