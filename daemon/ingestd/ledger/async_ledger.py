"""`AsyncLedger`: the daemon's view of the ledger, from the event loop.

Writes are group-committed: the daemon funnels every write through here, which runs
them on one thread and commits whatever queued up while the previous transaction ran
as a single transaction. After a crash the ledger alone says what still needs doing:
an item is `pending` until a sink has confirmed it, and nothing about progress lives
only in memory.

When the ledger cannot be written (disk full, read-only, I/O error), nothing is
dropped: writers keep their work and `wait_writable()`; `problem` says so in words
(status shows it); one probe loop tries a tiny real write every second or two and,
once one commits, wakes every waiter and the `add_writable_listener` callbacks.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from ingestd.ledger.db import ensure_settings, set_setting
from ingestd.ledger.engine import Conn
from ingestd.ledger.ledger import Failed, Ledger
from ingestd.ledger.where import LedgerAt

T = TypeVar("T")

log = structlog.get_logger("ingestd.ledger")

PROBE_FIRST = 1.0  # seconds before the first probe write, and its backoff's growth...
PROBE_CAP = 2.0  # ...up to this: space that comes back is noticed within ~2 s
OPEN_RETRY = 3.0  # seconds between attempts to open a shared ledger whose server is down
_UNWRITABLE_ERRNOS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EIO: "I/O error",
    errno.EACCES: "permission denied",
}
# SQLite's words for the same conditions (its errors carry no errno).
_UNWRITABLE_SQLITE = (
    ("database or disk is full", "disk full"),
    ("readonly database", "read-only"),
    ("disk i/o error", "disk I/O error"),
    ("unable to open database file", "cannot open the file"),
)


def _pg_reason(e: BaseException) -> str | None:
    """PostgreSQL's version: the server cannot be reached or refuses writes."""
    psycopg = sys.modules.get("psycopg")  # loaded only with a shared ledger
    if psycopg is None or not isinstance(e, psycopg.Error):
        return None
    if isinstance(e, psycopg.OperationalError):
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"PostgreSQL unreachable ({first[:200]})"
    if getattr(e, "sqlstate", None) in ("53100", "25006"):  # disk full, read-only
        return f"PostgreSQL refuses writes ({str(e).strip()[:200]})"
    return None


