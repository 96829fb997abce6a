"""Bucket watches in process: the listing diff, the settle rule, the runner against the
in-memory object store (paging, deletions, the mass-deletion guard, failed listings,
problems and their recovery), groups and sidecar objects."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ingestd.config import Watch, parse_bucket_url
from ingestd.ledger import AsyncLedger
from ingestd.pipeline.runner import WatchRunner
from ingestd.pipeline.settling import ListedSettling
from ingestd.sources.bucket_poll import (
    ListingOutOfOrder,
    PendingObjects,
    StoreHandle,
    diff_pages,
    usable_key,
)
from ingestd.sources.bucket_source import BucketSource
from ingestd.sources.objects import BucketError, MemoryObjectStore, ObjectInfo

URL = parse_bucket_url("s3://bkt/pre")
OLD = time.time_ns() - 3600 * 10**9  # an hour ago: settled at once


def make_watch(**kw: Any) -> Watch:
    data = {"name": "b", "source": "s3://bkt/pre", "dataset": "ds", "settle": "2s", **kw}
    return Watch.model_validate(data)


# -- the listing diff (pure) ----------------------------------------------------------------


async def pages_of(*pages: list[ObjectInfo]) -> AsyncIterator[list[ObjectInfo]]:
    for p in pages:
        yield p


def obj(key: str, size: int = 1, etag: str = "e", mtime: int = 1) -> ObjectInfo:
    return ObjectInfo(key, size, etag, mtime)


async def test_diff_pages_finds_new_changed_and_gone_page_by_page() -> None:
    known = {
        "a": (1, 1, "e"),  # unchanged
        "b": (1, 1, "old"),  # same size and mtime, another ETag: changed
        "bb": (1, 1, "e"),  # between listed keys: gone
        "c": (1, 5, "e"),  # only last-modified moved (a metadata rewrite): unchanged
        "z": (1, 1, "e"),  # after the last listed key: gone
    }
    asked: list[tuple[str | None, str | None]] = []

    async def known_range(after: str | None, upto: str | None) -> dict[str, Any]:
        asked.append((after, upto))
        return {
            k: v
            for k, v in known.items()
            if (after is None or k > after) and (upto is None or k <= upto)
        }

    diffs = [
        d
        async for d in diff_pages(
            pages_of([obj("a"), obj("b")], [obj("c"), obj("d"), obj("skip.tmp")]),
            known_range,
            lambda k: not k.endswith(".tmp"),
        )
    ]
    assert asked == [(None, "b"), ("b", "skip.tmp"), ("skip.tmp", None)]
    assert [[o.key for o in d.changed] for d in diffs] == [["b"], ["d"], []]
    assert [d.gone for d in diffs] == [[], ["bb"], ["z"]]
    assert [d.listed for d in diffs] == [2, 2, 0]


async def test_an_etag_less_object_is_compared_by_size_and_mtime() -> None:
    async def known_range(after: str | None, upto: str | None) -> dict[str, Any]:
        return {"a": (1, 1, None), "b": (1, 1, None)} if upto else {}

    diffs = [
        d
        async for d in diff_pages(
            pages_of([obj("a", etag=""), obj("b", etag="", mtime=2)]), known_range, bool
        )
    ]
    assert [o.key for o in diffs[0].changed] == ["b"]


async def test_keys_out_of_order_stop_the_diff() -> None:
    async def known_range(after: str | None, upto: str | None) -> dict[str, Any]:
        return {}

    with pytest.raises(ListingOutOfOrder):
        async for _ in diff_pages(pages_of([obj("b")], [obj("a")]), known_range, bool):
            pass


def test_usable_keys() -> None:
    assert usable_key("a/b.jpg") and usable_key("a b/ü.png")
    assert not any(usable_key(k) for k in ("", "a//b", "./x", "a/../b", "a/"))


# -- the settle rule ------------------------------------------------------------------------


def test_settle_two_listings_unchanged_or_old_enough() -> None:
    now = [1000.0]
    pending = PendingObjects(settle=30, clock=lambda: now[0])
    young = int(995 * 1e9)
    assert pending.observe(obj("old", mtime=int(900 * 1e9)), 1)  # older than settle
    assert not pending.observe(obj("a", mtime=young), 1)
    assert not pending.observe(obj("b", mtime=young), 1)
    assert "a" in pending and pending.pending_under("") and len(pending) == 2
    pending.end_pass(1)
    # Next listing: a unchanged (ready), b replaced meanwhile (waits again).
    assert pending.observe(obj("a", mtime=young), 2)
    assert not pending.observe(obj("b", etag="new", mtime=young), 2)
    assert pending.observe(obj("b", etag="new", mtime=young), 3)
    # Not listed by a complete pass: forgotten (it went away before it settled).
    assert not pending.observe(obj("c", mtime=young), 3)
    pending.end_pass(4)
    assert len(pending) == 0


# -- the runner -----------------------------------------------------------------------------


class Harness:
    def __init__(self, tmp: Path, watch: Watch, store: MemoryObjectStore) -> None:
        self.watch = watch
        self.store = store
        self.ledger = AsyncLedger(tmp / "state")
        self.planned = 0
        self.runner = WatchRunner(
            watch, self.ledger, self._planned, source=BucketSource(StoreHandle.of(store))
        )
        self.runner.backoff_base = 0.01

    def _planned(self) -> None:
        self.planned += 1

    async def poll(self) -> bool:
        ok = await self.runner.poll()
        # Re-plans that deletions queued (groups losing files) run on the plan loop.
        while not self.runner.plans._queue.empty():
            await self.runner.plans.plan(self.runner.plans._queue.get_nowait())
        return ok

    def items(self) -> dict[str, dict[str, Any]]:
        rows = self.ledger.sync.conn.execute(
            "SELECT source_id, key, status, plan, desired_fp FROM items WHERE watch=?",
            (self.watch.name,),
        ).fetchall()
        return {
            sid: {
                "key": key,
                "status": status,
                "plan": json.loads(plan) if plan else None,
                "fp": fp,
            }
            for sid, key, status, plan, fp in rows
        }

    def problem(self) -> str | None:
        return self.ledger.sync.watch_problems().get(self.watch.name)


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Harness] = []

    async def make(store: MemoryObjectStore | None = None, **kw: Any) -> Harness:
        h = Harness(tmp_path, make_watch(**kw), store or MemoryObjectStore(URL, page_size=2))
        await h.ledger.open()
        made.append(h)
        return h

    yield make
    for h in made:
        await h.runner.stop()
        await h.ledger.close()


async def test_objects_become_items_with_dataset_folders(make: Any) -> None:
    h = await make(path="/incoming")
    for key in ("cam1/a.jpg", "cam1/b.jpg", "cam2/day1/c.png", "top.jpg", "x.tmp"):
        h.store.put(key, key.encode(), OLD)
    assert await h.poll()
    items = h.items()
    assert {sid: i["key"] for sid, i in items.items()} == {
        "cam1/a.jpg": "/incoming/cam1/a.jpg",
        "cam1/b.jpg": "/incoming/cam1/b.jpg",
        "cam2/day1/c.png": "/incoming/cam2/day1/c.png",
        "top.jpg": "/incoming/top.jpg",
    }  # temp names (x.tmp) are never taken
    assert all(i["status"] == "pending" for i in items.values())
    f = items["cam1/a.jpg"]["plan"]["slots"][0]["files"][0]
    assert f["etag"] == h.store.objects["cam1/a.jpg"][1] and f["size"] == len(b"cam1/a.jpg")
    # A second listing of the same objects changes nothing.
    before = {sid: i["fp"] for sid, i in items.items()}
    assert await h.poll()
    assert {sid: i["fp"] for sid, i in h.items().items()} == before
    assert h.runner.files_seen == 4  # the accepted objects, once: unchanged ones are not new


async def test_flat_layout_and_filters(make: Any) -> None:
    h = await make(preserve_folders=False, include=["*.jpg"], exclude=["skip/**"])
    for key in ("a/b/one.jpg", "two.jpg", "three.png", "skip/four.jpg"):
        h.store.put(key, b"x", OLD)
    await h.poll()
    assert {i["key"] for i in h.items().values()} == {"/one.jpg", "/two.jpg"}


async def test_a_young_object_waits_for_a_second_listing(make: Any) -> None:
    h = await make(settle="1h")
    h.store.put("new.jpg", b"v1")
    await h.poll()
    assert h.items() == {} and h.runner.busy
    h.store.put("new.jpg", b"v2")  # replaced before the next listing: waits again
    await h.poll()
    assert h.items() == {}
    await h.poll()  # listed unchanged twice
    assert h.items()["new.jpg"]["status"] == "pending"
    assert not h.runner.busy
    assert h.runner.files_seen == 2  # two versions noticed, however often listed


async def test_an_overwritten_object_is_planned_again_even_with_the_same_size_and_time(
    make: Any,
) -> None:
    h = await make()
    h.store.put("a.jpg", b"one", OLD)
    await h.poll()
    first = h.items()["a.jpg"]["fp"]
    h.store.put("a.jpg", b"two", OLD)  # same size, same last-modified: only the ETag moved
    await h.poll()
    item = h.items()["a.jpg"]
    assert item["fp"] != first
    assert item["plan"]["slots"][0]["files"][0]["etag"] == h.store.objects["a.jpg"][1]


@pytest.mark.parametrize("on_delete", ["keep", "delete"])
async def test_deleted_objects_follow_on_delete(make: Any, on_delete: str) -> None:
    h = await make(on_delete=on_delete)
    for i in range(5):
        h.store.put(f"k{i}.jpg", b"x", OLD)
    await h.poll()
    h.store.delete("k3.jpg")
    await h.poll()
    status = h.items()["k3.jpg"]["status"]
    # keep: forgotten here, left in the dataset. delete: never synced, so nothing to
    # remove remotely and it is done at once; a synced one would be pending a delete.
    assert status == "deleted"
    assert h.ledger.sync.live_count("b") == 4
    assert h.problem() is None


async def test_mass_deletion_is_refused(make: Any) -> None:
    h = await make(max_delete="50%")
    for i in range(6):
        h.store.put(f"k{i}.jpg", b"x", OLD)
    await h.poll()
    for i in range(4):
        h.store.delete(f"k{i}.jpg")
    await h.poll()
    assert h.ledger.sync.live_count("b") == 6
    assert "refused to delete 4 of 6 items" in (h.problem() or "")


class FailingMidway(MemoryObjectStore):
    """Lists its first page, then fails like a dropped connection."""

    broken = True

    async def list_pages(self, subprefix: str = "") -> AsyncIterator[list[ObjectInfo]]:
        n = 0
        async for page in super().list_pages(subprefix):
            if self.broken and n == 1:
                raise BucketError("unreachable", "s3://bkt/pre/: cannot reach S3; check it")
            n += 1
            yield page


async def test_a_listing_that_fails_midway_deletes_nothing(make: Any) -> None:
    store = FailingMidway(URL, page_size=2)
    store.broken = False
    h = await make(store, on_delete="delete", max_delete="100%")
    for i in range(6):
        store.put(f"k{i}.jpg", b"x", OLD)
    assert await h.poll()
    store.broken = True
    assert not await h.poll()
    assert h.ledger.sync.live_count("b") == 6
    assert "cannot reach S3" in (h.problem() or "")
    store.broken = False
    assert await h.poll()
    assert h.problem() is None and h.ledger.sync.live_count("b") == 6


@pytest.mark.parametrize(
    "kind,message",
    [
        ("missing_bucket", "s3://bkt/pre/: bucket 'bkt' does not exist; create it"),
        ("credentials", "s3://bkt/pre/: the credentials were rejected; check AWS_*"),
        ("denied", "s3://bkt/pre/: access denied (list); grant list permission"),
        ("unreachable", "s3://bkt/pre/: cannot reach http://127.0.0.1:1; check it"),
    ],
)
async def test_store_errors_are_the_watch_problem_until_they_clear(
    make: Any, kind: str, message: str
) -> None:
    h = await make()
    h.store.put("a.jpg", b"x", OLD)
    h.store.fail = BucketError(kind, message)  # type: ignore[arg-type]
    assert not await h.poll()
    assert not await h.poll()
    problem = h.problem() or ""
    assert message in problem and kind in problem
    assert h.items() == {}
    delays = [h.runner.next_delay() for _ in range(50)]
    assert max(delays) <= h.runner.backoff_cap
    h.store.fail = None
    assert await h.poll()
    assert h.problem() is None and "a.jpg" in h.items()
    assert h.runner.next_delay() == h.watch.poll_interval


def test_backoff_grows_and_is_capped() -> None:
    runner = WatchRunner.__new__(WatchRunner)
    runner.watch = make_watch(poll_interval="60s")
    runner._observe, runner.events = True, False
    runner.settling = ListedSettling(1)
    runner.backoff_base, runner.backoff_cap = 5.0, 300.0
    steps = []
    for failures in (1, 2, 3, 10):
        runner.failures = failures
        steps.append(max(runner.next_delay() for _ in range(200)))
    assert steps[0] <= 5 and steps[1] <= 10 and steps[2] <= 20
    assert 150 <= steps[3] <= 300


async def test_group_folders_over_key_prefixes(make: Any) -> None:
    # Pages of one object: a group's members span pages.
    h = await make(MemoryObjectStore(URL, page_size=1), group={"mode": "slots", "depth": 1})
    for key in ("scan1/0.jpg", "scan1/1.jpg", "scan1/deep/x.jpg", "scan2/a.jpg", "loose.jpg"):
        h.store.put(key, key.encode(), OLD)
    await h.poll()
    items = h.items()
    # Files above the group level are items of their own; deeper ones are ignored.
    assert set(items) == {"scan1", "scan2", "loose.jpg"}
    slots = items["scan1"]["plan"]["slots"]
    assert [s["files"][0]["relpath"] for s in slots] == ["scan1/0.jpg", "scan1/1.jpg"]
    # A new member updates the item; a member that goes is dropped from it.
    h.store.put("scan1/2.jpg", b"2", OLD)
    await h.poll()
    assert len(h.items()["scan1"]["plan"]["slots"]) == 3
    h.store.delete("scan1/0.jpg")
    await h.poll()
    files = [s["files"][0]["relpath"] for s in h.items()["scan1"]["plan"]["slots"]]
    assert files == ["scan1/1.jpg", "scan1/2.jpg"]


async def test_a_group_waits_for_its_young_members(make: Any) -> None:
    h = await make(group={"mode": "slots", "depth": 1}, settle="1h")
    h.store.put("scan/0.jpg", b"0", OLD)
    h.store.put("scan/1.jpg", b"1")  # just written
    await h.poll()
    assert h.items() == {}
    await h.poll()
    assert len(h.items()["scan"]["plan"]["slots"]) == 2


async def test_a_ready_marker_plans_the_group_at_once(make: Any) -> None:
    h = await make(group={"mode": "slots", "depth": 1, "ready_marker": ".done"}, settle="1h")
    h.store.put("scan/0.jpg", b"0")
    h.store.put("scan/.done", b"")
    await h.poll()
    assert [s["files"][0]["relpath"] for s in h.items()["scan"]["plan"]["slots"]] == ["scan/0.jpg"]


async def test_sidecar_objects_give_metadata(make: Any) -> None:
    h = await make(metadata={"sidecar": "{name}.json", "static": {"site": "b"}})
    h.store.put("a.jpg", b"x", OLD)
    h.store.put("a.jpg.json", json.dumps({"label": "cat"}).encode(), OLD)
    await h.poll()
    assert h.items()["a.jpg"]["plan"]["metadata"] == {"site": "b", "label": "cat"}
    h.store.put("a.jpg.json", json.dumps({"label": "dog"}).encode(), OLD)
    await h.poll()
    assert h.items()["a.jpg"]["plan"]["metadata"] == {"site": "b", "label": "dog"}
    # The sidecar's entry carries its ETag: the next listing sees nothing new.
    fp = h.items()["a.jpg"]["fp"]
    calls = len(h.store.calls)
    await h.poll()
    assert h.items()["a.jpg"]["fp"] == fp
    assert h.store.calls[calls:] == ["list"]


async def test_generically_named_objects_are_sniffed(make: Any) -> None:
    h = await make()
    h.store.put("scan0001", b"\0" * 128 + b"DICM" + b"\0" * 64, OLD)
    h.store.put("photo", b"\xff\xd8\xff\xe0" + b"\0" * 64, OLD)
    await h.poll()
    types = {sid: i["plan"]["slots"][0]["type"] for sid, i in h.items().items()}
    assert types == {"scan0001": "dicom", "photo": "image"}


def test_an_older_ledger_gains_the_etag_column(tmp_path: Path) -> None:
    import sqlite3

    from ingestd.core.model import Entry
    from ingestd.ledger import LEDGER_FILE, Ledger

    old = sqlite3.connect(tmp_path / LEDGER_FILE)
    old.execute(
        "CREATE TABLE entries (watch TEXT NOT NULL, relpath TEXT NOT NULL, parent TEXT NOT NULL,"
        " size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, role TEXT NOT NULL,"
        " PRIMARY KEY (watch, relpath)) WITHOUT ROWID"
    )
    old.execute("INSERT INTO entries VALUES ('w', 'a.jpg', '', 1, 2, 'item')")
    old.commit()
    old.close()
    ledger = Ledger(tmp_path)
    try:
        assert ledger.entries_between("w", None, None) == {"a.jpg": (1, 2, None)}
        ledger.transaction([Ledger.op_put_entries("w", [(Entry("b.jpg", 3, 4, "e"), "item")])])
        assert ledger.entries_between("w", "a.jpg", None) == {"b.jpg": (3, 4, "e")}
    finally:
        ledger.close()
    Ledger(tmp_path).close()  # opening a migrated ledger again is a no-op


async def test_a_pass_counts_as_busy_until_what_it_took_is_planned(make: Any) -> None:
    # A one-pass sync waits while the runner is busy; a pass takes ready objects out of
    # `pending` before it plans them, and that gap must not read as idle.
    h = await make()
    h.store.put("a.jpg", b"a", OLD)
    seen: list[tuple[bool, int]] = []
    plan = h.runner._plan

    async def watching(work: Any) -> None:
        seen.append((h.runner.busy, len(h.runner.settling)))
        await plan(work)

    h.runner._plan = watching  # type: ignore[method-assign]
    assert await h.poll()
    assert seen and all(busy for busy, _ in seen)
    assert seen[0][1] == 0  # nothing left settling: only the pass says it is busy
    assert not h.runner.busy
