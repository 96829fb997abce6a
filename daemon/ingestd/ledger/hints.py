"""Durable hints: keys a bucket's event queue named, kept until the runner has looked.

A queue message is deleted only after its keys are recorded here (op_note_hints), so a
crash between receiving and planning loses nothing: at start the runner takes every row
of its watch again (op_take_hints). A row is marked looked at (`done`, the wall time)
once its key is planned or found gone (op_drop_hint), only if no newer message named the
key meanwhile (`noted` is the recording's stamp, and a later recording raises it and
makes the row live again).

Done rows are the shared record of which keys the queue named, for the judge of a queue
that does not receive the bucket's events (pipeline/queue_hints.py): with several
daemons the one that lists is not the one that got a key's message, and by the time it
judges, the other may have planned the key long ago. So a done row stays DONE_KEEP
(10 min) and is then deleted in batches by whichever daemon runs the watch
(op_clean_hints); op_take_hints and hint_count ignore done rows, op_hinted counts them.

With a shared ledger the rows of one watch are recorded by every daemon consuming its
queue. A recording always raises a row's `noted` (to the recorder's stamp, or one past
the row's when the recorder's clock is behind) and returns the stamp it left, so a
daemon that looked at the key earlier cannot drop a row another daemon noted after it.
Rows whose recorder died before looking at them are taken by the others once they are
old (op_take_hints with `noted_before`).

Plain SQL that SQLite and PostgreSQL both accept (INSERT ... ON CONFLICT DO UPDATE,
DELETE ... WHERE), as the rest of the ledger's ops. The table is in db.py's schema.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# columns: watch, relpath, kind (created | removed), etag, size, event_time, noted,
# done (when it was looked at, wall seconds; NULL while live). pg.py has its own copy.
HINTS_TABLE = """
CREATE TABLE IF NOT EXISTS hints (
    watch TEXT NOT NULL,
    relpath TEXT NOT NULL,
    kind TEXT NOT NULL,
    etag TEXT,
    size BIGINT,
    event_time DOUBLE PRECISION NOT NULL,
    noted BIGINT NOT NULL,
    done DOUBLE PRECISION,
    PRIMARY KEY (watch, relpath)
);
"""
# Created after the column exists (db.py adds it to an older ledger first).
HINTS_DONE_INDEX = (
    "CREATE INDEX IF NOT EXISTS hints_done ON hints(watch, done) WHERE done IS NOT NULL"
)
# How long a done row is kept. The judge checks its suspects against the rows far more
# often than this (queue_hints.CHECK_EVERY), so a key named at any time while a suspect
# waits is seen, whichever daemon got its message and however long ago it planned it.
DONE_KEEP = 600.0
CLEAN_BATCH = 1000


@dataclass(frozen=True, slots=True)
class HintRow:
    relpath: str
    kind: str
    etag: str | None
    size: int | None
    event_time: float
    noted: int


def op_note_hints(
    watch: str,
    hints: Sequence[tuple[str, str, str | None, int | None, float]],
    noted: int,
) -> Callable[[sqlite3.Connection], dict[str, int]]:
    """Record (relpath, kind, etag, size, event_time) hints with the stamp `noted`. Of
    two events for one key the later by event time keeps its details; either way the
    row is noted again and live (not done), so it is looked at again: its stamp becomes
    `noted`, or one past the stamp it had if that was not lower (another daemon's clock
    ahead of ours). Returns each key's stamp as recorded: the one to drop it with."""

    def op(conn: sqlite3.Connection) -> dict[str, int]:
        stamps: dict[str, int] = {}
        for relpath, kind, etag, size, event_time in hints:
            row = conn.execute(
                "INSERT INTO hints (watch, relpath, kind, etag, size, event_time, noted)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (watch, relpath) DO UPDATE SET"
                " kind = CASE WHEN excluded.event_time >= hints.event_time"
                " THEN excluded.kind ELSE hints.kind END,"
                " etag = CASE WHEN excluded.event_time >= hints.event_time"
                " THEN excluded.etag ELSE hints.etag END,"
                " size = CASE WHEN excluded.event_time >= hints.event_time"
                " THEN excluded.size ELSE hints.size END,"
                " event_time = CASE WHEN excluded.event_time >= hints.event_time"
                " THEN excluded.event_time ELSE hints.event_time END,"
                " noted = CASE WHEN excluded.noted > hints.noted"
                " THEN excluded.noted ELSE hints.noted + 1 END,"
                " done = NULL"
                " RETURNING noted",
                (watch, relpath, kind, etag, size, event_time, noted),
            ).fetchone()
            stamps[relpath] = int(row[0])
        return stamps

    return op


