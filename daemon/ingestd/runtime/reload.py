"""Live reload: re-read the config file and apply what changed as a diff by watch name.

A bad file is refused (each problem logged with its field, shown in `status`) and the
running config stays. A good one is compared with the running config and only what
differs is touched: removed and changed watches stop, changed and added ones start, a
new backend replaces the sink; old sinks and watch sides are retired once the items
in flight on them are done.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import structlog

from ingestd.config import (
    Config,
    ConfigDiff,
    ConfigError,
    diff_config,
    load_config,
    parse_config_bytes,
)
from ingestd.observe.status import write_rejected
from ingestd.pipeline.runner import make_runner
from ingestd.pipeline.side import WatchSide
from ingestd.runtime import logs
from ingestd.runtime.backend import build_sink, deid_key, sides
from ingestd.runtime.config_watch import digest_of, read_content
from ingestd.sinks.base import Sink

if TYPE_CHECKING:
    from ingestd.runtime.app import App

log = structlog.get_logger("ingestd")


class Reloader:
    """Reloads of one App, one at a time: requests that come in while one runs are
    served by a single reload after it."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._lock = asyncio.Lock()
        self._wanted = asyncio.Event()
        self._content: bytes | None = None

    def request(self, reason: str = "SIGHUP", content: bytes | None = None) -> None:
        """Reload soon; `content` is the file's bytes when the caller has just read
        them (the config watcher), else the file is read then."""
        log.info("reload requested", reason=reason, config=str(self.app.config_path))
        self._content = content
        self._wanted.set()

    async def loop(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            try:
                await self.reload()
            except Exception:
                log.exception("reload failed; the previous config stays in effect")

    async def reload(self) -> bool:
        """Re-read the config file and apply it. Returns whether the file's config is
        now in use."""
        app = self.app
        async with self._lock:
            app.notifier.reloading()
            try:
                new = await self._read()
                if new is None:
                    return False
                diff = diff_config(app.config, new)
                if diff.empty:
                    log.info("config reloaded: nothing changed", config=str(app.config_path))
                    return True
                await self._apply(new, diff)
                app.reloads += 1
                log.info("config reloaded", config=str(app.config_path), **diff.summary())
                return True
            finally:
                app.notifier.ready()
                with contextlib.suppress(Exception):
                    await app.update_status()

    async def _read(self) -> Config | None:
        """The file's config, or None when it is refused (recorded for `status`)."""
        app = self.app
        content, self._content = self._content, None
        if content is None:
            content = await asyncio.to_thread(read_content, app.config_path)
        app.loaded = None if content is None else digest_of(content)
        if app.config_watcher is not None:
            app.config_watcher.mark_loaded(app.loaded)
        try:
            if content is None:  # load_config says why (no such file, permission...)
                new = await asyncio.to_thread(load_config, app.config_path)
            else:
                new = await asyncio.to_thread(parse_config_bytes, app.config_path, content)
        except ConfigError as e:
            app.rejected = list(e.problems)
            await asyncio.to_thread(write_rejected, app.config.state_dir, app.rejected)
            for p in e.problems:
                log.error(
                    "config edit refused; the previous config stays in effect",
                    field=p.field or None,
                    error=p.error,
                    config=str(app.config_path),
                )
            return None
        if app.rejected:
            app.rejected = []
            await asyncio.to_thread(write_rejected, app.config.state_dir, [])
        return new

    async def _apply(self, new: Config, diff: ConfigDiff) -> None:
        app = self.app
        pool = app.pool
        assert pool is not None
        if diff.state_dir:
            log.warning(
                "state_dir changes apply at the next start; the running daemon keeps its "
                "ledger where it is",
                running=str(app.config.state_dir),
                configured=str(new.state_dir),
            )
            new = new.model_copy(update={"state_dir": app.config.state_dir})
        if diff.log:
            logs.setup(new.log.level, new.log.format)
        if app.deid is None and any(w.dicom.deidentify for w in new.watches):
            app.deid = await asyncio.to_thread(deid_key, new)
        old_config, app.config = app.config, new
        if diff.backend:
            sink = build_sink(new)
            old = pool.replace_sink(sink)
            app.sink = sink
            await app.note_backend()
            app.spawn(self._retire_sink(old), "retire-sink")
        if diff.workers:
            pool.workers = new.workers
            pool.wake()
        new_sides = sides(new, app.deid)
        for name in (*diff.removed, *diff.changed):
            await app.stop_runner(name)
            side = pool.watches.pop(name, None)
            if side is not None:
                app.spawn(self._retire_side(side), "retire-side")
            if name in diff.removed:
                log.info("watch removed; its ledger rows stay", watch=name)
        for name in (*diff.changed, *diff.added):
            w = new.watch(name)
            pool.watches[name] = new_sides[name]
            app.runners[name] = make_runner(
                w, app.ledger, app.wake_pool, observe=True, deid_key=app.deid
            )
            app.start_runner(name)
            log.info("watch " + ("restarted" if name in diff.changed else "added"), watch=name)
        if diff.watch_config:
            await app.watch_config_file()
        if diff.status and old_config.status != new.status:
            await app.restart_control()

    async def _retire_side(self, side: WatchSide) -> None:
        """Close a replaced watch's object-store client once its items in flight are done."""
        assert self.app.pool is not None
        await self.app.pool.drain()
        await side.close()

    async def _retire_sink(self, old: Sink) -> None:
        assert self.app.pool is not None
        await self.app.pool.drain()
        await old.close()
