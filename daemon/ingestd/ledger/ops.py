"""Every write to the ledger: `op_*` functions each return an op, a function of a
connection that `Ledger.transaction` runs inside the group commit (AsyncLedger batches
the ops submitted while the previous transaction ran). An op may also be called
directly with a connection.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ingestd.core.model import Entry, ItemPlan
from ingestd.core.rawnames import shown
from ingestd.ledger.db import (
    DELETED,
    FAILED,
    MEMBER,
    PENDING,
    SIDECAR,
    SYNCED,
    ensure_settings,
    set_setting,
    setting,
)
from ingestd.ledger.model import Claim, ConflictCheck, TypeOf
from ingestd.ledger.reads import key_holders, meta_types_of, plan_rows

# What every outcome op adds. The claim's lease ends with its outcome, and the outcome
# applies only while this daemon still holds it: a daemon that stalled past its lease
# and lost the item to another leaves the other's result alone (the other sends it
# too; puts are idempotent, so the only cost is the second send). With SQLite both
# columns stay NULL and `claim.holder` is None: the guard is always true.
_UNCLAIM = "claimed_by=NULL, lease_until=NULL"
_HELD = "AND claimed_by IS ?"


def _said(text: str | None) -> str | None:
    """A reason or problem as stored: a message that quotes a file name which is not
    UTF-8 (a lone surrogate, from an OSError's filename) cannot be encoded for SQLite,
    and would turn the failure being recorded into a failed transaction."""
    return None if text is None else shown(text)


# -- what items should be (planning) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlanFailure:
    """Files that could not be turned into an item (a bad sidecar, an unreadable
    header): what op_plan_failed records, as one element of op_apply_plans."""

    source_id: str
    key: str
    fingerprint: str
    reason: str


# One element of a planning result: a plan, a failed plan, or None (entries alone:
# sidecars, files of items planned elsewhere), with the entries to record either way.
Planning = tuple[ItemPlan | PlanFailure | None, Sequence[tuple[Entry, str]]]
# What op_apply_plans returns per element: 'unchanged', 'pending' or 'failed' (None for
# entries alone), and the reason of a failure.
PlanResult = tuple[str | None, str | None]


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
    batch = op_apply_plans(watch, dataset, [(plan, entries)], check_types, type_of, now)

    def op(conn: sqlite3.Connection) -> str:
        result = batch(conn)[0][0]
        assert result is not None
        return result

    return op


def op_apply_plans(
    watch: str,
    dataset: str,
    planned: Sequence[Planning],
    check_types: ConflictCheck,
    type_of: TypeOf,
    now: float,
) -> Callable[[sqlite3.Connection], list[PlanResult]]:
    """Record a planning result, in a few statements whatever its size: against
    PostgreSQL every statement is a round trip, and one per plan made planning the
    slowest part of a sync. Each element's result is exactly what op_apply_plan and
    op_plan_failed, run in the batch's order, would have returned and written: the rows
    the batch touches, the live holders of the keys it claims and the metadata types
    it uses are read once, the conflicts are decided in order in Python over them (a
    plan sees the plans before it, so two claiming one key conflict as they would in
    sequence), and the writes go out as one executemany per table."""

    def op(conn: sqlite3.Connection) -> list[PlanResult]:
        if entries := [e for _, es in planned for e in es]:
            _put_entries(conn, watch, entries)
        batch = _PlanBatch(conn, watch, dataset, [p for p, _ in planned if p is not None])
        results = [
            batch.record(p, check_types, type_of, now) if p is not None else (None, None)
            for p, _ in planned
        ]
        batch.write(conn)
        return results

    return op


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
            _FAILED_UPSERT, (watch, source_id, dataset, key, fingerprint, now, _said(reason), now)
        )
        return FAILED

    return op


def op_put_entries(
    watch: str, entries: Sequence[tuple[Entry, str]]
) -> Callable[[sqlite3.Connection], None]:
    return lambda conn: _put_entries(conn, watch, entries)


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


def op_drop_items(
    watch: str, source_ids: Sequence[str], on_delete: str, now: float
) -> Callable[[sqlite3.Connection], None]:
    """Items whose source is gone though some of its files remain (a series that left
    a folder, a group whose last member went)."""

    def op(conn: sqlite3.Connection) -> None:
        for sid in source_ids:
            _drop_item(conn, watch, sid, on_delete, now)

    return op


# -- what the sinks did ------------------------------------------------------------------------


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
            f" ELSE 'pending' END, {_UNCLAIM} WHERE watch=? AND source_id=? {_HELD}",
            (
                claim.desired_fp,
                json.dumps(manifest, sort_keys=True) if manifest is not None else None,
                backend_id,
                now,
                claim.desired_fp,
                claim.desired_fp,
                claim.watch,
                claim.source_id,
                claim.holder,
            ),
        )

    return op


def op_synced_many(
    done: Sequence[tuple[Claim, dict[str, Any], str | None]], now: float
) -> Callable[[sqlite3.Connection], None]:
    """op_synced for many (claim, manifest, backend_id) in one op: a group's results
    cost one statement and one savepoint instead of one each."""
    sql = (
        "UPDATE items SET synced_fp=?, synced_manifest=?, backend_id=?, attempts=0,"
        " last_error=NULL, error_kind=NULL, updated_at=?,"
        " status=CASE WHEN desired_fp IS ? THEN 'synced' ELSE 'pending' END,"
        f" {_UNCLAIM} WHERE watch=? AND source_id=? {_HELD}"
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
                    c.holder,
                )
                for c, manifest, backend_id in done
            ],
        )

    return op


def op_retry_later(
    claim: Claim, reason: str | None, at: float, *, count_attempt: bool, now: float
) -> Callable[[sqlite3.Connection], None]:
    def op(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE items SET attempts=attempts+?, next_attempt=?, last_error=?,"
            f" error_kind=?, updated_at=?, {_UNCLAIM} WHERE watch=? AND source_id=?"
            f" AND status='pending' {_HELD}",
            (
                1 if count_attempt else 0,
                at,
                _said(reason),
                "retry" if reason else None,
                now,
                claim.watch,
                claim.source_id,
                claim.holder,
            ),
        )

    return op


def op_retry_held(
    claim: Claim, reason: str, condition: str, at: float, now: float
) -> Callable[[sqlite3.Connection], None]:
    """A failure for a condition of the whole sink (out of space): not an attempt of
    the item's, no growing backoff; `error_kind` names the condition, so that
    op_wake_pending finds the items once it clears."""

    def op(conn: sqlite3.Connection) -> None:
        conn.execute(
            f"UPDATE items SET next_attempt=?, last_error=?, error_kind=?, updated_at=?,"
            f" {_UNCLAIM} WHERE watch=? AND source_id=? AND status='pending' {_HELD}",
            (at, _said(reason), condition, now, claim.watch, claim.source_id, claim.holder),
        )

    return op


def op_wake_pending(condition: str, now: float) -> Callable[[sqlite3.Connection], int]:
    """The condition cleared (a probe item went through): every pending item whose last
    failure was that condition is due now. Items backing off for reasons of their own
    keep their backoff. Returns how many were woken."""

    def op(conn: sqlite3.Connection) -> int:
        return conn.execute(
            "UPDATE items SET next_attempt=? WHERE status='pending' AND error_kind=?"
            " AND next_attempt > ?",
            (now, condition, now),
        ).rowcount

    return op


def op_failed(
    claim: Claim, reason: str, kind: str, now: float
) -> Callable[[sqlite3.Connection], None]:
    """Permanent failure of exactly the claimed state; a newer plan stays pending."""

    def op(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE items SET status='failed', attempts=attempts+1, last_error=?,"
            f" error_kind=?, updated_at=?, {_UNCLAIM} WHERE watch=? AND source_id=?"
            f" AND desired_fp IS ? {_HELD}",
            (
                _said(reason),
                kind,
                now,
                claim.watch,
                claim.source_id,
                claim.desired_fp,
                claim.holder,
            ),
        )

    return op


# -- watches, backends and settings ---------------------------------------------------------------


def op_set_problem(
    watch: str, problem: str | None, now: float
) -> Callable[[sqlite3.Connection], bool]:
    """Watch-level trouble (source folder missing, deletion refused). Returns whether
    it changed, so callers log once per change rather than once per pass."""
    problem = _said(problem)

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
    conn: sqlite3.Connection,
    watch: str | None = None,
    now: float | None = None,
    source_id: str | None = None,
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
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "DELETE FROM entries WHERE (watch, relpath) IN"
            f" (SELECT watch, source_id FROM items WHERE {replan})",
            args,
        )
        n = conn.execute(f"DELETE FROM items WHERE {replan}", args).rowcount
        n += conn.execute(
            "UPDATE items SET status='pending', attempts=0, next_attempt=?, error_kind=NULL,"
            f" updated_at=? WHERE {where}",
            (now, now, *args),
        ).rowcount
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return n


# -- shared by the ops above ---------------------------------------------------------------------


def _drop_item(
    conn: sqlite3.Connection, watch: str, source_id: str, on_delete: str, now: float
) -> None:
    if on_delete == "delete":
        _may_have_been_sent(conn, watch, source_id)
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


def _may_have_been_sent(conn: sqlite3.Connection, watch: str, source_id: str) -> None:
    """An item claimed and never recorded as synced may still be on the backend: a
    daemon of a shared ledger sent it and died before recording it (its lease is still
    in the row). Deleting its source must then delete it there too, so it gets the
    place it was sent to as its synced manifest (a delete of what is not there is a
    no-op for every sink). With SQLite claims live in memory: claimed_by is NULL."""
    row = conn.execute(
        "SELECT plan, dataset FROM items WHERE watch=? AND source_id=?"
        " AND claimed_by IS NOT NULL AND synced_manifest IS NULL AND plan IS NOT NULL",
        (watch, source_id),
    ).fetchone()
    if row is None:
        return
    plan = json.loads(row[0])
    place = {"dataset": row[1], "path": plan["path"], "name": plan["name"]}
    conn.execute(
        "UPDATE items SET synced_manifest=? WHERE watch=? AND source_id=?",
        (json.dumps(place, sort_keys=True), watch, source_id),
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


_PLAN_UPSERT = (
    "INSERT INTO items (watch, source_id, dataset, key, plan, desired_fp, status,"
    " attempts, next_attempt, last_error, error_kind, updated_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)"
    " ON CONFLICT (watch, source_id) DO UPDATE SET dataset=excluded.dataset,"
    " key=excluded.key, plan=excluded.plan, desired_fp=excluded.desired_fp,"
    " status=excluded.status, attempts=0, next_attempt=excluded.next_attempt,"
    " last_error=excluded.last_error, error_kind=excluded.error_kind,"
    " updated_at=excluded.updated_at"
)
# `items.attempts`: PostgreSQL reads a bare `attempts` as ambiguous (the row's or
# `excluded`'s) and refused the whole statement, so no failed plan was ever recorded.
_FAILED_UPSERT = (
    "INSERT INTO items (watch, source_id, dataset, key, plan, desired_fp, status,"
    " attempts, next_attempt, last_error, error_kind, updated_at)"
    " VALUES (?, ?, ?, ?, NULL, ?, 'failed', 1, ?, ?, 'plan', ?)"
    " ON CONFLICT (watch, source_id) DO UPDATE SET key=excluded.key,"
    " desired_fp=excluded.desired_fp, status='failed', attempts=items.attempts+1,"
    " last_error=excluded.last_error, error_kind='plan', updated_at=excluded.updated_at"
)
# Relative to the row as it is when it runs, so the batch's rows go through it in
# order, as the plans' own upserts did one at a time.
_META_UPSERT = (
    "INSERT INTO meta_types (dataset, key, type, item) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (dataset, key) DO UPDATE SET"
    " type=CASE WHEN meta_types.shared = 0 AND meta_types.item = excluded.item"
    "   THEN excluded.type ELSE meta_types.type END,"
    " shared=CASE WHEN meta_types.item != excluded.item THEN 1 ELSE meta_types.shared END"
)


class _PlanBatch:
    """op_apply_plans' view of the rows its batch touches, kept as the batch's writes
    would leave them: the batch's items (source_id → desired_fp, status, dataset, key,
    error_kind), the live holders of the keys it claims, the metadata types it uses."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        watch: str,
        dataset: str,
        plans: Sequence[ItemPlan | PlanFailure],
    ) -> None:
        self.watch, self.dataset = watch, dataset
        sids = [p.source_id for p in plans]
        self.rows = plan_rows(conn, watch, sids)
        # Plans whose row says 'unchanged' need nothing more, unless an item comes twice
        # (the second then meets the first one's write, not this row).
        items = [p for p in plans if isinstance(p, ItemPlan)]
        if len(set(sids)) == len(sids):
            items = [p for p in items if not self._unchanged(p)]
        self.holders = key_holders(conn, dataset, sorted({p.key for p in items}))
        self.types = meta_types_of(conn, dataset, sorted({k for p in items for k in p.metadata}))
        # Writes in rounds: a round holds each item once, so its rows go out in any
        # order; an item's second write (it came twice) waits for the next round.
        self.rounds: list[tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]] = []
        self.seen: dict[str, int] = {}
        self.meta_writes: list[tuple[str, str, str, str]] = []

    def _unchanged(self, plan: ItemPlan) -> bool:
        row = self.rows.get(plan.source_id)
        # The dataset is the watch's, not part of the plan: an edit of it is a change.
        return bool(
            row and row[0] == plan.fingerprint and row[1] != DELETED and row[2] == self.dataset
        )

    def record(
        self, p: ItemPlan | PlanFailure, check_types: ConflictCheck, type_of: TypeOf, now: float
    ) -> PlanResult:
        n = self.seen[p.source_id] = self.seen.get(p.source_id, -1) + 1
        if n == len(self.rounds):
            self.rounds.append(([], []))
        plans, failures = self.rounds[n]
        if isinstance(p, PlanFailure):
            row = self.rows.get(p.source_id)
            failures.append(
                (
                    self.watch,
                    p.source_id,
                    self.dataset,
                    p.key,
                    p.fingerprint,
                    now,
                    _said(p.reason),
                    now,
                )
            )
            # On conflict the row keeps its dataset (see _FAILED_UPSERT).
            self._moved(
                p.source_id, (p.fingerprint, FAILED, row[2] if row else self.dataset, p.key, "plan")
            )
            return FAILED, p.reason
        if self._unchanged(p):
            return "unchanged", None
        error, kind = self._problem(p, check_types, type_of)
        status = FAILED if error else PENDING
        plans.append(
            (
                self.watch,
                p.source_id,
                self.dataset,
                p.key,
                p.dumps(),
                p.fingerprint,
                status,
                now,
                error,
                kind,
                now,
            )
        )
        self._moved(p.source_id, (p.fingerprint, status, self.dataset, p.key, kind))
        return status, error

    def _moved(self, sid: str, row: tuple[Any, ...]) -> None:
        """The item's row is now `row`: it holds its new key (unless it failed for a
        conflict, as reads.key_owner counts holders) and no longer its old one."""
        old = self.rows.get(sid)
        me = (self.watch, sid)
        if old is not None:
            self.holders.get((old[2], old[3]), {}).pop(me, None)
        if row[4] != "conflict":
            self.holders.setdefault((row[2], row[3]), {})[me] = None
        self.rows[sid] = row

    def _problem(
        self, plan: ItemPlan, check_types: ConflictCheck, type_of: TypeOf
    ) -> tuple[str | None, str | None]:
        me = (self.watch, plan.source_id)
        owner = next((h for h in self.holders.get((self.dataset, plan.key), {}) if h != me), None)
        if owner:
            return key_conflict_reason(plan.key, plan.source_id, owner), "conflict"
        if not plan.metadata:
            return None, None
        known = {
            k: (m[0], m[1])
            for k in plan.metadata
            # an item may change the type of a key that no other item has used yet
            if (m := self.types.get(k)) is not None and (m[2] or m[1] != plan.key)
        }
        conflicts = check_types(plan.metadata, known)
        if conflicts:
            return "; ".join(conflicts), "metadata"
        for k, v in plan.metadata.items():
            if (t := type_of(v)) is None:
                continue
            self.meta_writes.append((self.dataset, k, t, plan.key))
            m = self.types.get(k)
            if m is None:
                self.types[k] = (t, plan.key, 0)
            else:  # as _META_UPSERT does it
                same = m[1] == plan.key
                self.types[k] = (t if same and not m[2] else m[0], m[1], m[2] if same else 1)
        return None, None

    def write(self, conn: sqlite3.Connection) -> None:
        if self.meta_writes:
            conn.executemany(_META_UPSERT, self.meta_writes)
        for plans, failures in self.rounds:
            if plans:
                conn.executemany(_PLAN_UPSERT, plans)
            if failures:
                conn.executemany(_FAILED_UPSERT, failures)


def key_conflict_reason(key: str, source_id: str, owner: tuple[str, str]) -> str:
    return (
        f"{source_id}: item key {key} is already taken by {owner[1]} (watch {owner[0]}); "
        "file names must be unique within a dataset folder: rename one of the files, or set "
        "preserve_folders: true to keep sub-folders apart"
    )


def op_switch_backend(identity: str, now: float) -> Callable[[sqlite3.Connection], int]:
    """Record which backend the ledger's "synced" states refer to. When it differs from
    the recorded one (the config now points at another store or platform), every live
    item is queued again for the new backend; returns how many (0 when unchanged or on
    the first run)."""

    def op(conn: sqlite3.Connection) -> int:
        ensure_settings(conn)
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
        old_plan, old_send = setting(conn, plan_key), setting(conn, send_key)
        if old_plan is None:
            set_setting(conn, plan_key, plan_id)
        set_setting(conn, send_key, send_id)
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
    return lambda conn: set_setting(conn, f"watch:{watch}:plan", plan_id)
