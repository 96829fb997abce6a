"""The ledger's SQLite file: where it lives, its schema, opening it, and migrations.

One SQLite file in WAL mode under `state_dir`. WAL with synchronous=NORMAL survives a
process crash (SIGKILL) without losing committed transactions; a power cut can lose
the last few, which only means redoing a few idempotent uploads. A read-only
connection (the control endpoint, a rescan's thread) reads while the daemon writes.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

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
        _migrate(conn)
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a ledger written by an older version up to the current schema."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(entries)")}
    if "etag" not in columns:
        # Bucket objects are compared by ETag; local entries leave it NULL.
        try:
            conn.execute("ALTER TABLE entries ADD COLUMN etag TEXT")
        except sqlite3.OperationalError as e:
            if "duplicate column" not in str(e):  # another process migrated it just now
                raise


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
