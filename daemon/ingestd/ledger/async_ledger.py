"""`AsyncLedger`: the daemon's view of the ledger, from the event loop.

Writes are group-committed: the daemon funnels every write through here, which runs
them on one thread and commits whatever queued up while the previous transaction ran
as a single transaction. After a crash the ledger alone says what still needs doing:
an item is `pending` until a sink has confirmed it, and nothing about progress lives
only in memory.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ingestd.ledger.ledger import Failed, Ledger

T = TypeVar("T")


class AsyncLedger:
    """The daemon's view of the ledger: every call runs on one dedicated thread, and
    writes submitted while a transaction runs are committed together in the next one."""

    def __init__(self, state_dir: Path) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ledger")
        self._ledger: Ledger | None = None
        self._state_dir = state_dir
        self._batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._flushing = False
        self._flusher: asyncio.Task[None] | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._ledger = await loop.run_in_executor(self._executor, Ledger, self._state_dir)

    @property
    def sync(self) -> Ledger:
        assert self._ledger is not None, "ledger not opened"
        return self._ledger

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a read (or a non-batched write) on the ledger thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._batch.append((op, fut))
        if not self._flushing:
            self._flushing = True
            self._flusher = loop.create_task(self._flush())
        return await fut

    async def write_many(self, ops: Sequence[Callable[[sqlite3.Connection], T]]) -> list[T]:
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
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e if isinstance(e, Exception) else RuntimeError(e))
                    if not isinstance(e, Exception):
                        raise
                    continue
                for (_, fut), result in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(result, Failed):
                        fut.set_exception(result.error)
                    else:
                        fut.set_result(result)
        finally:
            self._flushing = False

    async def close(self) -> None:
        while self._flushing or self._batch:
            await asyncio.sleep(0.01)
        if self._ledger is not None:
            await self.call(self._ledger.close)
        self._executor.shutdown(wait=True)
