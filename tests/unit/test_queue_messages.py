"""Bucket event queues: the message formats (S3 notifications, SNS envelopes, Event Grid),
the watch's `queue` key, the ledger's hint rows, and the runner taking hints through a
queue double: recorded before the messages are deleted, taken again after a crash."""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ingestd.config import ConfigError, Watch, load_config, parse_bucket_url
from ingestd.ledger import AsyncLedger, op_drop_hint, op_note_hints, op_take_hints
from ingestd.pipeline.runner import WatchRunner
from ingestd.sources.bucket_poll import StoreHandle
from ingestd.sources.bucket_source import BucketSource
from ingestd.sources.objects import MemoryObjectStore
from ingestd.sources.queues import QueueError, QueueFeed
from ingestd.sources.queues.messages import (
    NotAnEvent,
    Parsed,
    parse_event_grid,
    parse_s3,
)
from ingestd.sources.queues.sqs import region_of

from tests.support.wait import wait_until

# -- S3 event notifications -----------------------------------------------------------------


def s3_record(name: str, key: str, bucket: str = "bkt", **obj: Any) -> dict[str, Any]:
    return {
        "eventName": name,
        "eventTime": "2024-05-01T10:00:00.000Z",
        "s3": {"bucket": {"name": bucket}, "object": {"key": key, **obj}},
    }


def test_s3_created_and_removed_with_keys_url_decoded() -> None:
    body = json.dumps(
        {
            "Records": [
                s3_record("ObjectCreated:Put", "pre/a+b%2Bc.jpg", size=3, eTag="abc"),
                s3_record("ObjectCreated:CompleteMultipartUpload", "pre%2Fdeep%2Fx.bin"),
                s3_record("ObjectRemoved:Delete", "pre/gone.jpg"),
                s3_record("ObjectRestore:Completed", "pre/r.jpg"),  # no new content
                s3_record("ObjectCreated:Put", "other/x.jpg"),  # outside the prefix
                s3_record("ObjectCreated:Put", "pre/y.jpg", bucket="another"),
                s3_record("ObjectCreated:Put", "pre/folder/"),  # a placeholder
            ]
        }
    )
    parsed = parse_s3(body, "bkt", "pre/")
    assert [(h.relpath, h.kind) for h in parsed.hints] == [
        ("a b+c.jpg", "created"),  # '+' is a space, %2B a plus
        ("deep/x.bin", "created"),
        ("gone.jpg", "removed"),
    ]
    first = parsed.hints[0]
    assert (first.size, first.etag) == (3, "abc")
    assert first.event_time == pytest.approx(1714557600.0)
    assert parsed.events == 7 and not parsed.test_event


def test_s3_test_event_and_sns_envelope() -> None:
    test = json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "bkt"})
    assert parse_s3(test, "bkt", "") == Parsed([], test_event=True)
    inner = json.dumps({"Records": [s3_record("ObjectCreated:Copy", "k.png")]})
    envelope = json.dumps({"Type": "Notification", "Message": inner, "TopicArn": "arn:t"})
    assert [h.relpath for h in parse_s3(envelope, "bkt", "").hints] == ["k.png"]


@pytest.mark.parametrize("body", ["not json", "[1, 2]", '{"Hello": 1}'])
def test_s3_bodies_that_are_no_event(body: str) -> None:
    with pytest.raises(NotAnEvent):
        parse_s3(body, "bkt", "")


# -- Event Grid ------------------------------------------------------------------------------


def grid_event(etype: str, container: str, key: str, **data: Any) -> dict[str, Any]:
    return {
        "topic": "/subscriptions/x/resourceGroups/g/providers/Microsoft.Storage/"
        "storageAccounts/acct",
        "subject": f"/blobServices/default/containers/{container}/blobs/{key}",
        "eventType": etype,
        "eventTime": "2024-05-01T10:00:00Z",
        "id": "1",
        "data": data,
    }


def as_queue_text(doc: Any) -> str:
    return base64.b64encode(json.dumps(doc).encode()).decode()


