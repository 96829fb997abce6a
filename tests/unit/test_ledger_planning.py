"""Planning a batch in one op (ops.op_apply_plans), on both engines: every result and
every row exactly as the one-plan-at-a-time ops in sequence leave them, conflicts inside
the batch included, in a number of statements that does not grow with the batch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from ingestd.core.model import Entry, ItemPlan, PlannedFile, PlannedSlot
from ingestd.ledger import Ledger
from ingestd.ledger.ops import PlanFailure, Planning, op_apply_plans
from ingestd.plan.metadata import type_conflicts, value_type

from tests.support.ledgers import ENGINES, CountingConn, ledger_at

NOW = 1_000.0


def make_plan(
    rel: str, mtime: int = 1, meta: dict[str, Any] | None = None, path: str = "/"
) -> ItemPlan:
    name = rel.rsplit("/", 1)[-1]
    fp = f"{rel}:{mtime}:{sorted((meta or {}).items())}:{path}"
    slot = PlannedSlot("0", "image", (PlannedFile(name, rel, 1, mtime),))
    return ItemPlan(rel, path, name, (slot,), dict(meta or {}), fp)


def entries_of(p: ItemPlan | PlanFailure | None, rel: str = "") -> list[tuple[Entry, str]]:
    rel = rel or (p.source_id if p is not None else "")
    return [(Entry(rel, 1, 1), "item" if p is not None else "sidecar")]


def one_by_one(ledger: Ledger, planned: Sequence[Planning], dataset: str = "ds") -> list[Any]:
    """What record_plans did before batches: an op per element, in order."""
    ops = []
    for p, entries in planned:
        if isinstance(p, ItemPlan):
            ops.append(
                Ledger.op_apply_plan("w", dataset, p, entries, type_conflicts, value_type, NOW)
            )
        elif isinstance(p, PlanFailure):
            ops.append(
                Ledger.op_plan_failed(
                    "w", dataset, p.source_id, p.key, p.fingerprint, entries, p.reason, NOW
                )
            )
        else:
            ops.append(Ledger.op_put_entries("w", entries))
    return [r if isinstance(r, str) else None for r in ledger.transaction(ops)]


def as_batch(ledger: Ledger, planned: Sequence[Planning], dataset: str = "ds") -> list[Any]:
    op = op_apply_plans("w", dataset, planned, type_conflicts, value_type, NOW)
    ((results),) = ledger.transaction([op])
    return [r for r, _ in results]


def tables(ledger: Ledger) -> dict[str, list[tuple[Any, ...]]]:
    q = {
        "items": "SELECT watch, source_id, dataset, key, plan, desired_fp, status, attempts,"
        " next_attempt, last_error, error_kind, updated_at FROM items ORDER BY watch, source_id",
        "entries": "SELECT watch, relpath, parent, size, mtime_ns, role, etag FROM entries"
        " ORDER BY watch, relpath",
        "meta_types": "SELECT dataset, key, type, item, shared FROM meta_types ORDER BY key",
    }
    return {t: [tuple(r) for r in ledger.conn.execute(sql).fetchall()] for t, sql in q.items()}


@pytest.fixture(params=ENGINES)
def two(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Ledger, Ledger]]:
    """Two empty ledgers of one engine: one for the ops in sequence, one for the batch."""
    with (
        ledger_at(request.param, tmp_path / "a") as a,
        ledger_at(request.param, tmp_path / "b") as b,
    ):
        la, lb = Ledger(a), Ledger(b)
        yield la, lb
        la.close()
        lb.close()


BEFORE: list[Planning] = [
    (p, entries_of(p))
    for p in (
        make_plan("x/a.jpg"),  # holds /a.jpg
        make_plan("z/k.jpg"),  # holds /k.jpg, moves away in the batch
        make_plan("m.jpg", meta={"n": 1}),  # the dataset's "n" is a number
        make_plan("t.jpg", meta={"solo": 1}),  # "solo": used by t.jpg alone
        make_plan("gone.jpg"),
    )
]

BATCH: list[Planning] = [
    (p, entries_of(p, rel))
    for p, rel in (
        (make_plan("x/a.jpg"), ""),  # unchanged
        (make_plan("y/a.jpg"), ""),  # /a.jpg is x/a.jpg's: conflict with an existing item
        (make_plan("p/b.jpg"), ""),  # pending
        (make_plan("q/b.jpg"), ""),  # /b.jpg was claimed just before: conflict in the batch
        (PlanFailure("c.jpg", "/c.jpg", "fp-c", "bad sidecar"), ""),  # fails, holds /c.jpg
        (make_plan("u/c.jpg"), ""),  # conflicts with the failed item
        (make_plan("z/k.jpg", path="/moved"), ""),  # leaves /k.jpg
        (make_plan("v/k.jpg"), ""),  # so /k.jpg is free
        (make_plan("b2.jpg", meta={"n": "one"}), ""),  # "n" is a number: metadata
        (make_plan("f1.jpg", meta={"fresh": 1}), ""),  # a new key, typed here
        (make_plan("f2.jpg", meta={"fresh": "x"}), ""),  # ... and then of another type
        (make_plan("t.jpg", 2, meta={"solo": "s"}), ""),  # its own key: may change type
        (make_plan("s1.jpg", meta={"solo": "s2"}), ""),  # now shared, type string
        (make_plan("d.jpg"), ""),  # pending ...
        (make_plan("d.jpg"), ""),  # ... and then unchanged: it came twice
        (make_plan("e.jpg"), ""),  # pending ...
        (make_plan("e.jpg", 2), ""),  # ... and again with a new plan
        (None, "e.json"),  # entries alone
        (PlanFailure("gone.jpg", "/gone.jpg", "fp-g", "unreadable"), ""),  # an existing item
        (make_plan("gone.jpg"), ""),  # planned again after its failure: pending
    )
]

EXPECTED = [
    "unchanged",
    "failed",
    "pending",
    "failed",
    "failed",
    "failed",
    "pending",
    "pending",
    "failed",
    "pending",
    "failed",
    "pending",
    "pending",
    "pending",
    "unchanged",
    "pending",
    "pending",
    None,
    "failed",
    "pending",
]


def test_a_batch_leaves_what_the_ops_in_sequence_leave(two: tuple[Ledger, Ledger]) -> None:
    seq, bat = two
    for lg in (seq, bat):
        one_by_one(lg, BEFORE)
    assert one_by_one(seq, BATCH) == EXPECTED
    assert as_batch(bat, BATCH) == EXPECTED
    assert tables(bat) == tables(seq)
    # and the reasons name what the one-by-one ops named
    row = bat.item_row("w", "q/b.jpg")
    assert row["error_kind"] == "conflict" and "p/b.jpg" in row["last_error"]
    assert "taken by c.jpg" in bat.item_row("w", "u/c.jpg")["last_error"]
    assert '"fresh"' in bat.item_row("w", "f2.jpg")["last_error"]
    assert bat.item_row("w", "z/k.jpg")["key"] == "/moved/k.jpg"
    pending = "x/a.jpg m.jpg p/b.jpg z/k.jpg v/k.jpg f1.jpg t.jpg s1.jpg d.jpg e.jpg gone.jpg"
    assert bat.counts()["w"].pending == len(pending.split())


def test_a_second_batch_finds_everything_unchanged(two: tuple[Ledger, Ledger]) -> None:
    _, lg = two
    plans: list[Planning] = [(p, entries_of(p)) for p in map(make_plan, ("a.jpg", "b.jpg"))]
    assert as_batch(lg, plans) == ["pending", "pending"]
    assert as_batch(lg, plans) == ["unchanged", "unchanged"]


def test_a_key_held_in_another_watch_or_dataset(two: tuple[Ledger, Ledger]) -> None:
    _, lg = two
    other = make_plan("o/a.jpg")
    op = Ledger.op_apply_plan("w2", "ds", other, [], type_conflicts, value_type, NOW)
    assert lg.transaction([op]) == ["pending"]
    mine = make_plan("a.jpg")
    # another watch of the same dataset holds /a.jpg; another dataset is no conflict
    assert as_batch(lg, [(mine, [])]) == ["failed"]
    assert "watch w2" in lg.item_row("w", "a.jpg")["last_error"]
    assert as_batch(lg, [(make_plan("b/a.jpg"), [])], dataset="ds2") == ["pending"]


def test_a_batch_failing_whole_leaves_nothing_of_it(two: tuple[Ledger, Ledger]) -> None:
    """An op's writes stand or fall together: a batch that fails records none of its
    plans (the plan queue plans the unit again), and the other ops of the commit stand."""
    _, lg = two
    good = op_apply_plans("w", "ds", [(make_plan("a.jpg"), [])], type_conflicts, value_type, NOW)

    def broken(*_: Any) -> list[str]:
        raise ValueError("a checker's own bug")

    bad = op_apply_plans(
        "w", "ds", [(make_plan("b.jpg", meta={"k": 1}), [])], broken, value_type, NOW
    )
    results = lg.transaction([good, bad])
    assert results[0] == [("pending", None)]
    assert lg.item_row("w", "b.jpg") is None and lg.item_row("w", "a.jpg") is not None


def _statements(lg: Ledger, planned: Sequence[Planning]) -> list[str]:
    real = lg.conn
    lg.conn = counting = CountingConn(real)
    try:
        lg.transaction([op_apply_plans("w", "ds", planned, type_conflicts, value_type, NOW)])
    finally:
        lg.conn = real
    return counting.sent


@pytest.fixture(params=ENGINES)
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    with ledger_at(request.param, tmp_path / "state") as at:
        lg = Ledger(at)
        yield lg
        lg.close()


def test_planning_a_batch_costs_a_few_statements_not_a_few_per_item(ledger: Ledger) -> None:
    """PostgreSQL: each statement is a round trip (executemany is one: psycopg sends its
    rows in a pipeline). 400 items (under the 500 of a read's chunk) cost what 4 do."""

    def batch(n: int, tag: str) -> list[Planning]:
        plans = [make_plan(f"{tag}{i:04}.jpg", meta={"n": i, "tag": tag}) for i in range(n)]
        plans.append(make_plan(f"clash/{tag}0000.jpg"))  # one key conflict too
        return [(p, entries_of(p)) for p in plans]

    small = _statements(ledger, batch(4, "a"))
    large = _statements(ledger, batch(400, "b"))
    # BEGIN, entries, item rows, key holders, metadata types, their upsert, the items'
    # upsert, COMMIT; SQLite adds a savepoint and its release (no round trips there)
    assert len(large) == len(small), (small, large)
    assert len(large) <= (8 if ledger.shared else 10), large
    again = _statements(ledger, batch(400, "b"))  # unchanged: reads only, no upserts
    assert len(again) <= len(large) - 2, again
    assert ledger.counts()["w"].pending == 404


def test_a_big_batch_is_read_in_chunks_with_the_same_results(two: tuple[Ledger, Ledger]) -> None:
    """Over the 500 keys of one read: the chunks together see what one read would."""
    seq, bat = two
    plans: list[Planning] = [
        (p, entries_of(p))
        for p in (make_plan(f"{d}/f{i:04}.jpg") for d in ("a", "b") for i in range(700))
    ]
    assert one_by_one(seq, plans) == as_batch(bat, plans)
    assert tables(bat) == tables(seq)
    assert bat.counts()["w"].failed == 700 and bat.counts()["w"].pending == 700


def test_a_failed_plan_is_recorded_and_counts_its_attempts(two: tuple[Ledger, Ledger]) -> None:
    """PostgreSQL once refused op_plan_failed's upsert (`attempts` was ambiguous)."""
    for lg in two:
        for _ in range(2):
            failure = PlanFailure("c.jpg", "/c.jpg", "fp-c", "bad sidecar c.json")
            assert one_by_one(lg, [(failure, [])]) == ["failed"]
        row = lg.item_row("w", "c.jpg")
        assert row["attempts"] == 2 and row["error_kind"] == "plan"
        assert row["last_error"] == "bad sidecar c.json"
