"""The item catalog: which items each dataset holds, in SQLite beside the blobs.

Threads: one connection guarded by a lock. SQLite lets only one writer in at a time
anyway, and within a process a Python lock hands over at once, whereas connections
per thread would contend through SQLite's busy handler, which sleeps and polls.
Every call is a short statement or transaction, so readers queueing behind a write
cost microseconds. Processes: WAL mode lets `ingestd items` read while the daemon
writes; writers in different processes wait for each other up to busy_timeout.

Items are a WITHOUT ROWID table: the primary key is the lookup key, and clustering on
it saves writing a separate rowid b-tree page on every upsert.

Read-modify-write runs in BEGIN IMMEDIATE: in WAL mode a deferred transaction that
reads and then writes fails with SQLITE_BUSY (not retried) when another process
committed in between; taking the write lock up front makes it wait instead.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ingestd.core.model import item_key

BUSY_TIMEOUT_S = 10.0
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    dataset TEXT NOT NULL,
    path TEXT NOT NULL,
    name TEXT NOT NULL,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    slots TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (dataset, path, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_by_key ON items (dataset, key);
"""

_ITEM_COLUMNS = "path, name, key, version, slots, metadata"


def canonical_json(value: Any) -> str:
    """One spelling per value, so equal content compares equal as text. NaN and
    infinities are refused: they are not JSON and would break `ingestd items --json`."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def check_item_path(path: str, name: str) -> None:
    """Reject folder paths and names that would give one key two spellings, so that
    (dataset, key) identifies one row."""
    if not path.startswith("/") or (path != "/" and path.endswith("/")) or "//" in path:
        raise ValueError(f"item path must look like / or /a/b (got {path!r})")
    if not name or "/" in name:
        raise ValueError(f"item name must be non-empty and contain no '/' (got {name!r})")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _prefix_upper(prefix: str) -> str | None:
    """The smallest string above every string starting with `prefix` (None: no bound).

    SQLite compares TEXT as UTF-8 bytes, which orders like code points, so
    `prefix <= key < upper` selects exactly the keys starting with prefix and uses
    the index, unlike LIKE/GLOB with their escaping and case rules."""
    chars = list(prefix)
    while chars:
        cp = ord(chars.pop()) + 1
        if cp == 0xD800:  # surrogates cannot be stored, skip past them
            cp = 0xE000
        if cp <= 0x10FFFF:
            return "".join(chars) + chr(cp)
    return None


def _row_to_item(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "key": row["key"],
        "path": row["path"],
        "name": row["name"],
        "version": row["version"],
        "slots": json.loads(row["slots"]),
        "metadata": json.loads(row["metadata"]),
    }


class Catalog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,  # explicit BEGIN/COMMIT only
            check_same_thread=False,  # guarded by self._lock instead
        )
        self._conn.row_factory = sqlite3.Row
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            with self._write():
                # Not executescript: it commits first, which would end BEGIN IMMEDIATE.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds SQLite's write lock from its first statement."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT (disk full): an open transaction would make
                # every later BEGIN on this shared connection fail.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # --- datasets --------------------------------------------------------------------

    def ensure_dataset(self, name: str) -> bool:
        """Create the dataset if missing; True when it was created."""
        with self._write() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO datasets (name, created_at) VALUES (?, ?)", (name, _now())
            )
            return cur.rowcount == 1

    def has_dataset(self, name: str) -> bool:
        return bool(self._read("SELECT 1 FROM datasets WHERE name = ?", (name,)))

    def datasets(self) -> list[str]:
        return [r["name"] for r in self._read("SELECT name FROM datasets ORDER BY name")]

    # --- items -----------------------------------------------------------------------

    def upsert_item(
        self,
        dataset: str,
        path: str,
        name: str,
        slots: list[dict[str, Any]],
        metadata: dict[str, Any],
    ) -> tuple[int, bool]:
        """Store the item; returns (version, changed).

        Sending the same item again (a retry after a crash between the put and the
        caller's record of it) changes nothing and returns the current version. Any
        difference replaces slots and metadata entirely and bumps the version."""
        check_item_path(path, name)
        slots_json = canonical_json(slots)
        metadata_json = canonical_json(metadata)
        now = _now()
        with self._write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO datasets (name, created_at) VALUES (?, ?)", (dataset, now)
            )
            return self._upsert(conn, dataset, path, name, slots_json, metadata_json, now)

    def upsert_items(
        self,
        items: Sequence[tuple[str, str, str, list[dict[str, Any]], dict[str, Any]]],
    ) -> list[tuple[int, bool] | ValueError | TypeError]:
        """`upsert_item` for many (dataset, path, name, slots, metadata) in one
        transaction: per item its (version, changed), or the ValueError/TypeError that
        rejected it (bad path or name, metadata not JSON), which leaves the others alone.
        A SQLite error fails the whole batch and rolls it back. The same key twice in one
        batch behaves as two upserts in a row."""
        out: list[tuple[int, bool] | ValueError | TypeError] = []
        rows: list[tuple[int, str, str, str, str, str]] = []
        for i, (dataset, path, name, slots, metadata) in enumerate(items):
            try:
                check_item_path(path, name)
                rows.append(
                    (i, dataset, path, name, canonical_json(slots), canonical_json(metadata))
                )
            except (ValueError, TypeError) as e:
                out.append(e)
                continue
            out.append((0, False))  # replaced below
        if not rows:
            return out
        now = _now()
        with self._write() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO datasets (name, created_at) VALUES (?, ?)",
                [(d, now) for d in {r[1] for r in rows}],
            )
            for i, dataset, path, name, slots_json, metadata_json in rows:
                out[i] = self._upsert(conn, dataset, path, name, slots_json, metadata_json, now)
        return out

    @staticmethod
    def _upsert(
        conn: sqlite3.Connection,
        dataset: str,
        path: str,
        name: str,
        slots_json: str,
        metadata_json: str,
        now: str,
    ) -> tuple[int, bool]:
        row = conn.execute(
            "SELECT version, slots, metadata FROM items WHERE dataset = ? AND path = ? AND name = ?",
            (dataset, path, name),
        ).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO items (dataset, path, name, key, version, slots, metadata, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?)",
                (dataset, path, name, item_key(path, name), slots_json, metadata_json, now, now),
            )
            return 1, True
        if row[1] == slots_json and row[2] == metadata_json:
            return row[0], False
        version = row[0] + 1
        conn.execute(
            "UPDATE items SET version = ?, slots = ?, metadata = ?, updated_at = ? "
            "WHERE dataset = ? AND path = ? AND name = ?",
            (version, slots_json, metadata_json, now, dataset, path, name),
        )
        return version, True

    def delete_item(self, dataset: str, path: str, name: str) -> bool:
        with self._write() as conn:
            cur = conn.execute(
                "DELETE FROM items WHERE dataset = ? AND path = ? AND name = ?",
                (dataset, path, name),
            )
            return cur.rowcount == 1

    def get_item(self, dataset: str, path: str, name: str) -> dict[str, Any] | None:
        rows = self._read(
            f"SELECT {_ITEM_COLUMNS} FROM items WHERE dataset = ? AND path = ? AND name = ?",
            (dataset, path, name),
        )
        return _row_to_item(rows[0]) if rows else None

    def list_items(
        self,
        dataset: str,
        prefix: str | None = None,
        limit: int | None = None,
        after_key: str | None = None,
    ) -> list[dict[str, Any]]:
        """Items ordered by key; `prefix` matches the start of the key, `after_key`
        and `limit` page through a large dataset."""
        where = ["dataset = ?"]
        params: list[Any] = [dataset]
        if prefix:
            where.append("key >= ?")
            params.append(prefix)
            upper = _prefix_upper(prefix)
            if upper is not None:
                where.append("key < ?")
                params.append(upper)
        if after_key is not None:
            where.append("key > ?")
            params.append(after_key)
        sql = f"SELECT {_ITEM_COLUMNS} FROM items WHERE {' AND '.join(where)} ORDER BY key"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_row_to_item(r) for r in self._read(sql, tuple(params))]

    def count_items(self, dataset: str) -> int:
        return int(self._read("SELECT count(*) FROM items WHERE dataset = ?", (dataset,))[0][0])

    def referenced_digests(self) -> set[str]:
        """Every blob digest some item's slots point at (what a garbage collector keeps)."""
        rows = self._read(
            "SELECT DISTINCT json_extract(f.value, '$.digest') AS digest "
            "FROM items, json_each(items.slots) AS s, json_each(s.value, '$.files') AS f "
            "WHERE json_extract(f.value, '$.digest') IS NOT NULL"
        )
        return {r["digest"] for r in rows}
