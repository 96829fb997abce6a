"""The ledger in PostgreSQL: one database shared by any number of daemons.

The rule that keeps one ledger for two engines: **ops.py and reads.py are written once,
in the SQL both engines speak, and run on PostgreSQL through `PgConn`**, a connection
with sqlite3's shape (`execute`, `executemany`, cursors with `fetchone`, `fetchall`,
`rowcount`, `description`) that rewrites the few spellings that differ:

- `?` placeholders become `%s` (and a literal `%` becomes `%%`);
- `x IS ?` / `x IS NOT ?` (SQLite's null-safe comparison) become
  `IS NOT DISTINCT FROM` / `IS DISTINCT FROM`;
- `BEGIN IMMEDIATE` becomes `BEGIN`;
- ` +column` (SQLite's "do not use an index on this" hint) loses its `+`.

Values are bound on the client (psycopg's ClientCursor), as sqlite3 does, so a bare
`? IS NULL` needs no type. What only this engine has lives here and nowhere else: the
schema (double precision for REAL, bigint for sizes, text `COLLATE "C"` so keys sort
byte-wise as in SQLite, object stores and Python), item counts as append-only deltas
(see _SCHEMA), and the multi-daemon parts: claims with leases (`claim_rows`,
`renew_claims`, `release_claims`), the listing lease per watch (`hold_watch`) and the
`daemons` table (`heartbeat`, `daemons`). SQL that would differ in meaning between the
engines must not be put in ops.py or reads.py.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

import psycopg

from ingestd.ledger.reads import CLAIM_COLUMNS
from ingestd.ledger.where import LedgerAt

# Item counts: every daemon changes the same few (watch, status) rows, so a counter
# row updated in place would serialise all their transactions on its row lock (and
# deadlock when two transactions move items in opposite directions). The triggers only
# append deltas; `item_counts` is a view summing them, and `compact_counts` folds them
# into one row per (watch, status) now and then (each heartbeat), which keeps the view
# a few rows long.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    watch text COLLATE "C" NOT NULL,
    source_id text COLLATE "C" NOT NULL,
    dataset text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,
    plan text,
    desired_fp text,
    synced_fp text,
    synced_manifest text,
    status text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt double precision NOT NULL DEFAULT 0,
    last_error text,
    error_kind text,
    backend_id text,
    updated_at double precision NOT NULL,
    claimed_by text,
    lease_until double precision,
    PRIMARY KEY (watch, source_id)
);
CREATE INDEX IF NOT EXISTS items_due ON items(status, next_attempt);
CREATE INDEX IF NOT EXISTS items_key ON items(dataset, key);
CREATE INDEX IF NOT EXISTS items_watch_status ON items(watch, status, attempts);
CREATE INDEX IF NOT EXISTS items_claimed ON items(claimed_by) WHERE claimed_by IS NOT NULL;
CREATE TABLE IF NOT EXISTS entries (
    watch text COLLATE "C" NOT NULL,
    relpath text COLLATE "C" NOT NULL,
    parent text COLLATE "C" NOT NULL,
    size bigint NOT NULL,
    mtime_ns bigint NOT NULL,
    role text NOT NULL,
    etag text,
    PRIMARY KEY (watch, relpath)
);
CREATE INDEX IF NOT EXISTS entries_dir ON entries(watch, parent, relpath, size, mtime_ns);
CREATE TABLE IF NOT EXISTS meta_types (
    dataset text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,
    type text NOT NULL,
    item text COLLATE "C" NOT NULL,
    shared integer NOT NULL DEFAULT 0,
    PRIMARY KEY (dataset, key)
);
CREATE TABLE IF NOT EXISTS watch_state (
    watch text COLLATE "C" PRIMARY KEY,
    problem text,
    updated_at double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (k text PRIMARY KEY, v text NOT NULL);
CREATE TABLE IF NOT EXISTS hints (
    watch text COLLATE "C" NOT NULL,
    relpath text COLLATE "C" NOT NULL,
    kind text NOT NULL,
    etag text,
    size bigint,
    event_time double precision NOT NULL,
    noted bigint NOT NULL,
    done double precision,
    PRIMARY KEY (watch, relpath)
);
ALTER TABLE hints ADD COLUMN IF NOT EXISTS done double precision;
CREATE INDEX IF NOT EXISTS hints_done ON hints(watch, done) WHERE done IS NOT NULL;
CREATE TABLE IF NOT EXISTS item_count_deltas (
    watch text COLLATE "C" NOT NULL,
    status text NOT NULL,
    n bigint NOT NULL
);
CREATE OR REPLACE VIEW item_counts AS
    SELECT watch, status, sum(n)::bigint AS n FROM item_count_deltas GROUP BY watch, status;
CREATE OR REPLACE FUNCTION ingestd_count_items() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        IF TG_OP = 'DELETE' OR OLD.status IS DISTINCT FROM NEW.status
                OR OLD.watch IS DISTINCT FROM NEW.watch THEN
            INSERT INTO item_count_deltas VALUES (OLD.watch, OLD.status, -1);
        ELSE
            RETURN NULL;
        END IF;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO item_count_deltas VALUES (NEW.watch, NEW.status, 1);
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS items_counted ON items;
CREATE TRIGGER items_counted AFTER INSERT OR UPDATE OR DELETE ON items
    FOR EACH ROW EXECUTE FUNCTION ingestd_count_items();
CREATE TABLE IF NOT EXISTS watch_leases (
    watch text COLLATE "C" PRIMARY KEY,
    holder text NOT NULL,
    until double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS daemons (
    id text PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    started double precision NOT NULL,
    heartbeat double precision NOT NULL,
    stopped double precision
);
"""
SCHEMA_VERSION = "2"  # raise with every change of _SCHEMA (it is run again then)
_SCHEMA_LOCK = 0x1A6E57D  # advisory lock: two daemons starting at once create it once
DAEMON_FORGET = 24 * 3600.0  # a stopped or silent daemon leaves `status` after a day

