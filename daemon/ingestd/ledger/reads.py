"""Every read query against the ledger, as plain functions of a connection.

Plain functions rather than methods so that any connection can run them: the
ledger's own (through `Ledger`, on the ledger thread), the read-only one the control
endpoint keeps on its own thread (`LedgerReader`), or a read-only one a rescan opens
in a worker thread, so that reads never queue behind the ledger's writes.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from ingestd.core.model import ItemPlan
from ingestd.ledger.model import Claim, WatchCounts

# What the control endpoint shows of an item (and needs for its thumbnail).
ITEM_COLUMNS = (
    "watch, source_id, dataset, key, status, last_error, error_kind, attempts, updated_at,"
    " plan, synced_manifest, desired_fp, synced_fp"
)


def _row_dict(cur: sqlite3.Cursor, row: Sequence[Any]) -> dict[str, Any]:
    return dict(zip([d[0] for d in cur.description], row, strict=True))


def _in(n: int) -> str:
    return ",".join("?" * n)


# -- counts and problems -----------------------------------------------------------------------


def status_counts(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Per watch: status → number of items (statuses without items left out). Read
    from item_counts, which triggers keep in step with the items (db.py): a few rows,
    whatever the ledger's size, since the status tick runs this every few seconds."""
    out: dict[str, dict[str, int]] = {}
    try:
        rows = conn.execute("SELECT watch, status, n FROM item_counts WHERE n > 0").fetchall()
    except sqlite3.OperationalError as e:
        # A read-only connection on a ledger no writer of this version has opened yet.
        if "no such table" not in str(e):
            raise
        rows = conn.execute(
            "SELECT watch, status, count(*) FROM items GROUP BY watch, status"
        ).fetchall()
    for watch, status, n in rows:
        out.setdefault(watch, {})[status] = int(n)
    return out


def counts(conn: sqlite3.Connection) -> dict[str, WatchCounts]:
    return {w: WatchCounts(**c) for w, c in status_counts(conn).items()}


def pending_state(
    conn: sqlite3.Connection, watches: Sequence[str], max_attempts: int
) -> dict[str, tuple[int, int]]:
    """Per watch of `watches` with pending items: (pending items, pending items that
    have made at least `max_attempts` attempts)."""
    # A one-pass sync asks this every 50 ms: the pending count comes from item_counts,
    # the stuck ones from a range of the (watch, status, attempts) index.
    pending = status_counts(conn)
    out: dict[str, tuple[int, int]] = {}
    for w in watches:
        n = pending.get(w, {}).get("pending", 0)
        if not n:
            continue
        (stuck,) = conn.execute(
            "SELECT count(*) FROM items WHERE watch=? AND status='pending' AND attempts >= ?",
            (w, max_attempts),
        ).fetchone()
        out[w] = (n, int(stuck))
    return out


def last_errors(conn: sqlite3.Connection, watch: str, limit: int = 10) -> list[dict[str, str]]:
    rows = conn.execute(
        "SELECT key, source_id, last_error FROM items WHERE watch=? AND last_error IS NOT NULL"
        " AND status IN ('failed', 'pending') ORDER BY status='pending', updated_at DESC"
        " LIMIT ?",
        (watch, limit),
    )
    return [{"item": key or source_id, "error": err} for key, source_id, err in rows]


def failed_items(
    conn: sqlite3.Connection, watch: str | None, limit: int, offset: int = 0
) -> tuple[int, list[dict[str, Any]]]:
    """(how many failed items, one page of them) of a watch or of all, each with its
    reason. Ordered by (watch, source_id), the primary key: a page does not shift when
    other failed items are retried or fail again meanwhile."""
    where, args = ("watch=? AND status='failed'", [watch]) if watch else ("status='failed'", [])
    (total,) = conn.execute(f"SELECT count(*) FROM items WHERE {where}", args).fetchone()
    rows = conn.execute(
        "SELECT watch, source_id, key, last_error, error_kind, attempts, updated_at"
        f" FROM items WHERE {where} ORDER BY watch, source_id LIMIT ? OFFSET ?",
        [*args, limit, offset],
    )
    page = [
        {
            "watch": w,
            "item": key or source_id,
            "source_id": source_id,
            "error": err,
            "kind": kind,
            "attempts": attempts,
            "updated_at": updated_at,
        }
        for w, source_id, key, err, kind, attempts, updated_at in rows
    ]
    return int(total), page


