"""The durable sync state: what each item should be, what was last synced, what failed.

One SQLite file in WAL mode under `state_dir`. After a crash the ledger alone says what
still needs doing: an item is `pending` until a sink has confirmed it, and nothing
about progress lives only in memory.

Writes are group-committed: the daemon funnels every write through `AsyncLedger`,
which runs them on one thread and commits whatever queued up while the previous
transaction ran as a single transaction. WAL with synchronous=NORMAL survives a
process crash (SIGKILL) without losing committed transactions; a power cut can lose
the last few, which only means redoing a few idempotent uploads.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ingestd.core.model import Entry, ItemPlan

T = TypeVar("T")

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


@dataclass(frozen=True, slots=True)
class Claim:
    """A due item handed to a sync worker."""

    watch: str
    source_id: str
    dataset: str
    key: str
    plan: ItemPlan | None  # None: the item should no longer exist (delete it)
    desired_fp: str | None
    synced_manifest: dict[str, Any] | None
    attempts: int
    backend_id: str | None
    key_owner: tuple[str, str] | None = None  # another live item holding this key
    planned_at: float = 0.0  # items.updated_at when claimed: planned, or its last retry set


@dataclass(frozen=True, slots=True)
class WatchCounts:
    synced: int = 0
    pending: int = 0
    failed: int = 0
    deleted: int = 0


LedgerOp = Callable[[sqlite3.Connection], Any]
ConflictCheck = Callable[[Mapping[str, Any], Mapping[str, tuple[str, str]]], list[str]]
TypeOf = Callable[[Any], str | None]


class Ledger:
    """Synchronous ledger operations over one connection. Not thread-safe by itself:
    the daemon drives it through AsyncLedger's single thread; CLI commands use it
    directly in their own process."""

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
                    results.append(_Failed(e))
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return results

    # -- reads --------------------------------------------------------------------------

    def counts(self) -> dict[str, WatchCounts]:
        out: dict[str, dict[str, int]] = {}
        for watch, status, n in self.conn.execute(
            "SELECT watch, status, count(*) FROM items GROUP BY watch, status"
        ):
            out.setdefault(watch, {})[status] = n
        return {w: WatchCounts(**c) for w, c in out.items()}

    def last_errors(self, watch: str, limit: int = 10) -> list[dict[str, str]]:
        rows = self.conn.execute(
            "SELECT key, source_id, last_error FROM items WHERE watch=? AND last_error IS NOT NULL"
            " AND status IN ('failed', 'pending') ORDER BY status='pending', updated_at DESC"
            " LIMIT ?",
            (watch, limit),
        )
        return [{"item": key or source_id, "error": err} for key, source_id, err in rows]

    def watch_problems(self) -> dict[str, str]:
        return dict(
            self.conn.execute("SELECT watch, problem FROM watch_state WHERE problem IS NOT NULL")
        )

    def live_count(self, watch: str) -> int:
        (n,) = self.conn.execute(
            "SELECT count(*) FROM items WHERE watch=? AND status != 'deleted'", (watch,)
        ).fetchone()
        return int(n)

    def known_items(self, watch: str, relpaths: Sequence[str]) -> list[tuple[str, str]]:
        """(relpath, role) of those relpaths that are files of items (role item or member)."""
        out: list[tuple[str, str]] = []
        for i in range(0, len(relpaths), 500):
            chunk = relpaths[i : i + 500]
            out += self.conn.execute(
                "SELECT relpath, role FROM entries WHERE watch=? AND role IN ('item', 'member')"
                f" AND relpath IN ({','.join('?' * len(chunk))})",
                (watch, *chunk),
            ).fetchall()
        return out

    def entries_between(
        self, watch: str, after: str | None, upto: str | None
    ) -> dict[str, tuple[int, int, str | None]]:
        """relpath → (size, mtime_ns, etag) of the entries with after < relpath <= upto
        (None: unbounded), in key order: one page of a bucket listing's diff."""
        where, args = "watch=?", [watch]
        if after is not None:
            where += " AND relpath > ?"
            args.append(after)
        if upto is not None:
            where += " AND relpath <= ?"
            args.append(upto)
        rows = self.conn.execute(
            f"SELECT relpath, size, mtime_ns, etag FROM entries WHERE {where} ORDER BY relpath",
            args,
        )
        return {rel: (size, mtime, etag) for rel, size, mtime, etag in rows}

    def group_items(self, watch: str, group_dir: str) -> list[str]:
        """Live items planned from a group folder (one, or one per series)."""
        return [
            sid
            for (sid,) in self.conn.execute(
                "SELECT source_id FROM items WHERE watch=? AND status != 'deleted'"
                " AND (source_id=? OR (source_id >= ? AND source_id < ?))",
                (watch, group_dir, group_dir + "#", group_dir + "$"),
            )
        ]

    def item_row(self, watch: str, source_id: str) -> dict[str, Any] | None:
        cur = self.conn.execute(
            "SELECT * FROM items WHERE watch=? AND source_id=?", (watch, source_id)
        )
        row = cur.fetchone()
        if row is None:
            return None
        return dict(zip([d[0] for d in cur.description], row, strict=True))

    def due(
        self,
        now: float,
        limit: int,
        exclude: Iterable[tuple[str, str]] = (),
        watches: Sequence[str] | None = None,
    ) -> list[Claim]:
        """Pending items of `watches` (all when None) whose next attempt is due, oldest
        first. Items of watches no longer configured stay in the ledger untouched."""
        skip = set(exclude)
        out: list[Claim] = []
        only = ""
        if watches is not None:
            only = f" AND watch IN ({','.join('?' * len(watches))})"
        # Keys first, from the index alone: the items being synced now are due too and
        # come first, and reading their whole rows (plans, manifests) on every call
        # cost more than the rows wanted.
        keys = [
            k
            for k in self.conn.execute(
                f"SELECT watch, source_id FROM items WHERE status='pending' AND next_attempt <= ?"
                f"{only} ORDER BY next_attempt LIMIT ?",
                (now, *(watches or ()), limit + len(skip)),
            )
            if k not in skip
        ][:limit]
        for w, sid in keys:
            row = self.conn.execute(
                "SELECT dataset, key, plan, desired_fp, synced_manifest, attempts, backend_id,"
                " updated_at FROM items WHERE watch=? AND source_id=? AND status='pending'",
                (w, sid),
            ).fetchone()
            if row is None:  # gone since the first query (another process)
                continue
            ds, key, plan, dfp, sm, att, bid, at = row
            out.append(
                Claim(
                    w,
                    sid,
                    ds,
                    key,
                    ItemPlan.from_json(json.loads(plan)) if plan else None,
                    dfp,
                    json.loads(sm) if sm else None,
                    att,
                    bid,
                    # Checked here again because `ingestd retry` re-queues conflicted items.
                    self.key_owner(ds, key, w, sid) if plan else None,
                    planned_at=at,
                )
            )
        return out

    def next_due_time(
        self, watches: Sequence[str] | None = None, exclude: Iterable[tuple[str, str]] = ()
    ) -> float | None:
        """When the next pending item of `watches` (all when None) is due, leaving out
        the (watch, source_id) items in `exclude` (e.g. those being synced now)."""
        only = ""
        if watches is not None:
            only = f" AND watch IN ({','.join('?' * len(watches))})"
        skip = set(exclude)
        rows = self.conn.execute(
            f"SELECT watch, source_id, next_attempt FROM items WHERE status='pending'{only}"
            " ORDER BY next_attempt LIMIT ?",
            (*(watches or ()), len(skip) + 1),
        )
        for w, sid, at in rows:
            if (w, sid) not in skip:
                return float(at)
        return None

    def key_owner(
        self, dataset: str, key: str, watch: str, source_id: str
    ) -> tuple[str, str] | None:
        """Another live item that already holds this dataset key, if any."""
        return _key_owner(self.conn, dataset, key, watch, source_id)

    # -- writes (each is an op for transaction(); also callable directly) -------------------

    @staticmethod
    def op_apply_plan(
        watch: str,
        dataset: str,
        plan: ItemPlan,
        entries: Sequence[tuple[Entry, str]],
        check_types: ConflictCheck,
        type_of: TypeOf,
        now: float,
    ) -> Callable[[sqlite3.Connection], str]:
        """Record what an item should now be. Returns 'unchanged', 'pending' or 'failed'."""

        def op(conn: sqlite3.Connection) -> str:
            _put_entries(conn, watch, entries)
            row = conn.execute(
                "SELECT desired_fp, status, dataset FROM items WHERE watch=? AND source_id=?",
                (watch, plan.source_id),
            ).fetchone()
            # The dataset is the watch's, not part of the plan: an edit of it is a change.
            if row and row[0] == plan.fingerprint and row[1] != DELETED and row[2] == dataset:
                return "unchanged"
            error, kind = _plan_problem(conn, watch, dataset, plan, check_types, type_of)
            status = FAILED if error else PENDING
            conn.execute(
                "INSERT INTO items (watch, source_id, dataset, key, plan, desired_fp, status,"
                " attempts, next_attempt, last_error, error_kind, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)"
                " ON CONFLICT (watch, source_id) DO UPDATE SET dataset=excluded.dataset,"
                " key=excluded.key, plan=excluded.plan, desired_fp=excluded.desired_fp,"
                " status=excluded.status, attempts=0, next_attempt=excluded.next_attempt,"
                " last_error=excluded.last_error, error_kind=excluded.error_kind,"
                " updated_at=excluded.updated_at",
                (
                    watch,
                    plan.source_id,
                    dataset,
                    plan.key,
                    plan.dumps(),
                    plan.fingerprint,
                    status,
                    now,
                    error,
                    kind,
                    now,
                ),
            )
            return status

        return op

    @staticmethod
    def op_plan_failed(
        watch: str,
        dataset: str,
        source_id: str,
        key: str,
        fingerprint: str,
        entries: Sequence[tuple[Entry, str]],
        reason: str,
        now: float,
    ) -> Callable[[sqlite3.Connection], str]:
        """The files could not be turned into an item (bad sidecar, unreadable header)."""

        def op(conn: sqlite3.Connection) -> str:
            _put_entries(conn, watch, entries)
            conn.execute(
                "INSERT INTO items (watch, source_id, dataset, key, plan, desired_fp, status,"
                " attempts, next_attempt, last_error, error_kind, updated_at)"
                " VALUES (?, ?, ?, ?, NULL, ?, 'failed', 1, ?, ?, 'plan', ?)"
                " ON CONFLICT (watch, source_id) DO UPDATE SET key=excluded.key,"
                " desired_fp=excluded.desired_fp, status='failed', attempts=attempts+1,"
                " last_error=excluded.last_error, error_kind='plan', updated_at=excluded.updated_at",
                (watch, source_id, dataset, key, fingerprint, now, reason, now),
            )
            return FAILED

        return op

    @staticmethod
    def op_put_entries(
        watch: str, entries: Sequence[tuple[Entry, str]]
    ) -> Callable[[sqlite3.Connection], None]:
        return lambda conn: _put_entries(conn, watch, entries)

    @staticmethod
    def op_gone(
        watch: str, relpaths: Sequence[str], on_delete: str, now: float
    ) -> Callable[[sqlite3.Connection], dict[str, list[str]]]:
        """Files that left the source. Items they were the source of become deleted
        (on_delete: keep) or pending a delete (on_delete: delete). Returns the relpaths
        that were sidecars or group members, whose items must be planned again."""

        def op(conn: sqlite3.Connection) -> dict[str, list[str]]:
            replan: dict[str, list[str]] = {SIDECAR: [], MEMBER: []}
            for relpath in relpaths:
                row = conn.execute(
                    "DELETE FROM entries WHERE watch=? AND relpath=? RETURNING role",
                    (watch, relpath),
                ).fetchone()
                if row and row[0] in replan:
                    replan[row[0]].append(relpath)
                    continue
                _drop_item(conn, watch, relpath, on_delete, now)
            return replan

        return op

    @staticmethod
    def op_drop_items(
        watch: str, source_ids: Sequence[str], on_delete: str, now: float
    ) -> Callable[[sqlite3.Connection], None]:
        """Items whose source is gone though some of its files remain (a series that left
        a folder, a group whose last member went)."""

        def op(conn: sqlite3.Connection) -> None:
            for sid in source_ids:
                _drop_item(conn, watch, sid, on_delete, now)

        return op

    @staticmethod
    def op_synced(
        claim: Claim, manifest: dict[str, Any] | None, backend_id: str | None, now: float
    ) -> Callable[[sqlite3.Connection], None]:
        """The sink confirmed the claimed state. If the desired state moved on meanwhile,
        the item stays pending for another round."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE items SET synced_fp=?, synced_manifest=?, backend_id=?, attempts=0,"
                " last_error=NULL, error_kind=NULL, updated_at=?,"
                " status=CASE WHEN desired_fp IS ? THEN"
                "   (CASE WHEN ? IS NULL THEN 'deleted' ELSE 'synced' END)"
                " ELSE 'pending' END"
                " WHERE watch=? AND source_id=?",
                (
                    claim.desired_fp,
                    json.dumps(manifest, sort_keys=True) if manifest is not None else None,
                    backend_id,
                    now,
                    claim.desired_fp,
                    claim.desired_fp,
                    claim.watch,
                    claim.source_id,
                ),
            )

        return op

    @staticmethod
    def op_synced_many(
        done: Sequence[tuple[Claim, dict[str, Any], str | None]], now: float
    ) -> Callable[[sqlite3.Connection], None]:
        """op_synced for many (claim, manifest, backend_id) in one op: a group's results
        cost one statement and one savepoint instead of one each."""
        sql = (
            "UPDATE items SET synced_fp=?, synced_manifest=?, backend_id=?, attempts=0,"
            " last_error=NULL, error_kind=NULL, updated_at=?,"
            " status=CASE WHEN desired_fp IS ? THEN 'synced' ELSE 'pending' END"
            " WHERE watch=? AND source_id=?"
        )

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                sql,
                [
                    (
                        c.desired_fp,
                        json.dumps(manifest, sort_keys=True),
                        backend_id,
                        now,
                        c.desired_fp,
                        c.watch,
                        c.source_id,
                    )
                    for c, manifest, backend_id in done
                ],
            )

        return op

    @staticmethod
    def op_retry_later(
        claim: Claim, reason: str | None, at: float, *, count_attempt: bool, now: float
    ) -> Callable[[sqlite3.Connection], None]:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE items SET attempts=attempts+?, next_attempt=?, last_error=?,"
                " error_kind=?, updated_at=? WHERE watch=? AND source_id=? AND status='pending'",
                (
                    1 if count_attempt else 0,
                    at,
                    reason,
                    "retry" if reason else None,
                    now,
                    claim.watch,
                    claim.source_id,
                ),
            )

        return op

    @staticmethod
    def op_failed(
        claim: Claim, reason: str, kind: str, now: float
    ) -> Callable[[sqlite3.Connection], None]:
        """Permanent failure of exactly the claimed state; a newer plan stays pending."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE items SET status='failed', attempts=attempts+1, last_error=?,"
                " error_kind=?, updated_at=? WHERE watch=? AND source_id=? AND desired_fp IS ?",
                (reason, kind, now, claim.watch, claim.source_id, claim.desired_fp),
            )

        return op

    @staticmethod
    def op_set_problem(
        watch: str, problem: str | None, now: float
    ) -> Callable[[sqlite3.Connection], bool]:
        """Watch-level trouble (source folder missing, deletion refused). Returns whether
        it changed, so callers log once per change rather than once per pass."""

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT problem FROM watch_state WHERE watch=?", (watch,)).fetchone()
            if row is not None and row[0] == problem:
                return False
            if row is None and problem is None:
                return False
            conn.execute(
                "INSERT INTO watch_state (watch, problem, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (watch) DO UPDATE SET problem=excluded.problem,"
                " updated_at=excluded.updated_at",
                (watch, problem, now),
            )
            return True

        return op

    def retry(
        self, watch: str | None = None, now: float | None = None, source_id: str | None = None
    ) -> int:
        """Queue failed items again (ingestd retry; one item when `source_id` is given).
        Items that failed while being planned (a bad sidecar, a metadata type or key
        conflict) are forgotten with their entries, so the next scan plans them afresh
        from the files and checks them again."""
        now = time.time() if now is None else now
        where = "status='failed'" + (" AND watch=?" if watch else "")
        args: tuple[Any, ...] = (watch,) if watch else ()
        if source_id is not None:
            where += " AND source_id=?"
            args += (source_id,)
        replan = f"{where} AND (plan IS NULL OR error_kind IN ('plan', 'metadata', 'conflict'))"
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute(
                "DELETE FROM entries WHERE (watch, relpath) IN"
                f" (SELECT watch, source_id FROM items WHERE {replan})",
                args,
            )
            n = self.conn.execute(f"DELETE FROM items WHERE {replan}", args).rowcount
            n += self.conn.execute(
                "UPDATE items SET status='pending', attempts=0, next_attempt=?, error_kind=NULL,"
                f" updated_at=? WHERE {where}",
                (now, now, *args),
            ).rowcount
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return n


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _key_owner(
    conn: sqlite3.Connection, dataset: str, key: str, watch: str, source_id: str
) -> tuple[str, str] | None:
    # Items failed for a key conflict do not own the key they wanted.
    row = conn.execute(
        "SELECT watch, source_id FROM items WHERE dataset=? AND key=? AND status != 'deleted'"
        " AND coalesce(error_kind, '') != 'conflict' AND NOT (watch=? AND source_id=?) LIMIT 1",
        (dataset, key, watch, source_id),
    ).fetchone()
    return (row[0], row[1]) if row else None


