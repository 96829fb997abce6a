"""Judging a queue that does not receive the bucket's events (pipeline/queue_hints.py
QueueJudge), and the hint rows it reads (ledger/hints.py): a row looked at is marked
done and kept a while, so the judge can tell that a key was named even after the daemon
that got its message planned it; a queue that lags behind the bucket is not named
before its messages had a chance to arrive; a queue that receives nothing still is.
Also the feed's concurrent receivers (sources/queues/feed.py). Both ledger engines.

The 20,000-object run of tests/e2e/test_many_daemons.py named the queue "not receiving"
falsely: moto's queue lagged minutes behind the writes, the lister found objects no
daemon had planned yet, and by the time it judged, the daemon that got their messages
had planned them and deleted the rows. `test_a_key_another_daemon_was_named_and_planned
_while_the_queue_lagged_is_not_a_false_alarm` is that, at small scale."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from ingestd.config import parse_bucket_url
from ingestd.ledger import AsyncLedger, LedgerAt, op_drop_hint, op_hinted, op_note_hints
from ingestd.ledger.hints import hint_count, op_clean_hints, op_take_hints
from ingestd.pipeline import queue_hints
from ingestd.sources.objects import MemoryObjectStore
from ingestd.sources.queues import QueueFeed
from ingestd.sources.queues import feed as feed_module
from ingestd.sources.queues.messages import Parsed, parse_s3

from tests.support.ledgers import ENGINES, ledger_at
from tests.support.queue_runner import QUEUE_URL, QueueRunner
from tests.support.wait import wait_until

URL = parse_bucket_url("s3://bkt/pre")
GRACE = 0.3  # UNANNOUNCED_GRACE, scaled down
SETTLE = 0.2


@pytest.fixture(autouse=True)
def quick_judge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue_hints, "UNANNOUNCED_GRACE", GRACE)
    monkeypatch.setattr(queue_hints, "JUDGE_EVERY", 0.05)
    monkeypatch.setattr(queue_hints, "CHECK_EVERY", 0.2)


def body(key: str, name: str = "ObjectCreated:Put") -> str:
    record = {
        "eventName": name,
        "eventTime": "2024-05-01T10:00:00.000Z",
        "s3": {"bucket": {"name": "bkt"}, "object": {"key": f"pre/{key}"}},
    }
    return json.dumps({"Records": [record]})


class LaggingQueue:
    """One queue that several daemons read, each through a `view`. While `lagging`, a
    receive that would return messages blocks instead, as a receive on a long queue
    does on moto: the queue is not empty, its messages just do not come. Messages go
    only to the views listed in `to` (so that a test decides which daemon is named a
    key); every other view blocks while any message waits, and finds the queue empty
    only when it is."""

    def __init__(self) -> None:
        self.bodies: dict[int, str] = {}
        self.taken: set[int] = set()
        self.lagging = False
        self.to: set[str] = set()
        self._n = 0
        self._changed = asyncio.Event()

    def send(self, text: str) -> None:
        self.bodies[self._n] = text
        self._n += 1
        self._changed.set()

    def release(self) -> None:
        self.lagging = False
        self._changed.set()

    def view(self, name: str) -> QueueView:
        return QueueView(self, name)

    async def receive(self, name: str) -> list[tuple[Any, str]]:
        while True:
            waiting = [(i, b) for i, b in self.bodies.items() if i not in self.taken]
            if not waiting:
                await asyncio.sleep(0.02)
                return []
            if not self.lagging and name in self.to:
                batch = waiting[:10]
                self.taken.update(i for i, _ in batch)
                return batch
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.05)

    async def delete(self, receipts: list[Any]) -> None:
        for r in receipts:
            self.bodies.pop(r, None)


class QueueView:
    url = QUEUE_URL
    describe = f"S3 event notifications from {url}"
    batch = 10

    def __init__(self, queue: LaggingQueue, name: str) -> None:
        self.queue = queue
        self.name = name

    async def receive(self) -> list[tuple[Any, str]]:
        return await self.queue.receive(self.name)

    async def delete(self, receipts: list[Any]) -> None:
        await self.queue.delete(receipts)

    def parse(self, text: str) -> Parsed:
        return parse_s3(text, "bkt", "pre/")

    async def close(self) -> None:
        return None


class Daemon(QueueRunner):
    """One watch runner with a queue, on a ledger that may be shared."""

    def __init__(self, at: LedgerAt, store: MemoryObjectStore, queue: QueueView) -> None:
        super().__init__(at, store, queue, settle=f"{SETTLE}s")

    def entries(self) -> set[str]:
        rows = self.ledger.sync.conn.execute("SELECT relpath FROM entries WHERE watch='b'")
        return {r[0] for r in rows.fetchall()}

    def done_rows(self) -> list[str]:
        rows = self.ledger.sync.conn.execute(
            "SELECT relpath FROM hints WHERE watch='b' AND done IS NOT NULL"
        )
        return [r[0] for r in rows.fetchall()]

    def live_rows(self) -> int:
        return hint_count(self.ledger.sync.conn, "b")  # type: ignore[arg-type]

    def problem(self) -> str | None:
        return self.ledger.sync.watch_problems().get("b")

    async def listing(self) -> None:
        """A full listing pass by this daemon (whoever holds the listing lease)."""
        assert await self.runner.scan("", reason="request")


@pytest.fixture(params=ENGINES)
def at(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LedgerAt]:
    with ledger_at(request.param, tmp_path / "a", lease=1.0) as where:
        yield where


@pytest.fixture
def store() -> MemoryObjectStore:
    return MemoryObjectStore(URL)


@pytest.fixture
async def daemons(
    at: LedgerAt, store: MemoryObjectStore
) -> AsyncIterator[tuple[LaggingQueue, Daemon, Daemon]]:
    """Two daemons on one ledger reading one queue: A lists and judges, B is the one
    the queue hands messages to."""
    queue = LaggingQueue()
    queue.to = {"B"}
    a = Daemon(at, store, queue.view("A"))
    # PostgreSQL: another daemon (its own holder id); SQLite: a second connection to the
    # same file, the nearest thing it has.
    b_at = at if at.dsn is None else LedgerAt(at.state_dir, dsn=at.dsn, lease=at.lease)
    b = Daemon(b_at, store, queue.view("B"))
    for d in (a, b):
        await d.ledger.open()
    yield queue, a, b
    for d in (a, b):
        await d.runner.stop()
        await d.ledger.close()


# -- hint rows: done, kept, cleaned --------------------------------------------------------


async def test_a_row_looked_at_is_done_kept_named_and_cleaned_later(at: LedgerAt) -> None:
    ledger = AsyncLedger(at)
    await ledger.open()
    try:
        write = ledger.write
        await write(op_note_hints("b", [("a", "created", None, None, 1.0)], 100))
        await write(op_note_hints("b", [("z", "created", None, None, 1.0)], 100))
        assert await write(op_drop_hint("b", "a", 100, now=1000.0))
        assert not await write(op_drop_hint("b", "a", 100, now=1001.0))  # done already
        # Done: not taken again, not counted as waiting, but still named.
        assert [r.relpath for r in await write(op_take_hints("b"))] == ["z"]
        assert hint_count(ledger.sync.conn, "b") == 1  # type: ignore[arg-type]
        assert await write(op_hinted("b", ["a", "z", "y"])) == {"a", "z"}
        # Named again: live again, with a stamp above the old one.
        assert await write(op_note_hints("b", [("a", "created", None, None, 2.0)], 50)) == {
            "a": 101
        }
        assert [r.relpath for r in await write(op_take_hints("b"))] == ["a", "z"]
        assert await write(op_clean_hints("b", done_before=5000.0)) == 0  # live rows stay
        assert await write(op_drop_hint("b", "a", 101, now=2000.0))
        await write(
            op_note_hints("b", [(f"k{i}", "created", None, None, 1.0) for i in range(5)], 7)
        )
        for i in range(5):
            assert await write(op_drop_hint("b", f"k{i}", 7, now=1000.0 + i))
        # Rows done before the cutoff go, a batch at a time; later ones stay.
        assert await write(op_clean_hints("b", done_before=1003.5, limit=3)) == 3
        assert await write(op_clean_hints("b", done_before=1003.5, limit=3)) == 1
        assert await write(op_clean_hints("b", done_before=1003.5, limit=3)) == 0
        assert await write(op_hinted("b", ["a", "z", *(f"k{i}" for i in range(5))])) == {
            "a",
            "z",
            "k4",
        }
    finally:
        await ledger.close()


# -- the judge ---------------------------------------------------------------------------


async def test_a_key_another_daemon_was_named_and_planned_while_the_queue_lagged_is_not_a_false_alarm(
    daemons: tuple[LaggingQueue, Daemon, Daemon],
    store: MemoryObjectStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queue, a, b = daemons
    # Judged only when due: the record it is judged by is then B's row, done long since.
    monkeypatch.setattr(queue_hints, "CHECK_EVERY", 60.0)
    await a.runner.start()
    await b.runner.start()
    queue.lagging = True
    store.put("late.bin", b"l")
    queue.send(body("late.bin"))  # its message is on the queue, far behind
    await asyncio.sleep(GRACE + SETTLE + 1.1)  # older than the grace when listed
    await a.listing()  # finds it new: no message named it yet
    await asyncio.sleep(3 * GRACE)  # lagging longer than the grace: not judged yet
    assert a.problem() is None
    queue.release()  # B gets the message, looks, plans and is done with the row
    await wait_until(lambda: b.done_rows() == ["late.bin"], 10, what="B done with its row")
    assert "late.bin" in b.entries() and b.live_rows() == 0
    await a.listing()  # the key is planned now: not listed; the earlier suspect is judged
    await wait_until(lambda: not a.hints.judge._suspects, 10, what="the suspect judged")
    await asyncio.sleep(0.3)
    assert a.problem() is None


async def test_a_queue_that_receives_nothing_is_named_and_stays_named_until_it_delivers(
    daemons: tuple[LaggingQueue, Daemon, Daemon], store: MemoryObjectStore
) -> None:
    queue, a, _ = daemons
    queue.to = {"A"}
    await a.runner.start()
    store.put("unannounced.bin", b"u")  # S3 sends nothing: the queue stays empty
    await asyncio.sleep(GRACE + SETTLE + 1.1)
    await a.listing()
    problem = await wait_until(a.problem, 10, what="the silent queue named")
    assert problem.startswith("queue not receiving: ") and "unannounced.bin" in problem
    assert "has been empty since" in problem and "not even S3's test event" in problem
    assert "unannounced.bin" in a.entries()  # the listing synced it meanwhile
    await a.listing()  # nothing new, but the queue still delivered nothing: kept
    assert a.problem() == problem
    store.put("announced.bin", b"a")
    queue.send(body("announced.bin"))
    await wait_until(lambda: "announced.bin" in a.entries(), 10, what="the message planned")
    await a.listing()
    assert a.problem() is None


async def test_a_queue_never_empty_is_judged_a_pass_later_as_maybe_lagging(
    daemons: tuple[LaggingQueue, Daemon, Daemon], store: MemoryObjectStore
) -> None:
    queue, a, _ = daemons
    await a.runner.start()
    queue.lagging = True
    queue.send(body("other.bin"))  # a backlog that does not move: never empty
    store.put("missed.bin", b"m")
    await asyncio.sleep(GRACE + SETTLE + 1.1)
    await a.listing()
    await asyncio.sleep(3 * GRACE)
    assert a.problem() is None  # not yet: its message may be behind the backlog
    await a.listing()  # a whole pass later
    problem = await wait_until(a.problem, 10, what="the queue named")
    assert "missed.bin" in problem and "lagging" in problem


# -- the feed's receivers ---------------------------------------------------------------


class SlowQueue:
    """A queue whose receives take a while: counts how many are in flight."""

    url = "http://queue.invalid/1/slow"
    describe = f"S3 event notifications from {url}"
    batch = 10

    def __init__(self, n: int) -> None:
        self.waiting = [body(f"o{i}.bin") for i in range(n)]
        self.in_flight = 0
        self.most = 0
        self.recorded: set[str] = set()
        self.deleted_unrecorded = 0

    async def receive(self) -> list[tuple[Any, str]]:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(0.02)
            batch, self.waiting = self.waiting[:10], self.waiting[10:]
            return [(b, b) for b in batch]
        finally:
            self.in_flight -= 1

    async def delete(self, receipts: list[Any]) -> None:
        for r in receipts:
            key = json.loads(r)["Records"][0]["s3"]["object"]["key"][len("pre/") :]
            self.deleted_unrecorded += key not in self.recorded

    def parse(self, text: str) -> Parsed:
        return parse_s3(text, "bkt", "pre/")

    async def close(self) -> None:
        return None


async def test_a_backlog_is_received_by_several_receivers_and_a_quiet_queue_by_one() -> None:
    queue = SlowQueue(400)
    feed = QueueFeed(queue, "b")
    assert feed.receivers == feed_module.RECEIVERS > 1

    async def record(hints: list[Any]) -> None:
        await asyncio.sleep(0.005)
        queue.recorded.update(h.relpath for h in hints)

    async def report(problem: str | None) -> None:
        assert problem is None

    task = asyncio.create_task(feed.run(record, report))
    try:
        await wait_until(lambda: len(queue.recorded) == 400, 10, what="the backlog taken")
        assert queue.most == feed_module.RECEIVERS
        assert queue.deleted_unrecorded == 0  # each batch recorded before its delete
        await asyncio.sleep(0.2)  # quiet now: the extra receivers wait
        queue.most = 0
        await asyncio.sleep(0.3)
        assert queue.most == 1
        assert feed.drained_at is not None and feed.drained_at > time.time() - 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