_IS = re.compile(r"\bIS (NOT )?\?")
_HINT = re.compile(r"(?<=\s)\+(?=[A-Za-z_])")


@lru_cache(maxsize=1024)
def translate(sql: str, bound: bool = True) -> str:
    """SQLite's spelling of a statement → PostgreSQL's (the rules in the docstring).
    `bound`: it has parameters (psycopg reads `%` as theirs only then)."""
    if sql.strip().upper() == "BEGIN IMMEDIATE":
        return "BEGIN"
    sql = _IS.sub(lambda m: "IS DISTINCT FROM ?" if m.group(1) else "IS NOT DISTINCT FROM ?", sql)
    sql = _HINT.sub("", sql)
    return sql.replace("%", "%%").replace("?", "%s") if bound else sql


class PgConn:
    """A PostgreSQL connection with sqlite3's shape (see the module docstring). It
    reconnects by itself, between transactions, after the server went away: the
    caller sees the failed statement's error (the ledger's "cannot be written"
    problem) and the next call finds a fresh connection."""

    def __init__(self, at: LedgerAt, *, readonly: bool = False) -> None:
        self.at = at
        self.readonly = readonly
        self._raw: psycopg.Connection[Any] | None = None
        self._in_tx = False
        self._lock = threading.Lock()
        self._open()

    def _open(self) -> psycopg.Connection[Any]:
        assert self.at.dsn is not None
        raw = psycopg.connect(
            self.at.dsn,
            password=self.at.password,
            autocommit=True,
            cursor_factory=psycopg.ClientCursor,
            connect_timeout=5,
            application_name="ingestd",
        )
        if self.readonly:
            raw.execute("SET default_transaction_read_only = on")
        self._raw = raw
        return raw

    def _conn(self) -> psycopg.Connection[Any]:
        raw = self._raw
        if raw is None or raw.closed or raw.broken:
            if self._in_tx:
                raise psycopg.OperationalError("the connection to PostgreSQL was lost")
            raw = self._open()
        return raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        word = sql.lstrip()[:8].upper()
        if word.startswith("ROLLBACK") and not word.startswith("ROLLBACK TO"):
            # After a lost connection there is nothing to roll back; the server did.
            self._in_tx = False
            raw = self._raw
            if raw is None or raw.closed or raw.broken:
                return _EMPTY
        args = tuple(params)
        cur = self._conn().execute(translate(sql, bool(args)), args or None)
        if word.startswith("BEGIN"):
            self._in_tx = True
        elif word.startswith("COMMIT"):
            self._in_tx = False
        return cur

    def aborted(self) -> bool:
        """Whether the transaction under way has failed (PostgreSQL then ignores every
        statement until ROLLBACK, and turns COMMIT into a rollback without an error)."""
        raw = self._raw
        return (
            raw is not None and raw.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        )

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> psycopg.Cursor[Any]:
        cur = self._conn().cursor()
        cur.executemany(translate(sql), [tuple(r) for r in rows])
        return cur

    def executescript(self, sql: str) -> None:
        self._conn().execute(sql)

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()