def op_take_hints(
    watch: str, after: str | None = None, limit: int = 10_000, *, noted_before: int | None = None
) -> Callable[[sqlite3.Connection], list[HintRow]]:
    """The watch's live hint rows (not looked at) in key order after `after`, at most
    `limit`; with `noted_before`, only rows last noted before that stamp (left by a
    daemon that died, or whose drop failed). A read, run as an op so that it goes
    through whichever ledger engine the daemon has."""

    def op(conn: sqlite3.Connection) -> list[HintRow]:
        rows = conn.execute(
            "SELECT relpath, kind, etag, size, event_time, noted FROM hints"
            " WHERE watch = ? AND relpath > ? AND noted < ? AND done IS NULL"
            " ORDER BY relpath LIMIT ?",
            (watch, after or "", noted_before if noted_before is not None else 2**63 - 1, limit),
        ).fetchall()
        return [HintRow(*row) for row in rows]

    return op


def op_hinted(watch: str, relpaths: Sequence[str]) -> Callable[[sqlite3.Connection], set[str]]:
    """Of `relpaths`, those with a hint row, live or done: named by a message some
    daemon received, whether it has planned the key since or not (done rows are kept
    DONE_KEEP)."""

    def op(conn: sqlite3.Connection) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(relpaths), 500):
            part = list(relpaths[i : i + 500])
            marks = ", ".join("?" * len(part))
            rows = conn.execute(
                f"SELECT relpath FROM hints WHERE watch = ? AND relpath IN ({marks})",
                (watch, *part),
            ).fetchall()
            found.update(r[0] for r in rows)
        return found

    return op


def op_drop_hint(
    watch: str, relpath: str, noted: int, now: float | None = None
) -> Callable[[sqlite3.Connection], bool]:
    """Mark a hint looked at (done at `now`), unless it was noted again after `noted`.
    The row stays DONE_KEEP as the record that the queue named the key."""
    at = time.time() if now is None else now

    def op(conn: sqlite3.Connection) -> bool:
        cur = conn.execute(
            "UPDATE hints SET done = ?"
            " WHERE watch = ? AND relpath = ? AND noted <= ? AND done IS NULL",
            (at, watch, relpath, noted),
        )
        return cur.rowcount > 0

    return op


def op_clean_hints(
    watch: str, done_before: float, limit: int = CLEAN_BATCH
) -> Callable[[sqlite3.Connection], int]:
    """Delete up to `limit` of the watch's rows done before `done_before` (through the
    partial index on done rows, so a round costs what it deletes); returns how many.
    Any daemon may run it: a row noted again meanwhile is live and stays."""

    def op(conn: sqlite3.Connection) -> int:
        cur = conn.execute(
            "DELETE FROM hints WHERE watch = ? AND relpath IN"
            " (SELECT relpath FROM hints WHERE watch = ? AND done IS NOT NULL AND done < ?"
            " LIMIT ?) AND done IS NOT NULL AND done < ?",
            (watch, watch, done_before, limit, done_before),
        )
        return max(cur.rowcount, 0)

    return op


def op_clear_queue_problem(watch: str, now: float) -> Callable[[sqlite3.Connection], bool]:
    """Clear the watch's problem if it is the queue's (starting 'queue '), and only then:
    a listing's or planning's problem stays until they clear it themselves."""

    def op(conn: sqlite3.Connection) -> bool:
        cur = conn.execute(
            "UPDATE watch_state SET problem = NULL, updated_at = ?"
            " WHERE watch = ? AND problem LIKE 'queue %'",
            (now, watch),
        )
        return cur.rowcount > 0

    return op


def hint_count(conn: sqlite3.Connection, watch: str) -> int:
    """The watch's live hint rows: keys named and not looked at yet."""
    row = conn.execute(
        "SELECT count(*) FROM hints WHERE watch = ? AND done IS NULL", (watch,)
    ).fetchone()
    return int(row[0])
