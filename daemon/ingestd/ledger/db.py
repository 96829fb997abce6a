"""The ledger's SQLite file: where it lives, its schema, opening it, and migrations.

One SQLite file in WAL mode under `state_dir`. WAL with synchronous=NORMAL survives a
process crash (SIGKILL) without losing committed transactions; a power cut can lose
the last few, which only means redoing a few idempotent uploads. A read-only
connection (the control endpoint, a rescan's thread) reads while the daemon writes.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ingestd.ledger.hints import HINTS_DONE_INDEX, HINTS_TABLE

LEDGER_FILE = "ledger.sqlite"

# status values
PENDING = "pending"
SYNCED = "synced"
FAILED = "failed"
DELETED = "deleted"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    watch TEXT NOT NULL,
    source_id TEXT NOT NULL,
    dataset TEXT NOT NULL,
    key TEXT NOT NULL,
    plan TEXT,
    desired_fp TEXT,
    synced_fp TEXT,
    synced_manifest TEXT,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    error_kind TEXT,
    backend_id TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (watch, source_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_due ON items(status, next_attempt);
CREATE INDEX IF NOT EXISTS items_key ON items(dataset, key);
CREATE TABLE IF NOT EXISTS entries (
    watch TEXT NOT NULL,
    relpath TEXT NOT NULL,
    parent TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    role TEXT NOT NULL,
    etag TEXT,
    PRIMARY KEY (watch, relpath)
) WITHOUT ROWID;
DROP INDEX IF EXISTS entries_parent;
CREATE INDEX IF NOT EXISTS items_watch_status ON items(watch, status, attempts);
-- Covering: a rescan reads a folder's entries from the index alone.
CREATE INDEX IF NOT EXISTS entries_dir ON entries(watch, parent, relpath, size, mtime_ns);
CREATE TABLE IF NOT EXISTS meta_types (
    dataset TEXT NOT NULL,
    key TEXT NOT NULL,
    type TEXT NOT NULL,
    item TEXT NOT NULL,
    shared INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (dataset, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS watch_state (
    watch TEXT PRIMARY KEY,
    problem TEXT,
    updated_at REAL NOT NULL
);
"""

# entry roles
ITEM = "item"
SIDECAR = "sidecar"
MEMBER = "member"  # a file of a grouped item; the item's source_id is its group folder


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, timeout=10, check_same_thread=False
        )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        conn.executescript(HINTS_TABLE)  # bucket queue hints (hints.py)
        _migrate(conn)
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


# Items per (watch, status), kept by triggers in the transaction that changes the items,
# so that status, /metrics and the systemd STATUS= tick read a few rows instead of
# counting the whole ledger every few seconds (issue 16). Every write in ops.py stays
# counted without knowing of it. Rows that fall to 0 stay (left out by the reads).
_COUNTS = (
    """CREATE TABLE item_counts (
    watch TEXT,
    status TEXT,
    n INTEGER NOT NULL,
    PRIMARY KEY (watch, status)
)""",
    """CREATE TRIGGER item_counts_insert AFTER INSERT ON items BEGIN
    INSERT INTO item_counts (watch, status, n) VALUES (NEW.watch, NEW.status, 1)
    ON CONFLICT (watch, status) DO UPDATE SET n = n + 1;
END""",
    """CREATE TRIGGER item_counts_delete AFTER DELETE ON items BEGIN
    UPDATE item_counts SET n = n - 1 WHERE watch = OLD.watch AND status = OLD.status;
END""",
    """CREATE TRIGGER item_counts_update AFTER UPDATE OF status, watch ON items
WHEN OLD.status IS NOT NEW.status OR OLD.watch IS NOT NEW.watch BEGIN
    UPDATE item_counts SET n = n - 1 WHERE watch = OLD.watch AND status = OLD.status;
    INSERT INTO item_counts (watch, status, n) VALUES (NEW.watch, NEW.status, 1)
    ON CONFLICT (watch, status) DO UPDATE SET n = n + 1;
END""",
)


def _add_item_counts(conn: sqlite3.Connection) -> None:
    """Create item_counts and its triggers, filled from the items, in one transaction:
    no write can fall between the count and the triggers. Another process opening the
    same ledger at the same moment waits for the lock and then finds the table."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='item_counts'"
        ).fetchone()
        if not exists:
            for statement in _COUNTS:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO item_counts (watch, status, n)"
                " SELECT watch, status, count(*) FROM items GROUP BY watch, status"
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a ledger written by an older version up to the current schema."""
    has_counts = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='item_counts'"
    ).fetchone()
    if not has_counts:
        _add_item_counts(conn)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(entries)")}
    if "etag" not in columns:
        # Bucket objects are compared by ETag; local entries leave it NULL.
        try:
            conn.execute("ALTER TABLE entries ADD COLUMN etag TEXT")
        except sqlite3.OperationalError as e:
            if "duplicate column" not in str(e):  # another process migrated it just now
                raise
    # The lease columns of a shared ledger (pg.py): always NULL here, where claims live in
    # memory, but present so that ops.py's outcome ops are the same SQL for both engines.
    items = {row[1] for row in conn.execute("PRAGMA table_info(items)")}
    for column, kind in (("claimed_by", "TEXT"), ("lease_until", "REAL")):
        if column not in items:
            try:
                conn.execute(f"ALTER TABLE items ADD COLUMN {column} {kind}")
            except sqlite3.OperationalError as e:
                if "duplicate column" not in str(e):
                    raise
    # Hint rows are marked looked at, not deleted, so that the queue's judge can tell
    # which keys it named (hints.py).
    if "done" not in {row[1] for row in conn.execute("PRAGMA table_info(hints)")}:
        try:
            conn.execute("ALTER TABLE hints ADD COLUMN done REAL")
        except sqlite3.OperationalError as e:
            if "duplicate column" not in str(e):
                raise
    conn.execute(HINTS_DONE_INDEX)


def ensure_settings(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS settings (k TEXT PRIMARY KEY, v TEXT NOT NULL)")


def setting(conn: sqlite3.Connection, k: str) -> str | None:
    ensure_settings(conn)
    row = conn.execute("SELECT v FROM settings WHERE k=?", (k,)).fetchone()
    return None if row is None else str(row[0])


def set_setting(conn: sqlite3.Connection, k: str, v: str) -> None:
    conn.execute(
        "INSERT INTO settings (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v=excluded.v",
        (k, v),
    )
