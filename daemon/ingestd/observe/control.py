"""The running daemon's control endpoint: /healthz, /metrics, /api/* and the dashboard.

`status.listen` says where: HOST:PORT (loopback by default; port 0 takes a free port)
or unix:PATH (relative to state_dir). The address actually bound is written to
`state_dir/control.addr` for local tools and tests, and removed on stop. Failing to
bind (port taken, socket path too long) is logged, naming `status.listen`, and the
daemon carries on without the endpoint: syncing matters more than a dashboard.

Routes (JSON unless said):

- GET  /healthz            {"ok": true} while the event loop runs
- GET  /metrics            Prometheus text format (daemon/ingestd/observe/metrics.py)
- GET  /api/status         the object `ingestd status --json` prints
- GET  /api/activity       per watch: syncs and failures in the last minute, last activity,
                           files seen, scans, overflows; queue depth, reloads
- GET  /api/items          recent items (?watch=&status=&limit=), each with a thumbnail URL or null
- POST /api/retry          {"watch": name|null, "item": source_id|null}; Content-Type must be
                           application/json, which an HTML form on another site cannot send
- GET  /thumbs/<watch>/<source_id>   a JPEG thumbnail
- GET  /                   the dashboard page

The server never slows syncing down: ledger reads go through a read-only connection on
the server's own thread (SQLite WAL lets it read while the daemon writes), so a
dashboard polling every second never queues behind the ledger's writes, and thumbnails
render on a separate small pool. Requests whose Host header names some other site are
refused on a loopback listener, so a web page cannot reach the endpoint through DNS
rebinding.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import structlog
from aiohttp import hdrs, web

from ingestd.config import Config
from ingestd.dashboard import (
    add_static_routes,
    item_json,
    json_error,
    parse_plan,
    thumb_response,
    thumb_source,
    unchanged,
)
from ingestd.ledger import LEDGER_FILE, AsyncLedger, LedgerReader
from ingestd.media.thumbs import ThumbCache
from ingestd.observe.activity import RECENT_MAX, Activity
from ingestd.observe.listen import (
    ADDR_FILE,
    address_url,
    is_loopback_host,
    local_host_allowed,
    parse_listen,
    remove_addr,
    write_addr,
)
from ingestd.observe.metrics import DaemonMetrics, Snapshot

if TYPE_CHECKING:
    from ingestd.pipeline.outcome import Outcome

log = structlog.get_logger("ingestd.control")

__all__ = ["ADDR_FILE", "ControlServer", "ControlTarget"]

SEED_MAX_ITEMS = 200_000  # seed the recent list from the ledger only below this size
ITEMS_LIMIT_MAX = 500
STATUS_TTL = 1.0  # dashboards poll /api/status; one ledger read per second serves them all
STOP_TIMEOUT = 1.0  # the daemon's whole stop must stay well under systemd's timeout
SETTLED_STATUSES = ("synced", "pending", "failed", "deleted")


class ControlTarget(Protocol):
    """What the control endpoint needs from the running daemon (ingestd.runtime.app.App).

    Attributes are read on every request, so a reload that swaps `config` is seen at
    once. Methods are called on the event loop, except `status_json`, which blocks on
    SQLite and is called from a worker thread: it must not use `ledger.sync`'s
    connection (the ledger thread owns it)."""

    config: Config
    config_path: Path
    ledger: AsyncLedger
    reloads: int

    def status_json(self) -> dict[str, Any]:
        """The object `ingestd status --json` prints."""
        ...

    async def retry(self, watch: str | None, source_id: str | None) -> int:
        """Queue failed items again (one when source_id is given); how many."""
        ...

    def watch_stats(self) -> dict[str, dict[str, float]]:
        """Per watch: {"files_seen", "scans", "overflows"} since the daemon started."""
        ...

    def queue_depth(self) -> int:
        """Items in flight (claimed by a sync worker)."""
        ...

    def add_outcome_listener(self, fn: Callable[[Outcome], None]) -> None:
        """Call fn (on the event loop) with every sync outcome."""
        ...


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ControlServer:
    def __init__(self, target: ControlTarget, listen: str | None, state_dir: Path) -> None:
        self.target = target
        self.listen = listen
        self.state_dir = Path(state_dir)
        self.address: str | None = None  # what control.addr says, once bound
        self.metrics = DaemonMetrics()
        self.activity = Activity()
        self.thumbs = ThumbCache(self.state_dir / "thumbs")
        at = getattr(getattr(target, "ledger", None), "at", None)  # a shared ledger's place
        self.reader = LedgerReader(
            at if at is not None and at.shared else self.state_dir / LEDGER_FILE
        )
        self._runner: web.AppRunner | None = None
        self._socket_path: Path | None = None
        self._listening = False
        self._status: tuple[float, dict[str, Any]] | None = None
        self._status_lock = asyncio.Lock()
        self._seeded = False
        self._check_host = False
        self._host_names: set[str] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and serve. Never raises for a bind failure: logs it and returns."""
        if self.listen is None:
            return
        self.target.add_outcome_listener(self._on_outcome)
        self._listening = True
        app = self._make_app()
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=STOP_TIMEOUT)
        await runner.setup()
        try:
            where = parse_listen(self.listen)
            if isinstance(where, str):
                path = self.state_dir / where
                self._socket_path = path
                site: web.BaseSite = web.UnixSite(runner, str(path))
                await site.start()
                with contextlib.suppress(OSError):
                    os.chmod(path, 0o660)  # the daemon's user and group only
                address = f"unix:{path.resolve()}"
            else:
                host, port = where
                site = web.TCPSite(runner, host, port)
                await site.start()
                bound = runner.addresses[0]
                address = address_url(host if host in ("0.0.0.0", "::") else bound[0], bound[1])
                if is_loopback_host(host):
                    self._check_host = True
                    self._host_names = {"localhost", host.lower()}
                else:
                    log.warning(
                        "the control endpoint listens beyond this machine; anyone who can "
                        "reach it sees the dashboard and can retry items (status.listen)",
                        listen=self.listen,
                    )
        except Exception as e:
            await runner.cleanup()
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            log.error(
                "cannot serve the control endpoint; the daemon runs without it. "
                "Set status.listen to a free HOST:PORT, a unix:PATH, or null",
                field="status.listen",
                listen=self.listen,
                error=reason,
            )
            self._listening = False
            return
        self._runner = runner
        self.address = address
        await asyncio.to_thread(write_addr, self.state_dir, address)
        log.info("control endpoint listening", address=address)

    async def stop(self) -> None:
        self._listening = False
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self.address is not None:
            await asyncio.to_thread(remove_addr, self.state_dir, self.address)
            self.address = None
        if self._socket_path is not None:
            with contextlib.suppress(OSError):
                self._socket_path.unlink()
        self.thumbs.close()
        self.reader.close()

    def _on_outcome(self, o: Outcome) -> None:
        if not self._listening:
            return
        self.metrics.outcome(o)
        self.activity.outcome(o)

    # -- the app ------------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=64 << 10)
        r = app.router
        r.add_get("/healthz", self._healthz)
        r.add_get("/metrics", self._metrics)
        r.add_get("/api/info", self._info)
        r.add_get("/api/status", self._api_status)
        r.add_get("/api/activity", self._api_activity)
        r.add_get("/api/items", self._api_items)
        r.add_post("/api/retry", self._api_retry)
        r.add_get(r"/thumbs/{watch}/{source_id:[\s\S]+}", self._thumb)
        add_static_routes(r)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._check_host:
            host = (request.host or "").lower()
            name = urlsplit(f"//{host}").hostname or ""
            if not local_host_allowed(name, self._host_names):
                return json_error(
                    403, f"Host {host!r} is not this machine's control endpoint (DNS rebinding?)"
                )
        if request.method == "POST":
            origin = request.headers.get(hdrs.ORIGIN)
            if (
                origin
                and origin != "null"
                and urlsplit(origin).netloc.lower() != (request.host or "").lower()
            ):
                return json_error(403, f"cross-origin request from {origin} refused")
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status >= 400:
                return json_error(e.status, e.reason)
            raise
        except Exception as e:
            # A shared ledger whose server is away (or not reached yet at the start):
            # what the request needed cannot be read or written; say why, not "500".
            problem = getattr(getattr(self.target, "ledger", None), "problem", None)
            if problem:
                log.debug("control request waits for the ledger", path=request.path)
                return json_error(503, f"the ledger cannot be used now: {problem}")
            log.exception("control request failed", path=request.path)
            return json_error(500, f"internal error: {type(e).__name__}")

    # -- routes -------------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _metrics(self, request: web.Request) -> web.Response:
        t = self.target
        counts = await self.reader.status_counts()
        snap = Snapshot(
            watch_stats=t.watch_stats(),
            items=counts,
            queue_depth=t.queue_depth(),
            reloads=t.reloads,
            watches=tuple(w.name for w in t.config.watches),
        )
        return web.Response(
            body=self.metrics.render(snap),
            headers={hdrs.CONTENT_TYPE: self.metrics.content_type},
        )

    async def _info(self, request: web.Request) -> web.Response:
        t = self.target
        return web.json_response(
            {
                "kind": "daemon",
                "pid": os.getpid(),
                "config": str(t.config_path),
                "watches": [w.name for w in t.config.watches],
                "retry": True,
            }
        )

    async def status(self, *, fresh: bool = False) -> dict[str, Any]:
        async with self._status_lock:
            now = time.monotonic()
            if fresh or self._status is None or now - self._status[0] >= STATUS_TTL:
                data = await asyncio.to_thread(self.target.status_json)
                self._status = (time.monotonic(), data)
            return self._status[1]

    async def _api_status(self, request: web.Request) -> web.Response:
        return web.json_response(await self.status(fresh=request.query.get("fresh") == "1"))

    async def _api_activity(self, request: web.Request) -> web.Response:
        t = self.target
        stats = t.watch_stats()
        now = time.time()
        watches = {}
        for w in t.config.watches:
            synced, failed = self.activity.last_minute(w.name, now)
            s = stats.get(w.name, {})
            watches[w.name] = {
                "synced_last_minute": synced,
                "failed_last_minute": failed,
                "last_activity": self.activity.last.get(w.name),
                "files_seen": s.get("files_seen", 0),
                "scans": s.get("scans", 0),
                "overflows": s.get("overflows", 0),
            }
        return web.json_response(
            {"now": now, "queue_depth": t.queue_depth(), "reloads": t.reloads, "watches": watches}
        )

    def _folder(self, watch: str) -> Path | None:
        """The local folder of a configured watch (None: unknown, or a bucket)."""
        for w in self.target.config.watches:
            if w.name == watch:
                return None if "://" in w.source else Path(w.source)
        return None

    async def _api_items(self, request: web.Request) -> web.Response:
        q = request.query
        watch = q.get("watch") or None
        status = q.get("status") or None
        if status is not None and status not in SETTLED_STATUSES:
            return json_error(400, f"status must be one of {', '.join(SETTLED_STATUSES)}")
        raw_limit = q.get("limit", "50")
        if not raw_limit.isdigit() or int(raw_limit) < 1:
            return json_error(400, f"limit must be a positive integer, got {raw_limit!r}")
        limit = min(int(raw_limit), ITEMS_LIMIT_MAX)
        if status in ("failed", "pending"):
            rows = await self.reader.items_by_status(watch, status, limit)
        else:
            # Recently finished items, from memory: sorting the ledger by time would read
            # all of it on every dashboard refresh.
            if not self._seeded:
                self._seeded = True
                self.activity.seed(await self.reader.recent_keys(SEED_MAX_ITEMS, RECENT_MAX))
            keys = [k for k in reversed(self.activity.recent) if watch is None or k[0] == watch]
            rows = await self.reader.items_by_key(keys[: ITEMS_LIMIT_MAX * 2])
            rows = [
                r for r in rows if (r["status"] == status if status else r["status"] != "deleted")
            ]
            rows.sort(key=lambda r: r["updated_at"], reverse=True)
            rows = rows[:limit]
        return web.json_response({"items": [item_json(r, self._folder(r["watch"])) for r in rows]})

    async def _api_retry(self, request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return json_error(415, "send the request as Content-Type: application/json")
        try:
            body = await request.json()
        except ValueError as e:
            return json_error(400, f"body is not JSON: {e}")
        if not isinstance(body, dict):
            return json_error(400, 'body must be an object: {"watch": ..., "item": ...}')
        watch, item = body.get("watch"), body.get("item")
        if not (watch is None or isinstance(watch, str)) or not (
            item is None or isinstance(item, str)
        ):
            return json_error(400, '"watch" and "item" must be strings or null')
        if item is not None and watch is None:
            return json_error(400, 'retrying one item needs its "watch" too')
        if watch is not None and watch not in {w.name for w in self.target.config.watches}:
            return json_error(404, f"no watch named {watch!r} in the running config")
        n = await self.target.retry(watch, item)
        log.info("retry requested on the control endpoint", watch=watch, item=item, queued=n)
        self._status = None  # the next status read shows the new state
        return web.json_response({"retried": n})

    async def _thumb(self, request: web.Request) -> web.StreamResponse:
        watch, source_id = request.match_info["watch"], request.match_info["source_id"]
        row = await self.reader.item(watch, source_id)
        src = thumb_source(row, self._folder(watch), parse_plan(row)) if row is not None else None
        if src is None:
            return json_error(404, f"no thumbnail for {source_id} (watch {watch})")
        key, kind, path, size, mtime_ns = src
        made = await self.thumbs.get(key, kind, path, check=lambda: unchanged(path, size, mtime_ns))
        if made is None:
            return json_error(404, f"{source_id}: cannot show a thumbnail of this file now")
        return thumb_response(made)
