"""`LedgerReader`: a read-only connection to the ledger on a thread of its own.

The control endpoint reads through it so that a dashboard polling every second never
queues behind the ledger's writes (SQLite WAL lets it read while the daemon writes).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ingestd.ledger import reads
from ingestd.ledger.engine import Conn, connect
from ingestd.ledger.where import LedgerAt

T = TypeVar("T")


class LedgerReader:
    """Reads of the ledger at `path` (the SQLite file, or a LedgerAt), each run on the
    reader's own thread. The connection opens on first use: the daemon may start before
    the ledger exists."""

    def __init__(self, path: Path | LedgerAt) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="control-db")
        self._conn: Conn | None = None

    async def run(self, fn: Callable[[Conn], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, fn)

    def _call(self, fn: Callable[[Conn], T]) -> T:
        if self._conn is None:
            self._conn = connect(self.path, readonly=True)
        return fn(self._conn)

    def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        with contextlib.suppress(RuntimeError):
            self._pool.submit(shut)
        self._pool.shutdown(wait=False)

    # -- the reads the control endpoint makes (see reads.py) ------------------------------

    async def status_counts(self) -> dict[str, dict[str, int]]:
        return await self.run(reads.status_counts)

    async def items_by_status(
        self, watch: str | None, status: str, limit: int
    ) -> list[dict[str, Any]]:
        return await self.run(lambda c: reads.items_by_status(c, watch, status, limit))

    async def items_by_key(self, keys: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
        return await self.run(lambda c: reads.items_by_key(c, keys))

    async def item(self, watch: str, source_id: str) -> dict[str, Any] | None:
        return await self.run(lambda c: reads.item_summary(c, watch, source_id))

    async def daemons(self) -> list[dict[str, Any]]:
        """The daemons sharing a PostgreSQL ledger ([] for SQLite)."""
        if not isinstance(self.path, LedgerAt) or not self.path.shared:
            return []
        from ingestd.ledger import pg

        return await self.run(pg.daemons)

    async def recent_keys(self, max_items: int, limit: int) -> list[tuple[str, str]]:
        return await self.run(lambda c: reads.recent_keys(c, max_items, limit))
