"""Small parts the watch runner shares with its helpers: a unit of planning work, and
the ledger's entries seen as a source's `Known` (core.source)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field

from ingestd.core.model import Entry
from ingestd.ledger import AsyncLedger, connect, entries_in_dir, entry_dirs


@dataclass(slots=True)
class PlanWork:
    """A unit of planning: settled files, group folders to (re)plan, gone sidecars."""

    entries: list[Entry] = field(default_factory=list)
    groups: set[str] = field(default_factory=set)
    forced: bool = False  # plan the groups even if files in them are still settling
    sidecars_gone: list[str] = field(default_factory=list)


@dataclass(slots=True)
class PassStats:
    """What one listing pass found (the runner keeps the last one)."""

    files: int = 0  # files listed that the watch takes
    changed: int = 0  # new or changed
    gone: int = 0
    errors: int = 0  # unreadable paths (not gone)
    seconds: float = 0.0


class _Reader:
    def __init__(self, conn: sqlite3.Connection, watch: str) -> None:
        self.conn = conn
        self.watch = watch

    def in_dir(self, parent: str) -> dict[str, tuple[int, int]]:
        return entries_in_dir(self.conn, self.watch, parent)

    def dirs(self, under: str) -> set[str]:
        return entry_dirs(self.conn, self.watch, under)


class LedgerKnown:
    """What the ledger knows of one watch's files (core.source.Known)."""

    def __init__(self, ledger: AsyncLedger, watch: str) -> None:
        self.ledger = ledger
        self.watch = watch

    @contextlib.contextmanager
    def reader(self) -> Iterator[_Reader]:
        # A walk runs in its own thread: it reads through its own read-only connection,
        # so the ledger's writer thread is never held up by it.
        conn = connect(self.ledger.sync.path, readonly=True)
        try:
            yield _Reader(conn, self.watch)
        finally:
            conn.close()

    async def between(
        self, after: str | None, upto: str | None
    ) -> dict[str, tuple[int, int, str | None]]:
        return await self.ledger.call(self.ledger.sync.entries_between, self.watch, after, upto)
