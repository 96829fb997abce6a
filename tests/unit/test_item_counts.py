"""item_counts, the per-(watch, status) counts that triggers keep in the transactions
that change the items, against a GROUP BY recount of the items after many random
sequences of the ledger's real ops; and the migration that fills it for a ledger
written before it existed."""

from __future__ import annotations

import random
import sqlite3
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ingestd.core.model import Entry, ItemPlan, PlannedFile, PlannedSlot
from ingestd.ledger import Ledger, op_switch_backend, op_watch_settings
from ingestd.ledger.ops import op_retry_held, op_wake_pending
from ingestd.ledger.reads import live_count, pending_state, status_counts
from ingestd.plan.metadata import type_conflicts, value_type

WATCHES = ("w1", "w2")
# Few names, so that ops meet the same items again; "a.jpg" in two folders collides
# on one dataset key (path "/"), which fails the later one as a conflict.
RELS = ("a.jpg", "x/a.jpg", "y/b.jpg", "y/c.jpg", "z/d.jpg", "e.jpg")


def recount(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for w, s, n in conn.execute("SELECT watch, status, count(*) FROM items GROUP BY watch, status"):
        out.setdefault(w, {})[s] = n
    return out


def plan_of(rel: str, version: int, meta: object = None) -> ItemPlan:
    name = rel.rsplit("/", 1)[-1]
    metadata = {} if meta is None else {"m": meta}
    return ItemPlan(
        rel,
        "/",
        name,
        (PlannedSlot("0", "image", (PlannedFile(name, rel, version, version),)),),
        metadata,
        f"{rel}:{version}:{meta!r}",
    )


class Driver:
    """Random steps through the ledger's write ops, as the daemon and the CLI run them."""

    def __init__(self, ledger: Ledger, rng: random.Random) -> None:
        self.ledger = ledger
        self.rng = rng
        self.now = time.time()
        self.backend = 0
        self.send = 0

    def step(self) -> None:
        getattr(self, self.rng.choice([n for n in dir(self) if n.startswith("do_")]))()
        self.now += self.rng.choice((0.0, 1.0, 100.0))

    def _watch(self) -> str:
        return self.rng.choice(WATCHES)

    def _claims(self) -> list:
        claims = self.ledger.due(self.now + 1000, 4)
        self.rng.shuffle(claims)
        return claims[: self.rng.randint(0, len(claims))]

    def do_apply_plan(self) -> None:
        rel = self.rng.choice(RELS)
        meta = self.rng.choice((None, 1, "text"))  # a metadata type conflict now and then
        plan = plan_of(rel, self.rng.randint(1, 3), meta)
        op = Ledger.op_apply_plan(
            self._watch(),
            "ds",
            plan,
            [(Entry(rel, 1, 1), "item")],
            type_conflicts,
            value_type,
            self.now,
        )
        self.ledger.transaction([op])

    def do_plan_failed(self) -> None:
        rel = self.rng.choice(RELS)
        op = Ledger.op_plan_failed(
            self._watch(), "ds", rel, rel, "fp", [(Entry(rel, 1, 1), "item")], "bad", self.now
        )
        self.ledger.transaction([op])

    def do_synced(self) -> None:
        ops = [
            Ledger.op_synced(c, {"m": 1} if c.plan else None, "id", self.now)
            for c in self._claims()
        ]
        self.ledger.transaction(ops)

    def do_synced_many(self) -> None:
        done = [(c, {"m": 1}, "id") for c in self._claims() if c.plan is not None]
        self.ledger.transaction([Ledger.op_synced_many(done, self.now)])

    def do_failed(self) -> None:
        ops = [
            Ledger.op_failed(c, "no", self.rng.choice(("sink", "media")), self.now)
            for c in self._claims()
        ]
        self.ledger.transaction(ops)

    def do_retry_later(self) -> None:
        ops = [
            Ledger.op_retry_later(c, "later", self.now + 5, count_attempt=True, now=self.now)
            for c in self._claims()
        ]
        ops += [op_retry_held(c, "full", "space", self.now + 50, self.now) for c in self._claims()]
        self.ledger.transaction(ops)

    def do_wake(self) -> None:
        self.ledger.transaction([op_wake_pending("space", self.now)])

    def do_retry(self) -> None:
        self.ledger.retry(self.rng.choice((None, *WATCHES)), self.now)

    def do_gone(self) -> None:
        rels = self.rng.sample(RELS, self.rng.randint(1, 3))
        on_delete = self.rng.choice(("keep", "delete"))
        self.ledger.transaction([Ledger.op_gone(self._watch(), rels, on_delete, self.now)])

    def do_drop(self) -> None:
        sids = self.rng.sample(RELS, 2)
        on_delete = self.rng.choice(("keep", "delete"))
        self.ledger.transaction([Ledger.op_drop_items(self._watch(), sids, on_delete, self.now)])

    def do_switch_backend(self) -> None:
        self.backend += self.rng.random() < 0.7
        self.ledger.transaction([op_switch_backend(f"b{self.backend}", self.now)])

    def do_watch_settings(self) -> None:
        self.send += 1
        op = op_watch_settings(self._watch(), "plan", f"s{self.send}", self.now)
        self.ledger.transaction([op])

    def do_rolled_back(self) -> None:
        # An op that fails after changing items is rolled back to its savepoint: the
        # counts it changed roll back with it.
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE items SET status='failed' WHERE status='pending'")
            raise RuntimeError("after the write")

        self.ledger.transaction([op])


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 60))
def test_counts_equal_a_recount_after_random_ops(seed: int, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(Path(tmp))
        try:
            driver = Driver(ledger, random.Random(seed))
            for _ in range(steps):
                driver.step()
                assert status_counts(ledger.conn) == recount(ledger.conn)
            for w in WATCHES:
                live = sum(n for s, n in recount(ledger.conn).get(w, {}).items() if s != "deleted")
                assert live_count(ledger.conn, w) == live
        finally:
            ledger.close()


def test_the_driver_reaches_every_status(tmp_path: Path) -> None:
    """The property above is only worth something if the random ops move items through
    every status; this pins that they do."""
    ledger = Ledger(tmp_path)
    driver = Driver(ledger, random.Random(7))
    seen: set[str] = set()
    for _ in range(400):
        driver.step()
        seen |= {s for c in recount(ledger.conn).values() for s in c}
    assert seen == {"pending", "synced", "failed", "deleted"}
    assert status_counts(ledger.conn) == recount(ledger.conn)


def test_pending_state_counts_pending_and_stuck(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    driver = Driver(ledger, random.Random(3))
    for rel in RELS:
        ledger.transaction(
            [
                Ledger.op_apply_plan(
                    "w1", "ds", plan_of(rel, 1), [], type_conflicts, value_type, driver.now
                )
            ]
        )
    for c in ledger.due(driver.now + 1, 2):
        for _ in range(5):
            ledger.transaction([Ledger.op_retry_later(c, "x", 0, count_attempt=True, now=0)])
    pending = recount(ledger.conn)["w1"]["pending"]
    assert pending_state(ledger.conn, ["w1", "w2"], 5) == {"w1": (pending, 2)}


def _old_ledger(state: Path) -> None:
    """A ledger as a version before item_counts left it: no table, no triggers."""
    ledger = Ledger(state)
    driver = Driver(ledger, random.Random(11))
    for _ in range(200):
        driver.step()
    conn = ledger.conn
    for trigger in ("item_counts_insert", "item_counts_delete", "item_counts_update"):
        conn.execute(f"DROP TRIGGER {trigger}")
    conn.execute("DROP TABLE item_counts")
    ledger.close()


def test_migration_fills_the_counts_of_an_existing_ledger(tmp_path: Path) -> None:
    _old_ledger(tmp_path)
    # A read-only connection before any writer migrated it counts the items itself.
    ro = Ledger(tmp_path, readonly=True)
    expected = recount(ro.conn)
    assert expected and status_counts(ro.conn) == expected
    ro.close()
    ledger = Ledger(tmp_path)
    assert status_counts(ledger.conn) == expected
    (n,) = ledger.conn.execute("SELECT count(*) FROM item_counts").fetchone()
    assert n == sum(len(c) for c in expected.values())
    # ...and the triggers keep it from there.
    driver = Driver(ledger, random.Random(12))
    for _ in range(100):
        driver.step()
    assert status_counts(ledger.conn) == recount(ledger.conn)
    ledger.close()


@pytest.mark.parametrize("watches", [None, ["w1"], ["w1", "w2"]])
def test_due_queries_read_the_due_index_in_order(tmp_path: Path, watches: list[str] | None) -> None:
    """The pool's queries read the (status, next_attempt) index in order: no sort of a
    backlog, and not the (watch, status, attempts) index, whatever the statistics say."""
    ledger = Ledger(tmp_path)
    conn = ledger.conn
    # Many watches with few pending items each: with these statistics SQLite prefers
    # the (watch, status, attempts) index and a sort, unless told otherwise.
    rows = [
        (f"w{w}", f"{i:06d}", "ds", f"{w}/{i}", "synced" if i % 3 else "pending", i % 7, 1.0)
        for w in range(50)
        for i in range(200)
    ]
    conn.executemany(
        "INSERT INTO items (watch, source_id, dataset, key, status, next_attempt, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    conn.execute("ANALYZE")
    traced: list[str] = []
    conn.set_trace_callback(traced.append)
    ledger.next_due_time(watches, [])
    ledger.due(time.time(), 4, [], watches)
    conn.set_trace_callback(None)
    selects = [q for q in traced if "ORDER BY next_attempt" in q]
    assert len(selects) == 2
    for q in selects:
        plan = " ".join(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {q}"))
        assert "items_due" in plan and "TEMP B-TREE" not in plan, plan
    ledger.close()
