"""A daemon that stalls past its leases does not send what another daemon took meanwhile
(pipeline/leases.py). The stall is real: daemon A's event loop is blocked in a
time.sleep on its own thread while daemon B, on the same PostgreSQL ledger, claims the
items whose leases ran out."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ingestd.core.model import Entry, ItemPayload, ItemPlan, PlannedFile, PlannedSlot
from ingestd.ledger import AsyncLedger, Ledger, LedgerAt
from ingestd.pipeline.leases import Leases
from ingestd.pipeline.pool import SyncPool
from ingestd.pipeline.side import WatchSide
from ingestd.plan.metadata import type_conflicts, value_type
from ingestd.sinks.base import Manifest, PutResult
from ingestd.sinks.memory import MemorySink
from ingestd.sources.local import LocalFolderSource

from tests.support.ledgers import ledger_at
from tests.support.wait import wait_for

LEASE = 1.5


class GatedSink(MemorySink):
    """Each put waits for `gate`: an upload under way for as long as the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.started: list[str] = []

    async def put_item(
        self, dataset: str, item: ItemPayload, previous: Manifest | None = None
    ) -> PutResult:
        self.started.append(item.key)
        await self.gate.wait()
        return await super().put_item(dataset, item, previous)


def plan_files(ledger: Ledger, root: Path, names: list[str]) -> None:
    ops = []
    for rel in names:
        p = root / rel
        p.write_bytes(rel.encode())
        st = os.stat(p)
        files = (PlannedFile(rel, rel, st.st_size, st.st_mtime_ns),)
        plan = ItemPlan(rel, "/", rel, (PlannedSlot("0", "image", files),), {}, f"{rel}:1")
        entry = Entry(rel, st.st_size, st.st_mtime_ns)
        ops.append(
            Ledger.op_apply_plan(
                "w", "ds", plan, [(entry, "item")], type_conflicts, value_type, time.time()
            )
        )
    ledger.transaction(ops)


@pytest.fixture
def at(tmp_path: Path) -> Iterator[LedgerAt]:
    with ledger_at("postgresql", tmp_path / "a", lease=LEASE) as where:
        yield where


class DaemonA:
    """A pool with one worker on its own thread and event loop, so that the test can
    stall that loop as a paused VM would."""

    def __init__(self, at: LedgerAt, root: Path) -> None:
        self.at, self.root = at, root
        self.ready = threading.Event()
        self.done = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pool: SyncPool | None = None
        self.sink: GatedSink | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        ledger = AsyncLedger(self.at)
        await ledger.open()
        self.sink = GatedSink()
        side = WatchSide(LocalFolderSource(self.root), 0.1, False)
        self.pool = SyncPool(ledger, self.sink, {"w": side}, workers=1)
        task = asyncio.create_task(self.pool.run(poll=0.05))
        self.ready.set()
        await asyncio.to_thread(self.done.wait)
        await self.pool.stop(1)
        task.cancel()
        await ledger.close()

    def call(self, fn: Any, *args: Any) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(fn, *args)


def claimed_by(ledger: Ledger) -> dict[str, str | None]:
    rows = ledger.conn.execute("SELECT source_id, claimed_by FROM items").fetchall()
    return {r[0]: r[1] for r in rows}


def test_a_stalled_daemon_sends_nothing_another_daemon_took(at: LedgerAt, tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    b = Ledger(LedgerAt(tmp_path / "b", dsn=at.dsn, lease=LEASE))
    plan_files(b, root, ["one.jpg", "two.jpg"])
    a = DaemonA(at, root)
    a.thread.start()
    try:
        assert a.ready.wait(30)
        assert a.sink is not None and a.pool is not None
        # One worker: "one" is being uploaded (held at the gate), "two" is claimed and
        # waits for the worker.
        wait_for(lambda: len(a.sink.started) == 1, 20, what="A's first upload")
        wait_for(lambda: a.pool.inflight == 2, 20, what="A to hold both items")
        a.call(time.sleep, LEASE * 4)  # A stalls
        taken = wait_for(lambda: b.due(time.time(), 10, [], ["w"]), 20, what="leases to lapse")
        assert sorted(c.source_id for c in taken) == ["one.jpg", "two.jpg"]
        assert set(claimed_by(b).values()) == {b.at.holder}
        keys = [(c.watch, c.source_id) for c in taken]

        def a_gave_up() -> bool:
            b.renew(keys)  # B is alive and working on them
            return a.pool is not None and a.pool.inflight == 0

        # A wakes up: its renewal finds both items lost, stops the upload of the first
        # and never sends the second; the gate stays shut, so only that empties its pool.
        wait_for(a_gave_up, 30, what="A to give up both items")
        a.call(a.sink.gate.set)
        assert len(a.sink.started) == 1, "A sent an item B had taken"
        assert a.sink.items == {}, "A's interrupted upload completed"
        assert set(claimed_by(b).values()) == {b.at.holder}, "A's outcomes touched B's claims"
    finally:
        a.done.set()
        a.thread.join(30)
        b.close()


async def test_the_fence_costs_nothing_while_a_lease_is_fresh_and_names_a_lost_one(
    at: LedgerAt, tmp_path: Path
) -> None:
    root = tmp_path / "src"
    root.mkdir()
    b = Ledger(LedgerAt(tmp_path / "b", dsn=at.dsn, lease=LEASE))
    plan_files(b, root, ["x.jpg"])
    ledger = AsyncLedger(at)
    await ledger.open()
    lost_heard: list[set[tuple[str, str]]] = []
    leases = Leases(ledger, lost_heard.append)
    try:
        asked = time.monotonic()
        claims = await ledger.call(ledger.sync.due, time.time(), 10, [], ["w"])
        leases.claimed(claims, asked)
        key = ("w", "x.jpg")
        calls = 0
        renew = ledger.sync.renew

        def counting(keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
            nonlocal calls
            calls += 1
            return renew(keys)

        ledger.sync.renew = counting  # type: ignore[method-assign]
        assert await leases.fence([key]) == set()
        assert calls == 0, "a fresh lease is answered without a round trip"
        wait_for(lambda: b.due(time.time(), 10, [], ["w"]), 20, what="the lease to lapse")
        assert await leases.fence([key]) == {key}
        assert calls == 1 and lost_heard == [{key}]
        assert await leases.fence([key]) == {key}, "lost stays lost"
        assert calls == 1
    finally:
        await ledger.close()
        b.close()