def _drop_item(
    conn: sqlite3.Connection, watch: str, source_id: str, on_delete: str, now: float
) -> None:
    if on_delete == "delete":
        conn.execute(
            "UPDATE items SET plan=NULL, desired_fp=NULL,"
            " status=CASE WHEN synced_manifest IS NULL THEN 'deleted' ELSE 'pending' END,"
            " attempts=0, next_attempt=?, last_error=NULL, error_kind=NULL, updated_at=?"
            " WHERE watch=? AND source_id=? AND status != 'deleted'",
            (now, now, watch, source_id),
        )
    else:
        conn.execute(
            "UPDATE items SET plan=NULL, desired_fp=NULL, status='deleted',"
            " last_error=NULL, error_kind=NULL, updated_at=?"
            " WHERE watch=? AND source_id=?",
            (now, watch, source_id),
        )


def _put_entries(
    conn: sqlite3.Connection, watch: str, entries: Sequence[tuple[Entry, str]]
) -> None:
    conn.executemany(
        "INSERT INTO entries (watch, relpath, parent, size, mtime_ns, role, etag)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (watch, relpath) DO UPDATE SET size=excluded.size,"
        " mtime_ns=excluded.mtime_ns, role=excluded.role, etag=excluded.etag",
        [(watch, e.relpath, e.parent, e.size, e.mtime_ns, role, e.etag) for e, role in entries],
    )


