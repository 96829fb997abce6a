"""`Ledger`: one connection to the ledger, its transactions, and its reads as methods.

Not thread-safe by itself: the daemon drives it through AsyncLedger's single thread;
CLI commands use it directly in their own process. The SQL lives in reads.py and
ops.py; the methods here only bind them to this connection, and the `op_*` names stay
reachable as `Ledger.op_*` for the callers that build ops from the class.

Either engine (where.py): the interface is the same. What differs is behind a few
methods: claims (`due`) are kept in memory by the SQLite daemon (one per state_dir) and
are leases in PostgreSQL (`pg.claim_rows`), renewed by `renew` and given back by
`close`; `hold_watch` and `heartbeat` are no-ops with SQLite.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ingestd.ledger import ops as write_ops
from ingestd.ledger import reads
from ingestd.ledger.engine import Conn, connect
from ingestd.ledger.model import Claim, WatchCounts
from ingestd.ledger.where import LedgerAt

# PostgreSQL errors after which the whole transaction is run again: another daemon's
# transaction locked the same rows in the other order, or a schema create raced.
_RERUN = ("40P01", "40001", "23505")
RERUNS = 5


def _aborted() -> RuntimeError:
    # PostgreSQL: an op caught a failed statement of its own and went on. The
    # transaction is aborted all the same (RELEASE would pass the abort on to the
    # next op, and COMMIT would roll everything back without an error): the op failed.
    return RuntimeError("the op caught a failed statement; its transaction was aborted")


class Failed:
    """One op's exception, returned in its place by Ledger.transaction."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class Ledger:
    """Synchronous ledger operations over one connection."""

    def __init__(self, where: Path | LedgerAt, *, readonly: bool = False) -> None:
        self.at = LedgerAt.of(where)
        # What engine.connect opens for another connection to the same ledger.
        self.path: Path | LedgerAt = self.at if self.at.shared else self.at.sqlite_path
        self.readonly = readonly
        self.conn: Conn = connect(self.at, readonly=readonly)
        self._beating = False  # a daemon's ledger: says in `daemons` that it stopped

    @property
    def shared(self) -> bool:
        return self.at.shared

    def close(self) -> None:
        if self.shared and not self.readonly:
            from ingestd.ledger import pg

            try:
                pg.release_claims(self.conn, self.at.holder)
                if self._beating:
                    pg.heartbeat(self.conn, self.at.holder, stopping=True)
            except Exception:  # the server is gone: the leases run out by themselves
                pass
        self.conn.close()

    # -- transactions -------------------------------------------------------------------

    def transaction(self, ops: Sequence[Callable[[Conn], Any]]) -> list[Any]:
        """Run ops in one transaction; one op's exception is returned, not raised, so a
        bad op cannot roll back the others' work. In PostgreSQL a transaction that lost
        a deadlock to another daemon's is run again whole (ops are functions of the
        connection, so running one again redoes it against the rows as they are now)."""
        for attempt in range(RERUNS):
            try:
                return self._transaction(ops)
            except Exception as e:
                if not self.shared or attempt == RERUNS - 1:
                    raise
                if getattr(e, "sqlstate", None) not in _RERUN:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _transaction(self, ops: Sequence[Callable[[Conn], Any]]) -> list[Any]:
        if self.shared:
            results = self._transaction_at_once(ops)
            if results is not None:
                return results
        return self._transaction_per_op(ops)

    def _transaction_at_once(self, ops: Sequence[Callable[[Conn], Any]]) -> list[Any] | None:
        """PostgreSQL: the ops without a savepoint each (two round trips per op saved);
        None, with nothing written, when one of them failed. Then the caller runs them
        all again with a savepoint each, so the failing op alone is left out: the
        others' work is never rolled back with it, as the per-op path guarantees. Ops
        are functions of the connection (the deadlock re-run relies on it too), so the
        second run does against the rows as they are what the first would have done."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            results = [op(self.conn) for op in ops]
            if self.conn.aborted():
                raise _aborted()
        except Exception:
            self.conn.execute("ROLLBACK")
            return None
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return results

    def _transaction_per_op(self, ops: Sequence[Callable[[Conn], Any]]) -> list[Any]:
        results: list[Any] = []
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                self.conn.execute("SAVEPOINT op")
                try:
                    result = op(self.conn)
                    if self.shared and self.conn.aborted():
                        raise _aborted()
                    self.conn.execute("RELEASE op")
                    results.append(result)
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
        """Due items, claimed: in PostgreSQL leased to this daemon for `at.lease`
        seconds (renew them with `renew` while they are in flight); with SQLite only the
        caller's memory holds them, so it passes what it has in flight as `exclude`."""
        if not self.shared:
            return reads.due(self.conn, now, limit, exclude, watches)
        from ingestd.ledger import pg

        skip = set(exclude)
        rows = pg.claim_rows(self.conn, self.at.holder, now, self.at.lease, limit, watches)
        # An item of ours whose lease ran out while in flight is ours already.
        claims = reads.claims_from_rows(self.conn, [r for r in rows if (r[0], r[1]) not in skip])
        return [dataclasses.replace(c, holder=self.at.holder) for c in claims]

    def renew(self, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Extend the leases of the items in flight; returns those still held, the rest
        were taken by another daemon after their lease ran out (PostgreSQL; with SQLite
        claims live in memory and every key is held)."""
        if not self.shared or not keys:
            return set(keys)
        from ingestd.ledger import pg

        return pg.renew_claims(self.conn, self.at.holder, keys, time.time() + self.at.lease)

    def hold_watch(self, watch: str) -> tuple[bool, str]:
        """Take or renew the listing lease of `watch`: (whether this daemon lists it,
        who does). With SQLite this daemon always does."""
        if not self.shared:
            return True, self.at.holder
        from ingestd.ledger import pg

        return pg.hold_watch(self.conn, watch, self.at.holder, time.time(), self.at.lease)

    def heartbeat(self) -> None:
        """This daemon is alive (the `daemons` table of a shared ledger)."""
        if self.shared:
            from ingestd.ledger import pg

            pg.heartbeat(self.conn, self.at.holder)
            self._beating = True

    def daemons(self) -> list[dict[str, Any]]:
        """The daemons sharing this ledger ([] with SQLite: the pid file says)."""
        if not self.shared:
            return []
        from ingestd.ledger import pg

        return pg.daemons(self.conn)

    def next_due_time(
        self, watches: Sequence[str] | None = None, exclude: Iterable[tuple[str, str]] = ()
    ) -> float | None:
        if not self.shared:
            return reads.next_due_time(self.conn, watches, exclude)
        from ingestd.ledger import pg

        return pg.next_due_time(self.conn, self.at.holder, watches, time.time())

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
