"""The ledger's state machine and the sync pool against the in-memory test sink, on
both engines (SQLite, and PostgreSQL in a schema of its own)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ingestd.core.errors import PermanentError, RetriableError
from ingestd.core.model import Entry, ItemPlan, PlannedFile, PlannedSlot
from ingestd.ledger import AsyncLedger, Ledger, LedgerAt
from ingestd.ledger.ledger import Failed
from ingestd.pipeline.outcome import backoff_delay
from ingestd.pipeline.pool import SyncPool
from ingestd.pipeline.side import WatchSide
from ingestd.plan.metadata import type_conflicts, value_type
from ingestd.sinks.memory import MemorySink
from ingestd.sources.local import LocalFolderSource

from tests.support.ledgers import ENGINES, CountingConn, ledger_at


def make_plan(
    rel: str, size: int, mtime: int, meta: dict | None = None, path: str = "/"
) -> ItemPlan:
    name = rel.rsplit("/", 1)[-1]
    fp = f"{rel}:{size}:{mtime}:{sorted((meta or {}).items())}:{path}"
    return ItemPlan(
        rel,
        path,
        name,
        (PlannedSlot("0", "image", (PlannedFile(name, rel, size, mtime),)),),
        dict(meta or {}),
        fp,
    )


def apply(ledger: Ledger, plan: ItemPlan, watch: str = "w", dataset: str = "ds") -> str:
    entry = Entry(plan.source_id, plan.slots[0].files[0].size, plan.slots[0].files[0].mtime_ns)
    op = Ledger.op_apply_plan(
        watch, dataset, plan, [(entry, "item")], type_conflicts, value_type, time.time()
    )
    (result,) = ledger.transaction([op])
    return result


@pytest.fixture(params=ENGINES)
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LedgerAt]:
    with ledger_at(request.param, tmp_path / "state") as at:
        yield at


@pytest.fixture
def ledger(where: LedgerAt) -> Iterator[Ledger]:
    lg = Ledger(where)
    yield lg
    lg.close()


def test_plan_states(ledger: Ledger) -> None:
    p = make_plan("a.jpg", 1, 1)
    assert apply(ledger, p) == "pending"
    assert apply(ledger, p) == "unchanged"
    assert apply(ledger, make_plan("a.jpg", 2, 2)) == "pending"
    assert ledger.counts()["w"].pending == 1


def test_key_conflict_fails_the_second_file_naming_both(ledger: Ledger) -> None:
    # preserve_folders: false puts both files at /a.jpg
    assert apply(ledger, make_plan("x/a.jpg", 1, 1)) == "pending"
    assert apply(ledger, make_plan("y/a.jpg", 1, 1)) == "failed"
    (err,) = ledger.last_errors("w")
    assert "y/a.jpg" in err["error"] and "x/a.jpg" in err["error"]
    assert ledger.item_row("w", "x/a.jpg")["status"] == "pending"


def test_metadata_type_conflict_names_the_key(ledger: Ledger) -> None:
    assert apply(ledger, make_plan("a.jpg", 1, 1, {"exposure": 1})) == "pending"
    assert apply(ledger, make_plan("b.jpg", 1, 1, {"exposure": "high"})) == "failed"
    assert '"exposure"' in ledger.item_row("w", "b.jpg")["last_error"]
    # the first item may change its own key's type while it is the only one using it
    assert apply(ledger, make_plan("a.jpg", 1, 2, {"exposure": "low"})) == "pending"


def test_synced_only_if_desired_did_not_move(ledger: Ledger) -> None:
    apply(ledger, make_plan("a.jpg", 1, 1))
    (claim,) = ledger.due(time.time() + 1, 10)
    apply(ledger, make_plan("a.jpg", 2, 2))  # changed while in flight
    ledger.transaction([Ledger.op_synced(claim, {"m": 1}, "id", time.time())])
    row = ledger.item_row("w", "a.jpg")
    assert row["status"] == "pending" and row["synced_fp"] == claim.desired_fp
    (claim2,) = ledger.due(time.time() + 1, 10)
    ledger.transaction([Ledger.op_synced(claim2, {"m": 2}, "id", time.time())])
    assert ledger.item_row("w", "a.jpg")["status"] == "synced"


def test_gone_keep_and_delete(ledger: Ledger) -> None:
    for rel in ("k.jpg", "d.jpg"):
        apply(ledger, make_plan(rel, 1, 1))
    for claim in ledger.due(time.time() + 1, 10):
        ledger.transaction([Ledger.op_synced(claim, {"path": "/", "name": claim.key[1:]}, "id", 0)])
    ledger.transaction([Ledger.op_gone("w", ["k.jpg"], "keep", 0)])
    assert ledger.item_row("w", "k.jpg")["status"] == "deleted"
    ledger.transaction([Ledger.op_gone("w", ["d.jpg"], "delete", 0)])
    (claim,) = ledger.due(time.time() + 1, 10)
    assert claim.plan is None and claim.synced_manifest is not None
    ledger.transaction([Ledger.op_synced(claim, None, None, 0)])
    assert ledger.item_row("w", "d.jpg")["status"] == "deleted"
    assert ledger.live_count("w") == 0


def test_retry_requeues_failed(ledger: Ledger) -> None:
    apply(ledger, make_plan("a.jpg", 1, 1))
    (claim,) = ledger.due(time.time() + 1, 10)
    ledger.transaction([Ledger.op_failed(claim, "rejected", "sink", 0)])
    assert ledger.counts()["w"].failed == 1
    assert ledger.retry("w") == 1
    assert ledger.counts()["w"].pending == 1


def test_a_retried_conflict_is_claimed_with_the_key_owner(ledger: Ledger) -> None:
    """Claims are read a batch at a time (rows, then the key owners): each keeps its
    own owner, and the order of the due query."""
    for i in range(5):
        apply(ledger, make_plan(f"x{i}/a{i}.jpg", 1, 1))
    assert apply(ledger, make_plan("y/a2.jpg", 1, 1)) == "failed"  # /a2.jpg is x2's
    # Queued again with its plan while x2 still holds the key (as an item that failed
    # for another reason and is retried would be):
    ledger.conn.execute(
        "UPDATE items SET status='pending', error_kind=NULL WHERE source_id='y/a2.jpg'"
    )
    claims = ledger.due(time.time() + 1, 10)
    assert [c.source_id for c in claims][:5] == [f"x{i}/a{i}.jpg" for i in range(5)]
    owners = {c.source_id: c.key_owner for c in claims}
    # Both are pending with one key now: each claim names the other, as key_owner does.
    assert owners == {
        **{f"x{i}/a{i}.jpg": None for i in (0, 1, 3, 4)},
        "x2/a2.jpg": ("w", "y/a2.jpg"),
        "y/a2.jpg": ("w", "x2/a2.jpg"),
    }


def _bad_sql(conn: object) -> None:
    conn.execute("UPDATE items SET status='synced' WHERE watch='w'")  # type: ignore[attr-defined]
    conn.execute("INSERT INTO no_such_table VALUES (1)")  # type: ignore[attr-defined]


def _bad_python(conn: object) -> None:
    conn.execute("UPDATE items SET status='failed' WHERE watch='w'")  # type: ignore[attr-defined]
    raise ValueError("an op's own bug")


def _swallows(conn: object) -> str:
    """A failed statement caught inside the op: PostgreSQL has aborted the transaction
    all the same, and a COMMIT then would roll everything back without an error."""
    try:
        conn.execute("INSERT INTO no_such_table VALUES (1)")  # type: ignore[attr-defined]
    except Exception:
        return "swallowed"
    return "ran"


@pytest.mark.parametrize("bad", [_bad_sql, _bad_python, _swallows])
def test_one_failing_op_does_not_roll_back_the_others(ledger: Ledger, bad: object) -> None:
    """A group commit's ops stand alone: a failing op's own writes are undone, the
    others' are committed (PostgreSQL runs the ops without savepoints first and, when
    one fails, all of them again with a savepoint each)."""
    apply(ledger, make_plan("a.jpg", 1, 1))
    apply(ledger, make_plan("b.jpg", 1, 1))
    claims = {c.source_id: c for c in ledger.due(time.time() + 1, 10)}
    results = ledger.transaction(
        [
            Ledger.op_synced(claims["a.jpg"], {"m": 1}, "id-a", 0),
            bad,  # type: ignore[list-item]
            Ledger.op_failed(claims["b.jpg"], "rejected", "sink", 0),
        ]
    )
    assert results[0] is None and results[2] is None, [getattr(r, "error", r) for r in results]
    if bad is _swallows and ledger.shared:
        assert isinstance(results[1], Failed), "an aborted transaction is the op's failure"
    elif bad is not _swallows:
        assert isinstance(results[1], Failed)
    assert ledger.item_row("w", "a.jpg")["status"] == "synced"
    assert ledger.item_row("w", "a.jpg")["backend_id"] == "id-a"
    assert ledger.item_row("w", "b.jpg")["status"] == "failed"
    assert ledger.counts()["w"].synced == 1 and ledger.counts()["w"].failed == 1


def test_a_claimed_batch_costs_a_few_statements_not_a_few_per_item(ledger: Ledger) -> None:
    for i in range(64):
        apply(ledger, make_plan(f"f{i:02}.jpg", 1, 1))
    real = ledger.conn
    ledger.conn = counting = CountingConn(real)
    try:
        claims = ledger.due(time.time() + 1, 64, [], ["w"])
        assert len(claims) == 64
        # SQLite: the due keys, the rows, the key owners. PostgreSQL: the claim returns
        # the rows; then the key owners.
        assert len(counting.sent) == (2 if ledger.shared else 3), counting.sent
        counting.sent.clear()
        ledger.transaction(
            [
                Ledger.op_retry_later(c, None, time.time() + 60, count_attempt=False, now=0)
                for c in claims
            ]
        )
        # BEGIN, one statement per op, COMMIT; SQLite keeps a savepoint per op (no
        # round trips there).
        assert counting.sent.count("SAVEPOINT") == (0 if ledger.shared else 64)
    finally:
        ledger.conn = real
    assert ledger.counts()["w"].pending == 64


def test_backoff_is_capped_jittered_and_honours_retry_after() -> None:
    delays = [backoff_delay(30) for _ in range(200)]
    assert max(delays) <= 300 and min(delays) >= 0.1
    assert len({round(d, 3) for d in delays}) > 100  # jittered
    assert backoff_delay(0, retry_after=42) >= 42


# -- the pool ---------------------------------------------------------------------------


async def run_pool(
    tmp_path: Path, sink: MemorySink, files: dict[str, bytes], until, where: LedgerAt
) -> AsyncLedger:
    root = tmp_path / "src"
    root.mkdir(exist_ok=True)
    ledger = AsyncLedger(where)
    await ledger.open()
    ops = []
    for rel, data in files.items():
        p = root / rel
        p.write_bytes(data)
        st = os.stat(p)
        plan = make_plan(rel, st.st_size, st.st_mtime_ns)
        ops.append(
            Ledger.op_apply_plan("w", "ds", plan, [], type_conflicts, value_type, time.time())
        )
    await ledger.write_many(ops)
    pool = SyncPool(ledger, sink, {"w": WatchSide(LocalFolderSource(root), 0.1, False)}, workers=3)
    task = asyncio.create_task(pool.run(poll=0.05))
    deadline = time.monotonic() + 20
    while not await ledger.call(until, ledger.sync):
        assert time.monotonic() < deadline, "pool did not reach the expected state"
        await asyncio.sleep(0.02)
    await pool.stop(1)
    task.cancel()
    return ledger


def _all_synced(n: int):
    return lambda lg: lg.counts().get("w") is not None and lg.counts()["w"].synced == n


async def test_pool_syncs_and_skips_unchanged_content(tmp_path: Path, where: LedgerAt) -> None:
    sink = MemorySink()
    files = {f"f{i}.jpg": f"content {i}".encode() for i in range(20)}
    ledger = await run_pool(tmp_path, sink, files, _all_synced(20), where)
    puts = [c for c in sink.calls if c[0] == "put_item"]
    assert len(puts) == 20
    # touch every file: new fingerprints, same bytes → no sink call at all
    root = tmp_path / "src"
    ops = []
    for rel in files:
        os.utime(root / rel, ns=(1, 1))
        plan = make_plan(rel, os.stat(root / rel).st_size, 1)
        ops.append(Ledger.op_apply_plan("w", "ds", plan, [], type_conflicts, value_type, 0))
    await ledger.write_many(ops)
    await ledger.close()
    sink2_calls_before = len(sink.calls)
    ledger = await run_pool(tmp_path, sink, {}, _all_synced(20), where)
    assert len(sink.calls) == sink2_calls_before
    await ledger.close()


async def test_pool_retries_transient_and_records_permanent(
    tmp_path: Path, where: LedgerAt
) -> None:
    sink = MemorySink()
    sink.fail_next(2, RetriableError("503 from backend", retry_after=0.05))
    ledger = await run_pool(tmp_path, sink, {"a.jpg": b"a"}, _all_synced(1), where)
    await ledger.close()
    sink.fail_next(1, PermanentError("rejected: bad name"))
    (tmp_path / "src" / "b.jpg").write_bytes(b"b")

    def failed(lg: Ledger) -> bool:
        return lg.counts()["w"].failed == 1

    ledger = await run_pool(tmp_path, sink, {"b.jpg": b"b"}, failed, where)
    row = await ledger.call(ledger.sync.item_row, "w", "b.jpg")
    assert row["last_error"] == "rejected: bad name"
    await ledger.close()


async def test_pool_discards_a_file_changed_since_planned(tmp_path: Path, where: LedgerAt) -> None:
    sink = MemorySink()
    root = tmp_path / "src"
    root.mkdir()
    ledger = AsyncLedger(where)
    await ledger.open()
    (root / "a.jpg").write_bytes(b"first")
    plan = make_plan("a.jpg", 5, os.stat(root / "a.jpg").st_mtime_ns)
    (root / "a.jpg").write_bytes(b"second version")  # changes after planning
    await ledger.write(Ledger.op_apply_plan("w", "ds", plan, [], type_conflicts, value_type, 0))
    changed: list[list[str]] = []
    pool = SyncPool(
        ledger,
        sink,
        {"w": WatchSide(LocalFolderSource(root), 30.0, False)},
        workers=1,
        on_source_changed=lambda w, rels: changed.append(rels),
    )
    task = asyncio.create_task(pool.run(poll=0.05))
    deadline = time.monotonic() + 10
    while not changed:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await pool.stop(1)
    task.cancel()
    assert changed == [["a.jpg"]]
    assert sink.calls == []  # the half-seen version never reached the sink
    row = await ledger.call(ledger.sync.item_row, "w", "a.jpg")
    assert row["status"] == "pending" and row["attempts"] == 0
    await ledger.close()


def test_a_key_used_by_two_items_keeps_its_type(ledger: Ledger) -> None:
    assert apply(ledger, make_plan("a.jpg", 1, 1, {"n": 1})) == "pending"
    assert apply(ledger, make_plan("b.jpg", 1, 1, {"n": 2})) == "pending"
    # a, which set the key first, may no longer change its type: b uses it too
    assert apply(ledger, make_plan("a.jpg", 1, 2, {"n": "one"})) == "failed"
    assert '"n"' in ledger.item_row("w", "a.jpg")["last_error"]


# -- faults that are not the item's (issue 14, point 1) ----------------------------------


def _limit_pages(ledger: AsyncLedger, extra: int | None) -> None:
    """SQLite's own size cap: at the current size, every write that grows the file fails
    with the real "database or disk is full" (None lifts it)."""
    conn = ledger.sync.conn
    if extra is None:
        conn.execute("PRAGMA max_page_count=1073741823")
        return
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={pages + extra}")


async def test_a_full_ledger_is_a_problem_until_a_probe_write_commits(tmp_path: Path) -> None:
    ledger = AsyncLedger(tmp_path / "state")
    await ledger.open()
    woken: list[bool] = []
    ledger.add_writable_listener(lambda: woken.append(True))
    await ledger.call(_limit_pages, ledger, 0)
    ops = [
        Ledger.op_apply_plan(
            "w",
            "ds",
            make_plan(f"big{i:04d}-{'x' * 200}.jpg", i, i),
            [],
            type_conflicts,
            value_type,
            0,
        )
        for i in range(300)
    ]
    # SQLite rolls the transaction back itself, so the error raised may be the failed
    # ROLLBACK's; the ledger finds the disk-full cause in its context.
    with pytest.raises(sqlite3.Error):
        await ledger.write_many(ops)
    assert not ledger.writable.is_set()
    assert ledger.problem is not None and "ledger.sqlite cannot be written: disk full" in (
        ledger.problem
    )
    await asyncio.sleep(1.5)  # a probe or two fail meanwhile: still held
    assert ledger.problem is not None and not woken
    await ledger.call(_limit_pages, ledger, None)
    await asyncio.wait_for(ledger.wait_writable(), 5)
    assert ledger.problem is None and woken == [True]
    await ledger.write_many(ops)  # kept by the caller, written now
    assert (await ledger.call(ledger.sync.counts))["w"].pending == 300
    await ledger.close()


async def test_pool_keeps_an_outcome_it_cannot_record_and_sends_nothing_meanwhile(
    tmp_path: Path,
) -> None:
    root = tmp_path / "src"
    root.mkdir()
    ledger = AsyncLedger(tmp_path / "state")
    await ledger.open()
    (root / "a.jpg").write_bytes(b"a")
    st = os.stat(root / "a.jpg")
    plan = make_plan("a.jpg", st.st_size, st.st_mtime_ns, {"k": "v" * 3000})
    await ledger.write(Ledger.op_apply_plan("w", "ds", plan, [], type_conflicts, value_type, 0))
    sink = MemorySink()
    pool = SyncPool(ledger, sink, {"w": WatchSide(LocalFolderSource(root), 0.1, False)}, workers=2)
    # Full before the outcome is written: op_synced's row (with its manifest) must grow.
    await ledger.call(_limit_pages, ledger, 0)
    task = asyncio.create_task(pool.run(poll=0.05))
    deadline = time.monotonic() + 10
    while ledger.problem is None:
        assert time.monotonic() < deadline, "the outcome's write never failed"
        await asyncio.sleep(0.02)
    await asyncio.sleep(1.0)
    puts = [c for c in sink.calls if c[0] == "put_item"]
    assert len(puts) == 1, "an item whose outcome was not recorded was sent again"
    assert pool.inflight == 1
    await ledger.call(_limit_pages, ledger, None)
    deadline = time.monotonic() + 10
    while not (await ledger.call(_all_synced(1), ledger.sync)):
        assert time.monotonic() < deadline, "the kept outcome was never written"
        await asyncio.sleep(0.02)
    assert len([c for c in sink.calls if c[0] == "put_item"]) == 1
    await pool.stop(1)
    task.cancel()
    await ledger.close()


async def test_out_of_space_holds_the_pool_probes_one_item_and_wakes_all(
    tmp_path: Path,
) -> None:
    from ingestd.core.errors import SPACE

    sink = MemorySink()
    full = RetriableError("the local store at /x is out of disk space", condition=SPACE)
    sink.fail_next(10_000, full)
    root = tmp_path / "src"
    root.mkdir()
    ledger = AsyncLedger(tmp_path / "state")
    await ledger.open()
    ops = []
    for i in range(12):
        (root / f"f{i}.jpg").write_bytes(b"%d" % i)
        st = os.stat(root / f"f{i}.jpg")
        plan = make_plan(f"f{i}.jpg", st.st_size, st.st_mtime_ns)
        ops.append(Ledger.op_apply_plan("w", "ds", plan, [], type_conflicts, value_type, 0))
    await ledger.write_many(ops)
    pool = SyncPool(ledger, sink, {"w": WatchSide(LocalFolderSource(root), 0.1, False)}, workers=3)
    task = asyncio.create_task(pool.run(poll=0.05))
    deadline = time.monotonic() + 10
    while pool.problem is None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert "out of disk space; free space there" in pool.problem
    n0 = len(sink.calls)
    await asyncio.sleep(3.0)
    # One probe a second (the calls the hold found in flight aside), not 12 items each
    # backing off on its own.
    assert 1 <= len(sink.calls) - n0 <= 5
    rows = [await ledger.call(ledger.sync.item_row, "w", f"f{i}.jpg") for i in range(12)]
    assert all(r["attempts"] == 0 for r in rows), "a held item counted an attempt"
    sink.fail_next(0, full)
    sink._failures.clear()
    freed = time.monotonic()
    while not (await ledger.call(_all_synced(12), ledger.sync)):
        assert time.monotonic() < freed + 5, "items did not all continue after the probe"
        await asyncio.sleep(0.02)
    assert pool.problem is None
    await pool.stop(1)
    task.cancel()
    await ledger.close()


def test_a_reason_quoting_a_name_that_is_not_utf8_is_stored(ledger: Ledger) -> None:
    """An OSError's filename keeps undecodable bytes as lone surrogates; recording the
    failure must not fail the transaction (SQLite takes UTF-8 only)."""
    bad = os.fsdecode(b"/drop/caf\xe9.dat")
    apply(ledger, make_plan("a.dat", 1, 1))
    [claim] = ledger.due(time.time() + 1, 10, [], ["w"])
    ledger.transaction([Ledger.op_failed(claim, f"cannot read {bad}: I/O error", "sink", 1.0)])
    ledger.transaction([Ledger.op_set_problem("w", f"cannot list {bad}", 1.0)])
    [err] = ledger.last_errors("w")
    assert err["error"] == "cannot read /drop/caf%E9.dat: I/O error"
    assert ledger.watch_problems() == {"w": "cannot list /drop/caf%E9.dat"}