def test_event_grid_messages_base64_encoded_as_event_grid_writes_them() -> None:
    created = grid_event(
        "Microsoft.Storage.BlobCreated", "scans", "in/a b.dcm", contentLength=5, eTag="0x8D1"
    )
    parsed = parse_event_grid(as_queue_text(created), "scans", "in/")
    assert [(h.relpath, h.kind, h.size, h.etag) for h in parsed.hints] == [
        ("a b.dcm", "created", 5, "0x8D1")
    ]
    deleted = grid_event("Microsoft.Storage.BlobDeleted", "scans", "in/x")
    assert parse_event_grid(json.dumps(deleted), "scans", "in/").hints[0].kind == "removed"
    others = [
        grid_event("Microsoft.Storage.BlobCreated", "other", "in/x"),
        grid_event("Microsoft.Storage.BlobTierChanged", "scans", "in/x"),
        grid_event("Microsoft.Storage.BlobCreated", "scans", "out/x"),
    ]
    assert parse_event_grid(as_queue_text(others), "scans", "in/").hints == []
    cloud = {
        "specversion": "1.0",
        "type": "Microsoft.Storage.BlobCreated",
        "subject": "/blobServices/default/containers/scans/blobs/in/c.png",
        "time": "2024-05-01T10:00:00Z",
        "data": {},
    }
    assert [h.relpath for h in parse_event_grid(json.dumps(cloud), "scans", "in/").hints] == [
        "c.png"
    ]
    for bad in ("%%%", as_queue_text({"no": "event"})):
        with pytest.raises(NotAnEvent):
            parse_event_grid(bad, "scans", "")


# -- config -------------------------------------------------------------------------------------


def load(tmp_path: Path, watch: dict[str, Any]) -> Any:
    cfg = tmp_path / "c.yaml"
    base = {"name": "b", "dataset": "ds", **watch}
    cfg.write_text(json.dumps({"backend": {"kind": "local"}, "watches": [base]}))
    return load_config(cfg)


def test_queue_config(tmp_path: Path) -> None:
    q = "https://sqs.eu-west-1.amazonaws.com/123456789012/uploads"
    w = load(tmp_path, {"source": "s3://bkt/in", "queue": {"url": q}}).watches[0]
    assert w.queue_kind == "sqs" and w.poll_interval == 3600.0  # listing: the repair path
    w = load(
        tmp_path, {"source": "s3://bkt/in", "queue": {"url": q}, "poll_interval": "10m"}
    ).watches[0]
    assert w.poll_interval == 600.0
    az = "https://acct.queue.core.windows.net/blobs"
    assert load(tmp_path, {"source": "az://scans/in", "queue": {"url": az}}).watches[
        0
    ].queue_kind == ("azure_queue")
    assert load(tmp_path, {"source": "s3://bkt/in"}).watches[0].poll_interval == 60.0
    bad = [
        ({"source": str(tmp_path), "queue": {"url": q}}, "bucket sources only"),
        ({"source": "gs://bkt/in", "queue": {"url": q}}, "Pub/Sub"),
        ({"source": "s3://bkt/in", "queue": {"url": q, "kind": "azure_queue"}}, "use sqs"),
        ({"source": "s3://bkt/in", "queue": {"url": "sqs://x"}}, "http(s) URL"),
        ({"source": "s3://bkt/in", "queue": {"url": q, "arn": "x"}}, "queue.arn: unknown key"),
    ]
    for watch, words in bad:
        with pytest.raises(ConfigError) as e:
            load(tmp_path, watch)
        assert words in str(e.value), (watch, str(e.value))


def test_sqs_region_from_the_queue_host() -> None:
    opts = Watch.model_validate(
        {"name": "b", "source": "s3://bkt/", "dataset": "d", "source_options": {"region": "r-1"}}
    ).source_options
    assert region_of("https://sqs.eu-west-1.amazonaws.com/1/q", opts) == "eu-west-1"
    assert region_of("https://us-gov-west-1.queue.amazonaws.com/1/q", opts) == "us-gov-west-1"
    assert region_of("http://127.0.0.1:5000/1/q", opts) == "r-1"


# -- hint rows ----------------------------------------------------------------------------------