def unwritable_reason(e: BaseException) -> str | None:
    """Why `e` means the ledger cannot be written at all, in a few words, or None when
    it is some other failure. Follows the chain: a failed ROLLBACK after a disk-full
    COMMIT hides the real cause in its context."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if (pg := _pg_reason(cause)) is not None:
            return pg
        if isinstance(cause, sqlite3.Error):
            text = str(cause).lower()
            for words, reason in _UNWRITABLE_SQLITE:
                if words in text:
                    return reason
        elif isinstance(cause, OSError) and cause.errno in _UNWRITABLE_ERRNOS:
            return _UNWRITABLE_ERRNOS[cause.errno]
        cause = cause.__cause__ or cause.__context__
    return None


def _mount_of(path: Path) -> str:
    """The mount point holding `path` (where space must be freed)."""
    p = os.path.realpath(path)
    while not os.path.ismount(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def _probe(conn: Conn) -> None:
    ensure_settings(conn)
    set_setting(conn, "writable_probe", repr(time.time()))


class AsyncLedger:
    """The daemon's view of the ledger: every call runs on one dedicated thread, and
    writes submitted while a transaction runs are committed together in the next one."""

    def __init__(self, where: Path | LedgerAt) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ledger")
        self._ledger: Ledger | None = None
        self.at = LedgerAt.of(where)
        self._state_dir = self.at.state_dir
        self._batch: list[tuple[Callable[[Conn], Any], asyncio.Future[Any]]] = []
        self._flushing = False
        self._flusher: asyncio.Task[None] | None = None
        # None while writes commit; a sentence naming the file and the fix otherwise
        # (read by status, per watch).
        self.problem: str | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self._prober: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[], None]] = []

    async def open(
        self, *, wait: bool = False, on_waiting: Callable[[str], None] | None = None
    ) -> None:
        """Open the ledger. With `wait`, a shared ledger whose server cannot be reached
        is not an error: it is the ledger's `problem` (`on_waiting` hears it once) and
        opening is tried again every OPEN_RETRY seconds until the server answers. A
        daemon started before its database (a reboot, a failover) then starts by
        itself instead of exiting for systemd to restart in a loop. Other errors (no
        right to create the tables) are raised: they need a person."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                self._ledger = await loop.run_in_executor(self._executor, Ledger, self.at)
            except Exception as e:
                if not (wait and self.shared and _pg_reason(e) is not None):
                    raise
                if self.problem is None:
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                    self.problem = (
                        f"ledger {self.at.url()} unreachable: {first}; retried every few "
                        "seconds (start the server, or fix the network or state.ledger); "
                        "the watches start once it answers"
                    )
                    log.error("ledger unreachable", ledger=self.at.url(), error=first)
                    if on_waiting is not None:
                        on_waiting(self.problem)
                await asyncio.sleep(OPEN_RETRY)
                continue
            if self.problem is not None:
                self.problem = None
                log.info("ledger reachable; starting", ledger=self.at.url())
            return

    @property
    def is_open(self) -> bool:
        return self._ledger is not None

    @property
    def sync(self) -> Ledger:
        assert self._ledger is not None, "ledger not opened"
        return self._ledger

    @property
    def path(self) -> Path:
        return self.at.sqlite_path

    @property
    def shared(self) -> bool:
        return self.at.shared

    def add_writable_listener(self, fn: Callable[[], None]) -> None:
        """Call `fn` (on the event loop) each time the ledger is writable again."""
        self._listeners.append(fn)

    async def wait_writable(self) -> None:
        await self.writable.wait()

    def is_unwritable(self, e: BaseException) -> bool:
        """Whether a write failed because the ledger cannot be written (the caller keeps
        its work and waits for `wait_writable()`)."""
        return unwritable_reason(e) is not None or not self.writable.is_set()

    def _unwritable(self, reason: str) -> None:
        """Writes fail for want of space (or a writable disk): say so once, probe."""
        if self.problem is None:
            if self.shared:
                self.problem = (
                    f"ledger {self.at.describe()} cannot be written: {reason}; start the "
                    "server (or fix the network or its disk); work is kept and retried "
                    "every second"
                )
            else:
                self.problem = (
                    f"ledger {self.path} cannot be written: {reason}; free space on (or "
                    f"fix) {_mount_of(self._state_dir)}; work is kept and retried every second"
                )
            log.error("ledger cannot be written", ledger=self.at.describe(), reason=reason)
        self.writable.clear()
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay = PROBE_FIRST
        while True:
            await asyncio.sleep(delay)
            try:
                (result,) = await loop.run_in_executor(
                    self._executor, self.sync.transaction, [_probe]
                )
                if isinstance(result, Failed):
                    raise result.error
            except Exception as e:
                log.debug("ledger still not writable", error=str(e))
                delay = min(delay * 1.5, PROBE_CAP)
                continue
            break
        self._prober = None
        self._recovered()

    def _recovered(self) -> None:
        """A write committed: the problem is over; wake the waiters and listeners."""
        if self._prober is not None:
            self._prober.cancel()
            self._prober = None
        self.problem = None
        self.writable.set()
        log.info("ledger writable again", ledger=self.at.describe())
        for fn in list(self._listeners):
            try:
                fn()
            except Exception:
                log.exception("writable listener failed")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a read (or a non-batched write) on the ledger thread. A failure that
        means the ledger cannot be reached (a shared one whose server went away) is the
        ledger's problem, as a failed commit is; the caller gets the exception."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except Exception as e:
            if (reason := unwritable_reason(e)) is not None:
                self._unwritable(reason)
            raise

    async def write(self, op: Callable[[Conn], T]) -> T:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._batch.append((op, fut))
        if not self._flushing:
            self._flushing = True
            self._flusher = loop.create_task(self._flush())
        return await fut

    async def write_many(self, ops: Sequence[Callable[[Conn], T]]) -> list[T]:
        # Plain futures, not one Task per op: a batch can hold thousands of ops.
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[T]] = [loop.create_future() for _ in ops]
        self._batch.extend(zip(ops, futs, strict=True))
        if ops and not self._flushing:
            self._flushing = True
            self._flusher = loop.create_task(self._flush())
        return list(await asyncio.gather(*futs))

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._batch:
                batch, self._batch = self._batch, []
                try:
                    results = await loop.run_in_executor(
                        self._executor, self.sync.transaction, [op for op, _ in batch]
                    )
                except BaseException as e:  # the whole commit failed (disk full, ...)
                    if (reason := unwritable_reason(e)) is not None:
                        self._unwritable(reason)
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e if isinstance(e, Exception) else RuntimeError(e))
                    if not isinstance(e, Exception):
                        raise
                    continue
                full = False
                for (_, fut), result in zip(batch, results, strict=True):
                    # A statement can fail for want of space while the commit of the
                    # rest (nothing) succeeds: the same condition.
                    if isinstance(result, Failed) and (reason := unwritable_reason(result.error)):
                        self._unwritable(reason)
                        full = True
                    if fut.done():
                        continue
                    if isinstance(result, Failed):
                        fut.set_exception(result.error)
                    else:
                        fut.set_result(result)
                if not full and not self.writable.is_set():
                    # Writes commit again before the probe noticed: say so now.
                    self._recovered()
        finally:
            self._flushing = False

    async def close(self) -> None:
        while self._flushing or self._batch:
            await asyncio.sleep(0.01)
        if self._prober is not None:
            self._prober.cancel()
        if self._ledger is not None:
            await self.call(self._ledger.close)
        self._executor.shutdown(wait=True)
