"""`Ledger`: one connection to the ledger, its transactions, and its reads as methods.

Not thread-safe by itself: the daemon drives it through AsyncLedger's single thread;
CLI commands use it directly in their own process. The SQL lives in reads.py and
ops.py; the methods here only bind them to this connection, and the `op_*` names stay
reachable as `Ledger.op_*` for the callers that build ops from the class.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ingestd.ledger import ops as write_ops
from ingestd.ledger import reads
from ingestd.ledger.db import LEDGER_FILE, connect
from ingestd.ledger.model import Claim, WatchCounts


class Failed:
    """One op's exception, returned in its place by Ledger.transaction."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class Ledger:
    """Synchronous ledger operations over one connection."""

    def __init__(self, state_dir: Path, *, readonly: bool = False) -> None:
        self.path = Path(state_dir) / LEDGER_FILE
        self.conn = connect(self.path, readonly=readonly)

    def close(self) -> None:
        self.conn.close()

    # -- transactions -------------------------------------------------------------------

    def transaction(self, ops: Sequence[Callable[[sqlite3.Connection], Any]]) -> list[Any]:
        """Run ops in one transaction; one op's exception is returned, not raised, so a
        bad op cannot roll back the others' work."""
        results: list[Any] = []
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                self.conn.execute("SAVEPOINT op")
                try:
                    results.append(op(self.conn))
                    self.conn.execute("RELEASE op")
                except Exception as e:
                    self.conn.execute("ROLLBACK TO op")
                    self.conn.execute("RELEASE op")
                    results.append(Failed(e))
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return results

    def retry(
        self, watch: str | None = None, now: float | None = None, source_id: str | None = None
    ) -> int:
        """Queue failed items again, in a transaction of its own (see ops.retry)."""
        return write_ops.retry(self.conn, watch, now, source_id)

    # -- reads (see reads.py) -----------------------------------------------------------

    def counts(self) -> dict[str, WatchCounts]:
        return reads.counts(self.conn)

    def pending_state(self, watches: list[str], max_attempts: int) -> dict[str, tuple[int, int]]:
        return reads.pending_state(self.conn, watches, max_attempts)

    def last_errors(self, watch: str, limit: int = 10) -> list[dict[str, str]]:
        return reads.last_errors(self.conn, watch, limit)

    def failed_items(
        self, watch: str | None, limit: int, offset: int = 0
    ) -> tuple[int, list[dict[str, Any]]]:
        return reads.failed_items(self.conn, watch, limit, offset)

    def watch_problems(self) -> dict[str, str]:
        return reads.watch_problems(self.conn)

    def live_count(self, watch: str) -> int:
        return reads.live_count(self.conn, watch)

    def entries_in_dir(self, watch: str, parent: str) -> dict[str, tuple[int, int]]:
        return reads.entries_in_dir(self.conn, watch, parent)

    def entry_dirs(self, watch: str, under: str) -> set[str]:
        return reads.entry_dirs(self.conn, watch, under)

    def known_items(self, watch: str, relpaths: Sequence[str]) -> list[tuple[str, str]]:
        return reads.known_items(self.conn, watch, relpaths)

    def entries_between(
        self, watch: str, after: str | None, upto: str | None
    ) -> dict[str, tuple[int, int, str | None]]:
        return reads.entries_between(self.conn, watch, after, upto)

    def group_items(self, watch: str, group_dir: str) -> list[str]:
        return reads.group_items(self.conn, watch, group_dir)

    def item_row(self, watch: str, source_id: str) -> dict[str, Any] | None:
        return reads.item_row(self.conn, watch, source_id)

    def due(
        self,
        now: float,
        limit: int,
        exclude: Iterable[tuple[str, str]] = (),
        watches: Sequence[str] | None = None,
    ) -> list[Claim]:
        return reads.due(self.conn, now, limit, exclude, watches)

    def next_due_time(
        self, watches: Sequence[str] | None = None, exclude: Iterable[tuple[str, str]] = ()
    ) -> float | None:
        return reads.next_due_time(self.conn, watches, exclude)

    def key_owner(
        self, dataset: str, key: str, watch: str, source_id: str
    ) -> tuple[str, str] | None:
        return reads.key_owner(self.conn, dataset, key, watch, source_id)

    # -- write ops (see ops.py): each returns an op for transaction() ------------------------

    op_apply_plan = staticmethod(write_ops.op_apply_plan)
    op_plan_failed = staticmethod(write_ops.op_plan_failed)
    op_put_entries = staticmethod(write_ops.op_put_entries)
    op_gone = staticmethod(write_ops.op_gone)
    op_drop_items = staticmethod(write_ops.op_drop_items)
    op_synced = staticmethod(write_ops.op_synced)
    op_synced_many = staticmethod(write_ops.op_synced_many)
    op_retry_later = staticmethod(write_ops.op_retry_later)
    op_failed = staticmethod(write_ops.op_failed)
    op_set_problem = staticmethod(write_ops.op_set_problem)
