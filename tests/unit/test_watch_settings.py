"""Edits of a watch's settings reach the items already synced: the ledger records the
settings each watch's items were made with; a changed item shape re-plans every file,
changed media or transfer settings queue the synced items to be checked again."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ingestd.config import Watch
from ingestd.ledger import AsyncLedger, op_plan_settled, op_watch_settings
from ingestd.pipeline.runner import WatchRunner
from ingestd.sources.bucket_poll import StoreHandle
from ingestd.sources.bucket_source import BucketSource
from ingestd.sources.objects import MemoryObjectStore

OLD = time.time_ns() - 3600 * 10**9  # an hour ago: settled at once


def bucket_watch(**kw: Any) -> Watch:
    data = {"name": "b", "source": "s3://bkt/pre", "dataset": "ds", "settle": "2s", **kw}
    return Watch.model_validate(data)


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[AsyncLedger]:
    lg = AsyncLedger(tmp_path / "state")
    await lg.open()
    yield lg
    await lg.close()


def _item(conn: sqlite3.Connection, sid: str, status: str, kind: str | None = None) -> None:
    conn.execute(
        "INSERT INTO items (watch, source_id, dataset, key, plan, desired_fp, status,"
        " error_kind, updated_at) VALUES ('w', ?, 'ds', ?, '{}', 'fp', ?, ?, 0)",
        (sid, "/" + sid, status, kind),
    )


def _statuses(ledger: AsyncLedger) -> dict[str, str]:
    rows = ledger.sync.conn.execute("SELECT source_id, status FROM items WHERE watch='w'")
    return dict(rows.fetchall())


async def test_the_first_start_records_the_settings_and_redoes_nothing(
    ledger: AsyncLedger,
) -> None:
    await ledger.write(lambda c: _item(c, "a", "synced"))
    assert await ledger.write(op_watch_settings("w", "p1", "s1", 1.0)) == (False, 0)
    assert await ledger.write(op_watch_settings("w", "p1", "s1", 2.0)) == (False, 0)
    assert _statuses(ledger) == {"a": "synced"}


async def test_a_changed_item_shape_asks_for_a_replan_until_one_is_recorded(
    ledger: AsyncLedger,
) -> None:
    await ledger.write(op_watch_settings("w", "p1", "s1", 1.0))
    assert await ledger.write(op_watch_settings("w", "p2", "s1", 2.0)) == (True, 0)
    # A crash before the re-plan finished: the next start asks again.
    assert await ledger.write(op_watch_settings("w", "p2", "s1", 3.0)) == (True, 0)
    await ledger.write(op_plan_settled("w", "p2"))
    assert await ledger.write(op_watch_settings("w", "p2", "s1", 4.0)) == (False, 0)
    # Settings are per watch.
    assert await ledger.write(op_watch_settings("other", "p9", "s9", 5.0)) == (False, 0)


async def test_changed_media_settings_queue_synced_and_send_failures_again(
    ledger: AsyncLedger,
) -> None:
    def rows(c: sqlite3.Connection) -> None:
        _item(c, "synced", "synced")
        _item(c, "too-big", "failed", "media")
        _item(c, "refused", "failed", "sink")
        _item(c, "bad-sidecar", "failed", "plan")
        _item(c, "type-clash", "failed", "metadata")
        _item(c, "gone", "deleted")
        _item(c, "waiting", "pending")

    await ledger.write(rows)
    await ledger.write(op_watch_settings("w", "p1", "s1", 1.0))
    assert await ledger.write(op_watch_settings("w", "p1", "s2", 2.0)) == (False, 3)
    assert _statuses(ledger) == {
        "synced": "pending",
        "too-big": "pending",
        "refused": "pending",
        "bad-sidecar": "failed",  # fixed by the files, not by media settings
        "type-clash": "failed",
        "gone": "deleted",
        "waiting": "pending",
    }
    # Recorded with the requeue: a restart does not queue them again.
    assert await ledger.write(op_watch_settings("w", "p1", "s2", 3.0)) == (False, 0)


def test_identities_follow_the_fields_they_name() -> None:
    base = bucket_watch()
    same = bucket_watch(settle="9s", poll_interval="5m", on_delete="delete", max_delete=3)
    assert (same.plan_identity(), same.send_identity()) == (
        base.plan_identity(),
        base.send_identity(),
    )
    for shape in ({"path": "/x"}, {"metadata": {"static": {"a": 1}}}, {"include": ["*.png"]}):
        w = bucket_watch(**shape)
        assert w.plan_identity() != base.plan_identity(), shape
        assert w.send_identity() == base.send_identity(), shape
    for send in ({"images": {"max_dimension": 100}}, {"transfer": "copy"}):
        w = bucket_watch(**send)
        assert w.send_identity() != base.send_identity(), send
        assert w.plan_identity() == base.plan_identity(), send


async def test_a_bucket_watch_replans_every_object_when_its_metadata_changes(
    ledger: AsyncLedger,
) -> None:
    store = MemoryObjectStore("s3://bkt/pre", page_size=2)
    for key in ("a.jpg", "sub/b.jpg", "c.jpg"):
        store.put(key, key.encode(), OLD)

    def runner(watch: Watch) -> WatchRunner:
        return WatchRunner(watch, ledger, lambda: None, source=BucketSource(StoreHandle.of(store)))

    def metadata() -> dict[str, Any]:
        rows = ledger.sync.conn.execute("SELECT source_id, plan FROM items WHERE watch='b'")
        return {sid: json.loads(plan)["metadata"] for sid, plan in rows.fetchall()}

    first = runner(bucket_watch(metadata={"static": {"site": "north"}}))
    await first.check_settings()
    assert not first.replan
    assert await first.poll()
    assert len(metadata()) == 3 and all(m == {"site": "north"} for m in metadata().values())
    await first.stop()

    second = runner(bucket_watch(metadata={"static": {"site": "south"}}))
    await second.check_settings()
    assert second.replan
    assert await second.poll()
    assert all(m == {"site": "south"} for m in metadata().values()) and len(metadata()) == 3
    finish = [t for t in second._tasks if t.get_name() == "replan:b"]
    await asyncio.wait_for(asyncio.gather(*finish), 10)
    assert not second.replan
    await second.stop()

    third = runner(bucket_watch(metadata={"static": {"site": "south"}}))
    await third.check_settings()
    assert not third.replan  # recorded: nothing to redo
    await third.stop()
