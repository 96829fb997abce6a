"""A ledger shared by several daemons (PostgreSQL): claims are leases, a watch's listing
has one holder at a time, and the server going away is a named problem that loses
nothing. Two `Ledger` objects on one database are two daemons."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ingestd.core.model import Entry, ItemPlan, PlannedFile, PlannedSlot
from ingestd.ledger import AsyncLedger, Ledger, LedgerAt
from ingestd.plan.metadata import type_conflicts, value_type

from tests.support.ledgers import ledger_at
from tests.support.need import need
from tests.support.postgres import PostgresServer, fresh_schema, pg_bin
from tests.support.wait import wait_for, wait_until


def make_plan(rel: str, size: int, mtime: int) -> ItemPlan:
    slot = PlannedSlot("0", "image", (PlannedFile(rel, rel, size, mtime),))
    return ItemPlan(rel, "/", rel, (slot,), {}, f"{rel}:{size}:{mtime}")


def plan_items(ledger: Ledger, n: int, watch: str = "w") -> None:
    ops = []
    for i in range(n):
        plan = make_plan(f"f{i:04}.jpg", 1, 1)
        entry = Entry(plan.source_id, 1, 1)
        ops.append(
            Ledger.op_apply_plan(
                watch, "ds", plan, [(entry, "item")], type_conflicts, value_type, time.time()
            )
        )
    ledger.transaction(ops)


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Ledger, Ledger]]:
    """Two daemons on one PostgreSQL ledger, with a short lease."""
    with ledger_at("postgresql", tmp_path / "a", lease=1.0) as at:
        a = Ledger(at)
        b = Ledger(LedgerAt(tmp_path / "b", dsn=at.dsn, lease=1.0))
        yield a, b
        a.close()
        b.close()


def test_two_daemons_never_claim_the_same_item(two: tuple[Ledger, Ledger]) -> None:
    a, b = two
    plan_items(a, 400)
    seen: dict[tuple[str, str], str] = {}
    dup: list[tuple[str, str]] = []
    lock = threading.Lock()

    def work(lg: Ledger, name: str) -> None:
        while claims := lg.due(time.time(), 7, [], ["w"]):
            with lock:
                for c in claims:
                    if (c.watch, c.source_id) in seen:
                        dup.append((c.watch, c.source_id))
                    seen[(c.watch, c.source_id)] = name
            lg.transaction([Ledger.op_synced(c, {"m": 1}, "id", time.time()) for c in claims])

    # Each Ledger's connection is used by its own thread only, as AsyncLedger does.
    threads = [threading.Thread(target=work, args=(lg, n)) for lg, n in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert dup == []
    assert len(seen) == 400
    assert set(seen.values()) == {"a", "b"}, "both daemons did some of the work"
    assert a.counts()["w"].synced == 400


def test_an_expired_lease_is_taken_over_and_the_late_outcome_ignored(
    two: tuple[Ledger, Ledger],
) -> None:
    a, b = two
    plan_items(a, 3)
    mine = a.due(time.time(), 10, [], ["w"])
    assert len(mine) == 3 and all(c.holder == a.at.holder for c in mine)
    assert b.due(time.time(), 10, [], ["w"]) == []  # leased to a
    # a stalls (or died): once its lease has run out the items are b's
    taken = wait_for(lambda: b.due(time.time(), 10, [], ["w"]), 15, what="lease expiry")
    assert sorted(c.source_id for c in taken) == sorted(c.source_id for c in mine)
    # a wakes up and reports: its outcome no longer applies; b's does
    a.transaction([Ledger.op_failed(c, "late", "sink", time.time()) for c in mine])
    assert a.counts()["w"].pending == 3
    b.transaction([Ledger.op_synced(c, {"m": 1}, "id", time.time()) for c in taken])
    assert a.counts()["w"].synced == 3
    row = a.item_row("w", mine[0].source_id)
    assert row["claimed_by"] is None and row["lease_until"] is None


def test_renewed_leases_stay_and_a_stopping_daemon_gives_its_claims_back(
    two: tuple[Ledger, Ledger],
) -> None:
    a, b = two
    plan_items(a, 2)
    mine = a.due(time.time(), 10, [], ["w"])
    keys = [(c.watch, c.source_id) for c in mine]
    assert a.renew(keys) == set(keys)
    nxt = b.next_due_time(["w"])
    assert nxt is not None and nxt > time.time(), "b waits for a's leases, no busy loop"
    a.close()
    assert len(b.due(time.time(), 10, [], ["w"])) == 2  # at once, not after the lease


def test_a_lapsed_lease_taken_by_another_daemon_is_not_renewed(
    two: tuple[Ledger, Ledger],
) -> None:
    """a stalls past its lease, b claims the item: a's renewal says it lost it (the pool
    then abandons it instead of sending it a second time)."""
    a, b = two
    plan_items(a, 1)
    mine = a.due(time.time(), 10, [], ["w"])
    keys = [(c.watch, c.source_id) for c in mine]
    assert len(keys) == 1
    taken = wait_for(lambda: b.due(time.time(), 10, [], ["w"]), 15, what="the lease to lapse")
    assert [(c.watch, c.source_id) for c in taken] == keys
    assert a.renew(keys) == set(), "a no longer holds it"
    assert b.renew(keys) == set(keys)


def test_one_lister_per_watch_and_handover(two: tuple[Ledger, Ledger]) -> None:
    a, b = two
    assert a.hold_watch("bucket") == (True, a.at.holder)
    assert b.hold_watch("bucket") == (False, a.at.holder)
    assert a.hold_watch("bucket")[0], "renewed by its holder"
    # a stops renewing: b takes over after the lease
    wait_for(lambda: b.hold_watch("bucket")[0], 15, what="listing lease handover")
    assert a.hold_watch("bucket") == (False, b.at.holder)


def test_daemons_are_listed_with_heartbeats(two: tuple[Ledger, Ledger]) -> None:
    a, b = two
    a.heartbeat()
    b.heartbeat()
    rows = {d["id"]: d for d in a.daemons()}
    assert set(rows) == {a.at.holder, b.at.holder}
    assert all(d["stopped"] is None and d["heartbeat"] > time.time() - 60 for d in rows.values())


def test_item_counts_are_kept_in_postgresql_too(two: tuple[Ledger, Ledger]) -> None:
    a, b = two
    plan_items(a, 5)
    claims = b.due(time.time(), 2, [], ["w"])
    b.transaction([Ledger.op_synced(c, {"m": 1}, "id", time.time()) for c in claims])
    a.heartbeat()  # folds the deltas
    assert a.counts()["w"].pending == 3 and a.counts()["w"].synced == 2
    (n,) = a.conn.execute("SELECT count(*) FROM item_count_deltas").fetchone()
    assert n == 2, "folded to one row per (watch, status)"


async def test_postgresql_going_away_is_a_problem_and_nothing_is_lost(tmp_path: Path) -> None:
    need(pg_bin() is not None, "no PostgreSQL server (Debian's postgresql package)")
    server = PostgresServer()  # its own: this test stops and starts it
    server.start()
    try:
        with fresh_schema(server.dsn) as dsn:
            ledger = AsyncLedger(LedgerAt(tmp_path, dsn=dsn))
            await ledger.open()
            plan = make_plan("a.jpg", 1, 1)
            op = Ledger.op_apply_plan("w", "ds", plan, [], type_conflicts, value_type, 1.0)
            assert await ledger.write(op) == "pending"
            server.stop()
            later = make_plan("b.jpg", 1, 1)
            op2 = Ledger.op_apply_plan("w", "ds", later, [], type_conflicts, value_type, 1.0)
            with pytest.raises(Exception) as failed:
                await ledger.write(op2)
            assert ledger.is_unwritable(failed.value)
            assert ledger.problem is not None and "PostgreSQL" in ledger.problem
            assert "start the server" in ledger.problem
            server.start()
            await wait_until(lambda: ledger.writable.is_set(), 30, what="the probe reconnects")
            assert ledger.problem is None
            assert await ledger.write(op2) == "pending"  # the writer's kept work, again
            counts = await ledger.call(ledger.sync.counts)
            assert counts["w"].pending == 2
            await ledger.close()
    finally:
        server.remove()


def test_a_claimed_item_whose_source_goes_is_deleted_where_it_may_have_been_sent(
    two: tuple[Ledger, Ledger],
) -> None:
    """a claims (and maybe sends) an item, then dies before recording it; the object is
    deleted meanwhile: with on_delete: delete the item must still be deleted from the
    backend, not forgotten as never sent."""
    a, b = two
    plan_items(a, 1)
    [claim] = a.due(time.time(), 10, [], ["w"])
    b.transaction([Ledger.op_gone("w", [claim.source_id], "delete", time.time())])
    a.close()  # died: its claims are released (or would run out)
    [gone] = b.due(time.time(), 10, [], ["w"])
    assert gone.plan is None
    assert gone.synced_manifest == {"dataset": "ds", "path": "/", "name": claim.source_id}
    b.transaction([Ledger.op_synced(gone, None, None, time.time())])
    assert b.item_row("w", claim.source_id)["status"] == "deleted"