def watch_problems(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT watch, problem FROM watch_state WHERE problem IS NOT NULL"))


def live_count(conn: sqlite3.Connection, watch: str) -> int:
    """Items of `watch` that are not deleted (from item_counts, see status_counts)."""
    return sum(n for st, n in status_counts(conn).get(watch, {}).items() if st != "deleted")


# -- entries (the files the ledger knows) ------------------------------------------------------


def entries_in_dir(conn: sqlite3.Connection, watch: str, parent: str) -> dict[str, tuple[int, int]]:
    """relpath → (size, mtime_ns) of the known entries directly in folder `parent`
    ("" is the watch's root): what a rescan compares one folder's listing with."""
    rows = conn.execute(
        "SELECT relpath, size, mtime_ns FROM entries WHERE watch=? AND parent=?",
        (watch, parent),
    ).fetchall()
    return {r: (sz, m) for r, sz, m in rows}


def entry_dirs(conn: sqlite3.Connection, watch: str, under: str) -> set[str]:
    """The folders holding known entries: `under` and the folders below it ("" : all of
    the watch's). A rescan looks for the ones that disappeared."""
    if not under:
        q = conn.execute("SELECT DISTINCT parent FROM entries WHERE watch=?", (watch,))
    else:
        # '0' is the character after '/': the range is exactly the paths below `under/`.
        q = conn.execute(
            "SELECT DISTINCT parent FROM entries WHERE watch=? AND"
            " (parent=? OR (parent >= ? AND parent < ?))",
            (watch, under, under + "/", under + "0"),
        )
    return {r for (r,) in q}


def known_items(
    conn: sqlite3.Connection, watch: str, relpaths: Sequence[str]
) -> list[tuple[str, str]]:
    """(relpath, role) of those relpaths that are files of items (role item or member)."""
    out: list[tuple[str, str]] = []
    for i in range(0, len(relpaths), 500):
        chunk = relpaths[i : i + 500]
        out += conn.execute(
            "SELECT relpath, role FROM entries WHERE watch=? AND role IN ('item', 'member')"
            f" AND relpath IN ({_in(len(chunk))})",
            (watch, *chunk),
        ).fetchall()
    return out


def entries_between(
    conn: sqlite3.Connection, watch: str, after: str | None, upto: str | None
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
    rows = conn.execute(
        f"SELECT relpath, size, mtime_ns, etag FROM entries WHERE {where} ORDER BY relpath",
        args,
    )
    return {rel: (size, mtime, etag) for rel, size, mtime, etag in rows}


# -- items -------------------------------------------------------------------------------------


def group_items(conn: sqlite3.Connection, watch: str, group_dir: str) -> list[str]:
    """Live items planned from a group folder (one, or one per series)."""
    return [
        sid
        for (sid,) in conn.execute(
            "SELECT source_id FROM items WHERE watch=? AND status != 'deleted'"
            " AND (source_id=? OR (source_id >= ? AND source_id < ?))",
            (watch, group_dir, group_dir + "#", group_dir + "$"),
        )
    ]


def item_row(conn: sqlite3.Connection, watch: str, source_id: str) -> dict[str, Any] | None:
    """All columns of one item."""
    cur = conn.execute("SELECT * FROM items WHERE watch=? AND source_id=?", (watch, source_id))
    row = cur.fetchone()
    return None if row is None else _row_dict(cur, row)


def plan_rows(
    conn: sqlite3.Connection, watch: str, source_ids: Sequence[str]
) -> dict[str, tuple[Any, ...]]:
    """source_id → (desired_fp, status, dataset, key, error_kind) of those items of
    `watch` that exist: what planning compares a batch of plans with."""
    out: dict[str, tuple[Any, ...]] = {}
    wanted = sorted(set(source_ids))
    for i in range(0, len(wanted), 500):
        chunk = wanted[i : i + 500]
        out.update(
            (sid, tuple(rest))
            for sid, *rest in conn.execute(
                "SELECT source_id, desired_fp, status, dataset, key, error_kind FROM items"
                f" WHERE watch=? AND source_id IN ({_in(len(chunk))})",
                (watch, *chunk),
            )
        )
    return out


def key_holders(
    conn: sqlite3.Connection, dataset: str, keys: Sequence[str]
) -> dict[tuple[str, str], dict[tuple[str, str], None]]:
    """(dataset, key) → the live items holding that key, as an ordered set of (watch,
    source_id): key_owner's rule for many keys in one statement per 500."""
    out: dict[tuple[str, str], dict[tuple[str, str], None]] = {}
    for i in range(0, len(keys), 500):
        chunk = keys[i : i + 500]
        for key, w, sid in conn.execute(
            "SELECT key, watch, source_id FROM items WHERE dataset=?"
            f" AND key IN ({_in(len(chunk))}) AND status != 'deleted'"
            " AND coalesce(error_kind, '') != 'conflict' ORDER BY key, watch, source_id",
            (dataset, *chunk),
        ):
            out.setdefault((dataset, key), {})[(w, sid)] = None
    return out


def meta_types_of(
    conn: sqlite3.Connection, dataset: str, keys: Sequence[str]
) -> dict[str, tuple[str, str, int]]:
    """Metadata key → (type, the item that set it first, whether other items use it)
    of those of `keys` the dataset has seen."""
    out: dict[str, tuple[str, str, int]] = {}
    for i in range(0, len(keys), 500):
        chunk = keys[i : i + 500]
        out.update(
            (k, (t, item, int(shared)))
            for k, t, item, shared in conn.execute(
                "SELECT key, type, item, shared FROM meta_types WHERE dataset=?"
                f" AND key IN ({_in(len(chunk))})",
                (dataset, *chunk),
            )
        )
    return out


def key_owner(
    conn: sqlite3.Connection, dataset: str, key: str, watch: str, source_id: str
) -> tuple[str, str] | None:
    """Another live item that already holds this dataset key, if any."""
    # Items failed for a key conflict do not own the key they wanted.
    row = conn.execute(
        "SELECT watch, source_id FROM items WHERE dataset=? AND key=? AND status != 'deleted'"
        " AND coalesce(error_kind, '') != 'conflict' AND NOT (watch=? AND source_id=?) LIMIT 1",
        (dataset, key, watch, source_id),
    ).fetchone()
    return (row[0], row[1]) if row else None


def due(
    conn: sqlite3.Connection,
    now: float,
    limit: int,
    exclude: Iterable[tuple[str, str]] = (),
    watches: Sequence[str] | None = None,
) -> list[Claim]:
    """Pending items of `watches` (all when None) whose next attempt is due, oldest
    first. Items of watches no longer configured stay in the ledger untouched."""
    skip = set(exclude)
    # `+watch`: the (status, next_attempt) index gives the order; the planner must not
    # take the (watch, status, attempts) one and sort a whole backlog on every call.
    only = "" if watches is None else f" AND +watch IN ({_in(len(watches))})"
    # Keys first, from the index alone: the items being synced now are due too and
    # come first, and reading their whole rows (plans, manifests) on every call
    # cost more than the rows wanted.
    keys = [
        k
        for k in conn.execute(
            f"SELECT watch, source_id FROM items WHERE status='pending' AND next_attempt <= ?"
            f"{only} ORDER BY next_attempt LIMIT ?",
            (now, *(watches or ()), limit + len(skip)),
        )
        if k not in skip
    ][:limit]
    return claims_of(conn, keys)


# A claim's columns, in the order claims_from_rows reads them.
CLAIM_COLUMNS = (
    "watch, source_id, dataset, key, plan, desired_fp, synced_manifest, attempts, backend_id,"
    " updated_at"
)
_CHUNK = 200  # rows of a VALUES list: 4 values each stays under SQLite's 999 parameters


def claims_of(conn: sqlite3.Connection, keys: Sequence[tuple[str, str]]) -> list[Claim]:
    """The claims of these (watch, source_id) keys that are still pending, in order."""
    found: dict[tuple[str, str], Sequence[Any]] = {}
    for i in range(0, len(keys), _CHUNK):
        chunk = keys[i : i + _CHUNK]
        # One statement per chunk, not one per key: against PostgreSQL each statement
        # is a round trip. A join, for the reason given in items_by_key.
        rows = conn.execute(
            f"WITH k(w, s) AS (VALUES {','.join(['(?, ?)'] * len(chunk))})"
            f" SELECT {', '.join('items.' + c.strip() for c in CLAIM_COLUMNS.split(','))}"
            " FROM k JOIN items ON items.watch=k.w AND items.source_id=k.s"
            " WHERE items.status='pending'",
            [v for k in chunk for v in k],
        ).fetchall()
        found.update(((r[0], r[1]), r) for r in rows)
    # Rows gone since the keys were read (another process) are left out.
    return claims_from_rows(conn, [found[k] for k in keys if k in found])


def claims_from_rows(conn: sqlite3.Connection, rows: Sequence[Sequence[Any]]) -> list[Claim]:
    """Claims of rows of CLAIM_COLUMNS (pending items), in the rows' order, each with
    the other live item holding its key, if any: checked here again because `ingestd
    retry` re-queues conflicted items."""
    owners = key_owners(conn, [(r[2], r[3], r[0], r[1]) for r in rows if r[4]])
    return [
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
            owners.get((w, sid)) if plan else None,
            planned_at=at,
        )
        for w, sid, ds, key, plan, dfp, sm, att, bid, at in rows
    ]


def key_owners(
    conn: sqlite3.Connection, wanted: Sequence[tuple[str, str, str, str]]
) -> dict[tuple[str, str], tuple[str, str]]:
    """key_owner for many (dataset, key, watch, source_id) at once: (watch, source_id) →
    another live item holding that dataset key, for those that have one."""
    out: dict[tuple[str, str], tuple[str, str]] = {}
    for i in range(0, len(wanted), _CHUNK):
        chunk = wanted[i : i + _CHUNK]
        rows = conn.execute(
            f"WITH k(ds, key, w, s) AS (VALUES {','.join(['(?, ?, ?, ?)'] * len(chunk))})"
            " SELECT k.w, k.s, items.watch, items.source_id FROM k JOIN items"
            " ON items.dataset=k.ds AND items.key=k.key WHERE items.status != 'deleted'"
            " AND coalesce(items.error_kind, '') != 'conflict'"
            " AND NOT (items.watch=k.w AND items.source_id=k.s)",
            [v for k in chunk for v in k],
        ).fetchall()
        for w, s, ow, osid in rows:
            out.setdefault((w, s), (ow, osid))
    return out


def next_due_time(
    conn: sqlite3.Connection,
    watches: Sequence[str] | None = None,
    exclude: Iterable[tuple[str, str]] = (),
) -> float | None:
    """When the next pending item of `watches` (all when None) is due, leaving out
    the (watch, source_id) items in `exclude` (e.g. those being synced now)."""
    # `+watch`, as in due(): the first rows of the items_due index, never a sort.
    only = "" if watches is None else f" AND +watch IN ({_in(len(watches))})"
    skip = set(exclude)
    rows = conn.execute(
        f"SELECT watch, source_id, next_attempt FROM items WHERE status='pending'{only}"
        " ORDER BY next_attempt LIMIT ?",
        (*(watches or ()), len(skip) + 1),
    )
    for w, sid, at in rows:
        if (w, sid) not in skip:
            return float(at)
    return None


# -- what the dashboard lists ------------------------------------------------------------------


def items_by_status(
    conn: sqlite3.Connection, watch: str | None, status: str, limit: int
) -> list[dict[str, Any]]:
    """Up to `limit` items in `status` (of one watch, or all), ITEM_COLUMNS each."""
    # Failed: most recent first (few, so sorting them is cheap). Pending can be a
    # backlog of millions: in queue order, which the items_due index gives for free.
    order = "next_attempt" if status == "pending" else "updated_at DESC"
    where, args = "status=?", [status]
    if watch is not None:
        # `+watch`: the planner would otherwise walk the watch's whole primary-key
        # range; the (status, next_attempt) index keeps it to the items in `status`.
        where += " AND +watch=?"
        args.append(watch)
    cur = conn.execute(
        f"SELECT {ITEM_COLUMNS} FROM items WHERE {where} ORDER BY {order} LIMIT ?",
        (*args, limit),
    )
    return [_row_dict(cur, r) for r in cur.fetchall()]


def items_by_key(conn: sqlite3.Connection, keys: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """The items with these (watch, source_id) keys that exist, ITEM_COLUMNS each."""
    out: list[dict[str, Any]] = []
    for i in range(0, len(keys), 200):
        chunk = keys[i : i + 200]
        # A join, not `(watch, source_id) IN (VALUES ...)`: SQLite scans the whole
        # table for the latter, and looks each key up by primary key for the join.
        cur = conn.execute(
            f"WITH k(w, s) AS (VALUES {','.join(['(?, ?)'] * len(chunk))})"
            f" SELECT {ITEM_COLUMNS} FROM k JOIN items ON items.watch=k.w"
            " AND items.source_id=k.s",
            [v for k in chunk for v in k],
        )
        out += [_row_dict(cur, r) for r in cur.fetchall()]
    return out


def item_summary(conn: sqlite3.Connection, watch: str, source_id: str) -> dict[str, Any] | None:
    """One item's ITEM_COLUMNS."""
    cur = conn.execute(
        f"SELECT {ITEM_COLUMNS} FROM items WHERE watch=? AND source_id=?", (watch, source_id)
    )
    row = cur.fetchone()
    return _row_dict(cur, row) if row is not None else None


def recent_keys(conn: sqlite3.Connection, max_items: int, limit: int) -> list[tuple[str, str]]:
    """The `limit` most recently updated live items, oldest first; none when the ledger
    holds more than `max_items` items, since there is no index on updated_at and
    sorting a large ledger costs too much."""
    n = sum(sum(c.values()) for c in status_counts(conn).values())
    if n > max_items:
        return []
    rows = conn.execute(
        "SELECT watch, source_id FROM items WHERE status != 'deleted'"
        " ORDER BY updated_at DESC LIMIT ?",
        (limit,),
    ).fetchall()
    return [(w, s) for w, s in reversed(rows)]