async def test_hint_rows_keep_the_latest_event_and_drop_only_what_was_looked_at(
    tmp_path: Path,
) -> None:
    ledger = AsyncLedger(tmp_path / "state")
    await ledger.open()
    try:
        await ledger.write(op_note_hints("w", [("a", "created", "e1", 1, 10.0)], 100))
        # An older event arriving later keeps the newer details but is noted again.
        await ledger.write(op_note_hints("w", [("a", "removed", None, None, 5.0)], 200))
        await ledger.write(op_note_hints("w", [("b", "created", None, None, 1.0)], 200))
        await ledger.write(op_note_hints("other", [("a", "created", None, None, 1.0)], 1))
        rows = await ledger.write(op_take_hints("w"))
        assert [(r.relpath, r.kind, r.etag, r.noted) for r in rows] == [
            ("a", "created", "e1", 200),
            ("b", "created", None, 200),
        ]
        assert [r.relpath for r in await ledger.write(op_take_hints("w", "a"))] == ["b"]
        # Looked at with stamp 100, noted again at 200 meanwhile: the row stays.
        assert not await ledger.write(op_drop_hint("w", "a", 100))
        assert await ledger.write(op_drop_hint("w", "a", 200))
        assert [r.relpath for r in await ledger.write(op_take_hints("w"))] == ["b"]
    finally:
        await ledger.close()


# -- the runner with a queue ----------------------------------------------------------------------

URL = parse_bucket_url("s3://bkt/pre")
OLD = time.time_ns() - 3600 * 10**9


class MemoryQueue:
    """A queue double keeping S3 notification bodies; `fail` makes receives raise.
    Records the order of what happened to check delete-after-record."""

    url = "http://queue.invalid/1/q"
    describe = f"S3 event notifications from {url}"
    batch = 10

    def __init__(self) -> None:
        self.bodies: list[str] = []
        self.fail: QueueError | None = None
        self.deleted: list[int] = []
        self.order: list[str] = []

    def send(self, *records: dict[str, Any]) -> None:
        self.bodies.append(json.dumps({"Records": list(records)}))

    async def receive(self) -> list[tuple[Any, str]]:
        if self.fail is not None:
            raise self.fail
        batch = [
            (i, b) for i, b in enumerate(self.bodies) if i not in self.deleted and b is not None
        ][:10]
        if not batch:
            await asyncio_sleep(0.01)
        return batch

    async def delete(self, receipts: list[Any]) -> None:
        self.order.append(f"delete {len(receipts)}")
        self.deleted += receipts

    def parse(self, body: str) -> Parsed:
        return parse_s3(body, "bkt", "pre/")

    async def close(self) -> None:
        return None


async def asyncio_sleep(s: float) -> None:
    import asyncio

    await asyncio.sleep(s)


class QueueHarness:
    def __init__(self, tmp: Path, store: MemoryObjectStore, queue: MemoryQueue) -> None:
        self.watch = Watch.model_validate(
            {
                "name": "b",
                "source": "s3://bkt/pre",
                "dataset": "ds",
                "settle": "0.2s",
                "on_delete": "delete",
                "queue": {"url": MemoryQueue.url},
            }
        )
        self.ledger = AsyncLedger(tmp / "state")
        self.store = store
        self.queue = queue
        feed = QueueFeed(queue, "b")
        source = BucketSource(StoreHandle.of(store), self.watch.poll_interval, feed)
        self.runner = WatchRunner(self.watch, self.ledger, lambda: None, source=source)
        hints = self.runner.queue_hints
        assert hints is not None
        real = hints.record

        async def record(h: list[Any]) -> None:
            await real(h)
            queue.order.append(f"record {len(h)}")

        hints.record = record  # type: ignore[method-assign]

    def entries(self) -> dict[str, str | None]:
        rows = self.ledger.sync.conn.execute(
            "SELECT relpath, etag FROM entries WHERE watch='b'"
        ).fetchall()
        return dict(rows)

    def item_status(self) -> dict[str, str]:
        rows = self.ledger.sync.conn.execute(
            "SELECT source_id, status FROM items WHERE watch='b'"
        ).fetchall()
        return dict(rows)

    def hint_rows(self) -> list[str]:
        return [
            r[0]
            for r in self.ledger.sync.conn.execute(
                "SELECT relpath FROM hints WHERE watch='b' AND done IS NULL"
            )
        ]

    def problem(self) -> str | None:
        return self.ledger.sync.watch_problems().get("b")