class _Empty:
    rowcount = 0
    description = None

    def fetchone(self) -> None:
        return None

    def fetchall(self) -> list[Any]:
        return []

    def __iter__(self) -> Any:
        return iter(())


_EMPTY: Any = _Empty()


def connect(at: LedgerAt, *, readonly: bool = False) -> PgConn:
    conn = PgConn(at, readonly=readonly)
    if not readonly:
        raw = conn._conn()
        # Only when missing or older: replacing the trigger takes a lock on items that
        # would deadlock with the other daemons' writes.
        with raw.transaction():
            raw.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            if _schema_version(raw) != SCHEMA_VERSION:
                raw.execute(_SCHEMA)
                raw.execute(
                    "INSERT INTO settings (k, v) VALUES ('pg_schema', %s)"
                    " ON CONFLICT (k) DO UPDATE SET v=excluded.v",
                    (SCHEMA_VERSION,),
                )
    return conn


def _schema_version(raw: psycopg.Connection[Any]) -> str | None:
    row = raw.execute("SELECT to_regclass('settings') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return None
    row = raw.execute("SELECT v FROM settings WHERE k='pg_schema'").fetchone()
    return None if row is None else str(row[0])


# -- claims with leases ---------------------------------------------------------------


def claim_rows(
    conn: PgConn,
    holder: str,
    now: float,
    lease: float,
    limit: int,
    watches: Sequence[str] | None,
) -> list[tuple[Any, ...]]:
    """Claim up to `limit` due items for `holder` until now + lease, oldest due first,
    and return their rows (reads.CLAIM_COLUMNS). SKIP LOCKED: daemons claiming at the
    same moment each get other rows instead of waiting for each other; an item whose
    lease ran out (its daemon died or stalled) is due again for anyone. The rows come
    back with the claim itself: reading them apiece cost a round trip per item."""
    only = "" if watches is None else " AND watch = ANY(?)"
    rows = conn.execute(
        "UPDATE items SET claimed_by=?, lease_until=? WHERE (watch, source_id) IN ("
        " SELECT watch, source_id FROM items WHERE status='pending' AND next_attempt <= ?"
        " AND (lease_until IS NULL OR lease_until < ?)"
        f"{only} ORDER BY next_attempt LIMIT ? FOR UPDATE SKIP LOCKED)"
        f" RETURNING next_attempt, {CLAIM_COLUMNS}",
        (holder, now + lease, now, now, *([list(watches)] if watches is not None else []), limit),
    ).fetchall()
    rows.sort(key=lambda r: r[0])
    return [tuple(r[1:]) for r in rows]


def next_due_time(
    conn: PgConn, holder: str, watches: Sequence[str] | None, now: float
) -> float | None:
    """When this daemon may next claim something: the first unleased pending item's
    next attempt, or the first lease of another daemon's to run out (the item is due
    for us then). Items leased to us are in flight here and left out."""
    only = "" if watches is None else " AND watch = ANY(?)"
    args: list[Any] = [] if watches is None else [list(watches)]
    free = conn.execute(
        "SELECT next_attempt FROM items WHERE status='pending'"
        f" AND (lease_until IS NULL OR lease_until < ?){only} ORDER BY next_attempt LIMIT 1",
        (now, *args),
    ).fetchone()
    leased = conn.execute(
        "SELECT min(lease_until) FROM items WHERE claimed_by IS NOT NULL AND claimed_by != ?"
        f" AND status='pending' AND lease_until >= ?{only}",
        (holder, now, *args),
    ).fetchone()
    times = [float(r[0]) for r in (free, leased) if r is not None and r[0] is not None]
    return min(times) if times else None


def renew_claims(
    conn: PgConn, holder: str, keys: Sequence[tuple[str, str]], until: float
) -> set[tuple[str, str]]:
    """Extend `holder`'s leases on the items in flight; returns the keys it still held
    (a lease that ran out may have been claimed by another daemon meanwhile)."""
    if not keys:
        return set()
    rows = conn.execute(
        "UPDATE items SET lease_until=? WHERE claimed_by=? AND (watch, source_id) IN"
        " (SELECT * FROM unnest(?::text[], ?::text[])) RETURNING watch, source_id",
        (until, holder, [k[0] for k in keys], [k[1] for k in keys]),
    ).fetchall()
    return {(r[0], r[1]) for r in rows}


def release_claims(conn: PgConn, holder: str) -> None:
    """A stopping daemon gives its claims back at once instead of after the lease."""
    conn.execute("UPDATE items SET claimed_by=NULL, lease_until=NULL WHERE claimed_by=?", (holder,))
    conn.execute("DELETE FROM watch_leases WHERE holder=?", (holder,))


# -- the listing lease of a watch ------------------------------------------------------


def hold_watch(conn: PgConn, watch: str, holder: str, now: float, lease: float) -> tuple[bool, str]:
    """Take or renew the listing lease of `watch`: (whether `holder` has it now, who
    has it). One lister per watch; another takes over once the lease runs out."""
    row = conn.execute(
        "INSERT INTO watch_leases (watch, holder, until) VALUES (?, ?, ?)"
        " ON CONFLICT (watch) DO UPDATE SET holder=excluded.holder, until=excluded.until"
        " WHERE watch_leases.holder=excluded.holder OR watch_leases.until < ?"
        " RETURNING holder",
        (watch, holder, now + lease, now),
    ).fetchone()
    if row is not None:
        return True, holder
    row = conn.execute("SELECT holder FROM watch_leases WHERE watch=?", (watch,)).fetchone()
    return False, row[0] if row else ""


# -- daemons ---------------------------------------------------------------------------


def heartbeat(conn: PgConn, holder: str, *, stopping: bool = False) -> None:
    """Say this daemon is alive (every few seconds), or that it stopped; and fold the
    item count deltas while at it."""
    host, pid = holder.split(":")[0], int(holder.split(":")[1])
    now = time.time()
    conn.execute(
        "INSERT INTO daemons (id, host, pid, started, heartbeat, stopped)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE"
        " SET heartbeat=excluded.heartbeat, stopped=excluded.stopped",
        (holder, host, pid, now, now, now if stopping else None),
    )
    conn.execute("DELETE FROM daemons WHERE heartbeat < ?", (now - DAEMON_FORGET,))
    compact_counts(conn)


def compact_counts(conn: PgConn) -> None:
    """Fold item_count_deltas into one row per (watch, status), in one statement: the
    rows it deletes are the rows it sums, and deltas written meanwhile stay."""
    conn.execute(
        "WITH gone AS (DELETE FROM item_count_deltas RETURNING watch, status, n)"
        " INSERT INTO item_count_deltas (watch, status, n)"
        " SELECT watch, status, sum(n) FROM gone GROUP BY watch, status HAVING sum(n) != 0"
    )


def daemons(conn: Any) -> list[dict[str, Any]]:
    """Every daemon that has used the ledger lately: host, pid, start, last heartbeat,
    and when it stopped (None while it runs or if it died)."""
    rows = conn.execute(
        "SELECT id, host, pid, started, heartbeat, stopped FROM daemons ORDER BY host, started"
    ).fetchall()
    return [
        {"id": i, "host": h, "pid": p, "started": s, "heartbeat": hb, "stopped": st}
        for i, h, p, s, hb, st in rows
    ]