def _plan_problem(
    conn: sqlite3.Connection,
    watch: str,
    dataset: str,
    plan: ItemPlan,
    check_types: ConflictCheck,
    type_of: TypeOf,
) -> tuple[str | None, str | None]:
    owner = _key_owner(conn, dataset, plan.key, watch, plan.source_id)
    if owner:
        return key_conflict_reason(plan.key, plan.source_id, owner), "conflict"
    keys = list(plan.metadata)
    if keys:
        known: dict[str, tuple[str, str]] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            known.update(
                (k, (t, item))
                for k, t, item, shared in conn.execute(
                    "SELECT key, type, item, shared FROM meta_types WHERE dataset=? AND key IN"
                    f" ({','.join('?' * len(chunk))})",
                    (dataset, *chunk),
                )
                # an item may change the type of a key that no other item has used yet
                if shared or item != plan.key
            )
        conflicts = check_types(plan.metadata, known)
        if conflicts:
            return "; ".join(conflicts), "metadata"
        conn.executemany(
            "INSERT INTO meta_types (dataset, key, type, item) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (dataset, key) DO UPDATE SET"
            " type=CASE WHEN meta_types.shared = 0 AND meta_types.item = excluded.item"
            "   THEN excluded.type ELSE meta_types.type END,"
            " shared=CASE WHEN meta_types.item != excluded.item THEN 1 ELSE meta_types.shared END",
            [
                (dataset, k, t, plan.key)
                for k, v in plan.metadata.items()
                if (t := type_of(v)) is not None
            ],
        )
    return None, None