@pytest.fixture
async def qh(tmp_path: Path) -> AsyncIterator[QueueHarness]:
    h = QueueHarness(tmp_path, MemoryObjectStore(URL), MemoryQueue())
    await h.ledger.open()
    yield h
    await h.runner.stop()
    await h.ledger.close()


async def test_hints_are_recorded_before_their_messages_are_deleted_and_then_planned(
    qh: QueueHarness,
) -> None:
    await qh.runner.start()
    assert qh.runner.live()["mode"] == "queue"
    assert "S3 event notifications from" in qh.runner.live()["mode_reason"]
    assert "1h" in qh.runner.live()["mode_reason"]
    qh.store.put("a.bin", b"a", OLD)
    qh.store.put("young.bin", b"y")  # just written: settles by a second look
    qh.queue.send(
        s3_record("ObjectCreated:Put", "pre/a.bin"), s3_record("ObjectCreated:Put", "pre/young.bin")
    )
    await wait_until(lambda: set(qh.entries()) == {"a.bin", "young.bin"}, 10, what="planned")
    assert qh.queue.order[:2] == ["record 2", "delete 1"]
    await wait_until(lambda: qh.hint_rows() == [], 10, what="hint rows dropped once planned")
    # An overwrite, a duplicate and an out-of-order delivery: the object decides.
    qh.store.put("a.bin", b"a2", OLD)
    qh.queue.send(s3_record("ObjectCreated:Put", "pre/a.bin"))
    qh.queue.send(s3_record("ObjectCreated:Put", "pre/a.bin"))
    etag = qh.store.objects["a.bin"][1]
    await wait_until(lambda: qh.entries().get("a.bin") == etag, 10, what="the new version")
    qh.store.delete("young.bin")
    qh.queue.send(s3_record("ObjectRemoved:Delete", "pre/young.bin"))
    await wait_until(
        lambda: qh.item_status().get("young.bin") == "deleted" and "young.bin" not in qh.entries(),
        10,
        what="the removed object's item deleted (it was never synced)",
    )
    await wait_until(lambda: qh.hint_rows() == [], 10, what="no hint rows left")


async def test_hint_rows_recorded_before_a_crash_are_taken_at_start(qh: QueueHarness) -> None:
    qh.store.put("late.bin", b"l", OLD)
    # A previous run recorded the hint, then died before looking (its message deleted).
    await qh.ledger.write(op_note_hints("b", [("late.bin", "created", None, None, 1.0)], 5))
    qh.store.objects["late.bin"] = qh.store.objects["late.bin"]
    await qh.runner.start()
    await wait_until(lambda: "late.bin" in qh.entries(), 10, what="the hinted object planned")
    await wait_until(lambda: qh.hint_rows() == [], 10, what="its row dropped")


async def test_a_failing_queue_is_the_watch_problem_and_clears(qh: QueueHarness) -> None:
    qh.queue.fail = QueueError("not_found", "http://queue.invalid/1/q: the queue does not exist")
    await qh.runner.start()
    problem = await wait_until(qh.problem, 10, what="the queue's problem")
    assert problem.startswith("queue not_found: ") and "does not exist" in problem
    qh.queue.fail = None
    await wait_until(lambda: qh.problem() is None, 10, what="the problem cleared")


def test_hints_table_in_a_fresh_ledger(tmp_path: Path) -> None:
    from ingestd.ledger import connect

    conn = connect(tmp_path / "l.sqlite")
    cols = [r[1] for r in conn.execute("PRAGMA table_info(hints)")]
    assert cols == ["watch", "relpath", "kind", "etag", "size", "event_time", "noted", "done"]
    assert isinstance(conn, sqlite3.Connection)
