"""Queue hints on a ledger several daemons share (pipeline/queue_hints.py, ledger/hints.py),
on both engines: stamps only rise, so a daemon never drops a row another daemon noted
after it; rows a dead daemon recorded are taken by the others; a plan from an older look
is repaired by a look, not a listing; a key written again before its deletion is applied
keeps its item."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ingestd.config import parse_bucket_url
from ingestd.ledger import (
    LedgerAt,
    op_drop_hint,
    op_hinted,
    op_note_hints,
    op_take_hints,
)
from ingestd.sources.objects import MemoryObjectStore
from ingestd.sources.queues.messages import Parsed, parse_s3

from tests.support.ledgers import ENGINES, ledger_at
from tests.support.queue_runner import QUEUE_URL, QueueRunner
from tests.support.wait import wait_until

URL = parse_bucket_url("s3://bkt/pre")
OLD = time.time_ns() - 3600 * 10**9


class Queue:
    """An SQS double: S3 notification bodies, each received until deleted."""

    url = QUEUE_URL
    describe = f"S3 event notifications from {url}"
    batch = 10

    def __init__(self) -> None:
        self.bodies: dict[int, str] = {}

    def send(self, name: str, key: str) -> None:
        record = {"eventName": name, "s3": {"bucket": {"name": "bkt"}, "object": {"key": key}}}
        record["eventTime"] = "2024-05-01T10:00:00.000Z"
        self.bodies[len(self.bodies)] = json.dumps({"Records": [record]})

    async def receive(self) -> list[tuple[Any, str]]:
        import asyncio

        batch = list(self.bodies.items())[:10]
        if not batch:
            await asyncio.sleep(0.01)
        return batch

    async def delete(self, receipts: list[Any]) -> None:
        for r in receipts:
            self.bodies.pop(r, None)

    def parse(self, body: str) -> Parsed:
        return parse_s3(body, "bkt", "pre/")

    async def close(self) -> None:
        return None


class Daemon(QueueRunner):
    """One watch runner with a queue, on a ledger that may be shared."""

    def __init__(self, at: LedgerAt, store: MemoryObjectStore, queue: Queue) -> None:
        super().__init__(at, store, queue, settle="0.2s", on_delete="delete", max_delete="100%")

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        return list(self.ledger.sync.conn.execute(sql).fetchall())

    def entries(self) -> dict[str, str]:
        return dict(self.query("SELECT relpath, etag FROM entries WHERE watch='b'"))  # type: ignore[arg-type]

    def status(self) -> dict[str, str]:
        return dict(self.query("SELECT source_id, status FROM items WHERE watch='b'"))  # type: ignore[arg-type]

    def rows(self) -> list[str]:
        return [
            r[0] for r in self.query("SELECT relpath FROM hints WHERE watch='b' AND done IS NULL")
        ]


@pytest.fixture(params=ENGINES)
def at(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    with ledger_at(request.param, tmp_path / "a", lease=1.0) as where:
        yield where


@pytest.fixture
async def daemon(at: LedgerAt) -> AsyncIterator[Daemon]:
    d = Daemon(at, MemoryObjectStore(URL), Queue())
    await d.ledger.open()
    yield d
    await d.runner.stop()
    await d.ledger.close()


async def test_a_rows_stamp_only_rises_so_an_earlier_look_cannot_drop_a_later_note(
    daemon: Daemon,
) -> None:
    write = daemon.ledger.write
    assert await write(op_note_hints("b", [("a", "created", None, None, 1.0)], 200)) == {"a": 200}
    # Another daemon's clock is behind: its later recording still raises the stamp.
    assert await write(op_note_hints("b", [("a", "created", None, None, 2.0)], 150)) == {"a": 201}
    assert not await write(op_drop_hint("b", "a", 200))  # the first look does not drop it
    assert await write(op_note_hints("b", [("z", "created", None, None, 1.0)], 300)) == {"z": 300}
    old = await write(op_take_hints("b", noted_before=250))
    assert [(r.relpath, r.noted) for r in old] == [("a", 201)]
    assert await write(op_hinted("b", ["a", "z", "y"])) == {"a", "z"}
    assert await write(op_drop_hint("b", "a", 201))
    assert daemon.rows() == ["z"]


async def test_rows_a_dead_daemon_recorded_are_taken_by_another(daemon: Daemon) -> None:
    daemon.hints.adopt_age = 0.5
    await daemon.runner.start()
    daemon.runner.source.handle.get().put("orphan.bin", b"o", OLD)  # type: ignore[attr-defined]
    # Recorded by a daemon that died before looking (its message is deleted): no message
    # will name the key again, and this daemon's start is long past.
    stamp = time.time_ns() - 5 * 10**9
    await daemon.ledger.write(
        op_note_hints("b", [("orphan.bin", "created", None, None, 1.0)], stamp)
    )
    await wait_until(lambda: "orphan.bin" in daemon.entries(), 10, what="the orphan planned")
    await wait_until(lambda: daemon.rows() == [], 10, what="its row dropped")


async def test_a_plan_from_an_older_look_is_repaired_by_a_look(daemon: Daemon) -> None:
    store = daemon.runner.source.handle.get()  # type: ignore[attr-defined]
    queue = daemon.runner.source.hint_feed().client
    await daemon.runner.start()
    store.put("a.bin", b"v1", OLD)
    queue.send("ObjectCreated:Put", "pre/a.bin")
    v1 = store.objects["a.bin"][1]
    await wait_until(lambda: daemon.entries().get("a.bin") == v1, 10, what="v1 planned")
    # Another daemon planned v2 from its message, then this one's older plan landed
    # last: no message is left to name the key. The sync step finds the ETag changed.
    store.put("a.bin", b"v2", OLD)
    v2 = store.objects["a.bin"][1]
    daemon.runner.hint_changed(["a.bin"])
    await wait_until(lambda: daemon.entries().get("a.bin") == v2, 10, what="v2 planned by a look")
    assert daemon.runner.scans == 1  # the start listing only: no listing was asked for
    assert daemon.rows() == []


async def test_a_key_written_again_before_its_deletion_is_applied_keeps_its_item(
    daemon: Daemon,
) -> None:
    store = daemon.runner.source.handle.get()  # type: ignore[attr-defined]
    queue = daemon.runner.source.hint_feed().client
    await daemon.runner.start()
    store.put("a.bin", b"v1", OLD)
    queue.send("ObjectCreated:Put", "pre/a.bin")
    await wait_until(lambda: "a.bin" in daemon.entries(), 10, what="planned")
    store.delete("a.bin")
    queue.send("ObjectRemoved:Delete", "pre/a.bin")
    await wait_until(lambda: "a.bin" in daemon.hints._gone, 10, what="found gone")
    # Written again before the deletion batch closes (its message still on the way).
    store.put("a.bin", b"v2", OLD)
    v2 = store.objects["a.bin"][1]
    await wait_until(
        lambda: not daemon.hints._gone and daemon.entries().get("a.bin") == v2,
        10,
        what="the key looked at again",
    )
    await wait_until(lambda: daemon.rows() == [], 10, what="rows dropped")
    assert daemon.status()["a.bin"] == "pending"