def key_conflict_reason(key: str, source_id: str, owner: tuple[str, str]) -> str:
    return (
        f"{source_id}: item key {key} is already taken by {owner[1]} (watch {owner[0]}); "
        "file names must be unique within a dataset folder: rename one of the files, or set "
        "preserve_folders: true to keep sub-folders apart"
    )


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
                    if isinstance(result, _Failed):
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


def op_switch_backend(identity: str, now: float) -> Callable[[sqlite3.Connection], int]:
    """Record which backend the ledger's "synced" states refer to. When it differs from
    the recorded one (the config now points at another store or platform), every live
    item is queued again for the new backend; returns how many (0 when unchanged or on
    the first run)."""

    def op(conn: sqlite3.Connection) -> int:
        conn.execute("CREATE TABLE IF NOT EXISTS settings (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
        row = conn.execute("SELECT v FROM settings WHERE k='backend'").fetchone()
        conn.execute(
            "INSERT INTO settings (k, v) VALUES ('backend', ?)"
            " ON CONFLICT(k) DO UPDATE SET v=excluded.v",
            (identity,),
        )
        if row is None or row[0] == identity:
            return 0
        cur = conn.execute(
            "UPDATE items SET status=?, synced_manifest=NULL, synced_fp=NULL, backend_id=NULL,"
            " attempts=0, next_attempt=0, last_error=NULL, error_kind=NULL, updated_at=?"
            " WHERE plan IS NOT NULL AND (status=? OR (status=? AND error_kind='sink'))",
            (PENDING, now, SYNCED, FAILED),
        )
        # Items deleted from the old backend have nothing to do on the new one.
        conn.execute(
            "UPDATE items SET synced_manifest=NULL, backend_id=NULL WHERE status=?", (DELETED,)
        )
        return cur.rowcount

    return op


def _setting(conn: sqlite3.Connection, k: str) -> str | None:
    conn.execute("CREATE TABLE IF NOT EXISTS settings (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
    row = conn.execute("SELECT v FROM settings WHERE k=?", (k,)).fetchone()
    return None if row is None else str(row[0])


def _set_setting(conn: sqlite3.Connection, k: str, v: str) -> None:
    conn.execute(
        "INSERT INTO settings (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v=excluded.v",
        (k, v),
    )


def op_watch_settings(
    watch: str, plan_id: str, send_id: str, now: float
) -> Callable[[sqlite3.Connection], tuple[bool, int]]:
    """Compare a starting watch's settings with those its items were made with.
    Returns (replan, requeued): `replan` when the plan identity differs from the recorded
    one (the caller plans every file again, then records it with op_plan_settled, so a
    crash before the end re-plans again); `requeued`, the items queued again because the
    send identity changed, recorded in the same transaction. A watch seen for the first
    time (or a ledger from before these settings) records both and redoes nothing."""
    plan_key, send_key = f"watch:{watch}:plan", f"watch:{watch}:send"

    def op(conn: sqlite3.Connection) -> tuple[bool, int]:
        old_plan, old_send = _setting(conn, plan_key), _setting(conn, send_key)
        if old_plan is None:
            _set_setting(conn, plan_key, plan_id)
        _set_setting(conn, send_key, send_id)
        requeued = 0
        if old_send is not None and old_send != send_id:
            # Failures while preparing or sending (an oversize image with `reject`, a
            # transfer the backend refused) may pass with the new settings.
            requeued = conn.execute(
                "UPDATE items SET status=?, attempts=0, next_attempt=0, last_error=NULL,"
                " error_kind=NULL, updated_at=? WHERE watch=? AND plan IS NOT NULL AND"
                " (status=? OR (status=? AND error_kind IN ('media', 'sink')))",
                (PENDING, now, watch, SYNCED, FAILED),
            ).rowcount
        return old_plan is not None and old_plan != plan_id, requeued

    return op


def op_plan_settled(watch: str, plan_id: str) -> Callable[[sqlite3.Connection], None]:
    """Every file of the watch was planned with these settings."""
    return lambda conn: _set_setting(conn, f"watch:{watch}:plan", plan_id)
