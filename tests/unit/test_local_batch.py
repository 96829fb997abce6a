"""Small items in groups: the blob store's stage/publish, the catalog's batch upsert, the
local sink's batch put, and the sync pool's group path, each item's outcome its own."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

from ingestd.config import Watch
from ingestd.core.errors import PermanentError, SourceChangedError
from ingestd.core.model import (
    FilePayload,
    ItemPayload,
    ItemPlan,
    PlannedFile,
    PlannedSlot,
    SlotPayload,
)
from ingestd.ledger import AsyncLedger, Ledger
from ingestd.pipeline.pool import SyncPool
from ingestd.pipeline.side import WatchSide
from ingestd.plan.metadata import type_conflicts, value_type
from ingestd.runtime.backend import side_for
from ingestd.sinks.base import BatchItem, BatchLimits, BatchPutter, PutResult
from ingestd.sinks.local import LocalSink
from ingestd.sinks.memory import BatchingMemorySink
from ingestd.sources.local import LocalFolderSource
from ingestd.store import BlobStore, Catalog, Store
from ingestd.store.blobs import StagedBlob
from PIL import Image


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def temps(store_root: Path) -> list[str]:
    return os.listdir(store_root / "tmp")


def payload(name: str, path: Path, data: bytes, item_path: str = "/") -> ItemPayload:
    f = FilePayload(name, str(path), len(data), sha(data))
    return ItemPayload(item_path, name, (SlotPayload("0", "file", (f,)),), {"n": name})


# --- blob store ------------------------------------------------------------------------


def test_a_staged_blob_has_no_final_name_until_published(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "store")
    srcs = []
    for i in range(10):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(f"blob {i}".encode() * 100)
        srcs.append(p)
    staged = [blobs.stage(p, sha(p.read_bytes()), p.stat().st_size) for p in srcs]
    assert all(isinstance(s, StagedBlob) for s in staged)
    # A crash here leaves temp files only: nothing under a final name.
    assert not any(blobs.has(sha(p.read_bytes())) for p in srcs)
    assert len(temps(tmp_path / "store")) == 10
    results = blobs.publish(staged)  # type: ignore[arg-type]
    assert [r.created for r in results] == [True] * 10  # type: ignore[union-attr]
    for p in srcs:
        assert blobs.path(sha(p.read_bytes())).read_bytes() == p.read_bytes()
    assert temps(tmp_path / "store") == []
    assert blobs.verify_all() == []


def test_stage_many_reports_each_file_and_skips_stored_ones(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "store")
    old = tmp_path / "old.bin"
    old.write_bytes(b"already stored")
    blobs.put_file(old)
    new = tmp_path / "new.bin"
    new.write_bytes(b"new bytes")
    moved = tmp_path / "moved.bin"
    moved.write_bytes(b"not what was hashed")
    got = blobs.stage_many(
        [
            (old, sha(b"already stored"), 14),
            (new, sha(b"new bytes"), 9),
            (moved, sha(b"what was hashed"), 15),
            (tmp_path / "gone.bin", sha(b"x"), 1),
        ]
    )
    assert not got[0].created  # type: ignore[union-attr]
    assert isinstance(got[1], StagedBlob)
    assert type(got[2]).__name__ == "DigestMismatch"
    assert isinstance(got[3], FileNotFoundError)
    blobs.discard([got[1]])  # type: ignore[list-item]
    assert temps(tmp_path / "store") == []
    assert not blobs.has(sha(b"new bytes"))


# --- catalog ---------------------------------------------------------------------------


def test_upsert_items_keeps_each_item_apart(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.sqlite")
    slots = [{"name": "0", "type": "file", "files": [{"name": "a", "digest": sha(b"a")}]}]
    got = cat.upsert_items(
        [
            ("ds", "/", "a", slots, {}),
            ("ds", "bad path", "b", slots, {}),
            ("ds", "/", "c", slots, {"x": float("nan")}),
            ("other", "/", "a", slots, {}),
            ("ds", "/", "a", slots, {"v": 2}),  # the same key again: a second version
        ]
    )
    assert got[0] == (1, True) and got[3] == (1, True) and got[4] == (2, True)
    assert isinstance(got[1], ValueError) and isinstance(got[2], ValueError)
    assert cat.datasets() == ["ds", "other"]
    assert [i["key"] for i in cat.list_items("ds")] == ["/a"]
    assert cat.upsert_items([("ds", "/", "a", slots, {"v": 2})]) == [(2, False)]
    cat.close()


# --- local sink ------------------------------------------------------------------------


async def test_put_items_fails_only_the_bad_items(tmp_path: Path) -> None:
    sink = LocalSink(tmp_path / "store")
    assert isinstance(sink, BatchPutter)
    items = []
    for i in range(5):
        p = tmp_path / f"f{i}.bin"
        data = f"file {i}".encode()
        p.write_bytes(data)
        items.append(BatchItem("ds", payload(f"f{i}.bin", p, data)))
    # Changed after it was hashed, vanished, and a name the catalog refuses.
    (tmp_path / "f1.bin").write_bytes(b"rewritten")
    (tmp_path / "f2.bin").unlink()
    p = tmp_path / "ok.bin"
    p.write_bytes(b"fine bytes")
    items.append(BatchItem("ds", payload("a/b", p, b"fine bytes")))
    try:
        results = await sink.put_items(items)
    finally:
        await sink.close()
    assert isinstance(results[0], PutResult) and results[0].changed
    assert isinstance(results[1], SourceChangedError)
    assert isinstance(results[2], SourceChangedError)
    assert isinstance(results[3], PutResult) and isinstance(results[4], PutResult)
    assert isinstance(results[5], PermanentError)
    store = Store.open(tmp_path / "store")
    try:
        assert sorted(i["key"] for i in store.catalog.list_items("ds")) == [
            "/f0.bin",
            "/f3.bin",
            "/f4.bin",
        ]
        assert not store.blobs.has(sha(b"file 1")) and not store.blobs.has(sha(b"rewritten"))
        assert store.blobs.verify_all() == []
    finally:
        store.close()
    assert temps(tmp_path / "store") == []


# --- the pool's group path -------------------------------------------------------------


def plan_for(rel: str, st: os.stat_result) -> ItemPlan:
    name = rel.rsplit("/", 1)[-1]
    f = PlannedFile(name, rel, st.st_size, st.st_mtime_ns)
    return ItemPlan(rel, "/", name, (PlannedSlot("0", "file", (f,)),), {}, f"{rel}:{st.st_size}")


async def test_pool_syncs_a_group_and_requeues_a_file_changed_since_planning(
    tmp_path: Path,
) -> None:
    root = tmp_path / "src"
    root.mkdir()
    ledger = AsyncLedger(tmp_path / "state")
    await ledger.open()
    ops = []
    for i in range(200):
        p = root / f"f{i:03d}.bin"
        p.write_bytes(f"content {i}".encode() * 50)
        plan = plan_for(p.name, os.stat(p))
        ops.append(Ledger.op_apply_plan("w", "ds", plan, [], type_conflicts, value_type, 0.0))
    await ledger.write_many(ops)
    # Changed after it was planned: its half-known version must not be stored.
    (root / "f007.bin").write_bytes(b"a new version, longer than the old one" * 50)
    changed: list[list[str]] = []
    sink = LocalSink(tmp_path / "store")
    pool = SyncPool(
        ledger,
        sink,
        {"w": WatchSide(LocalFolderSource(root), 30.0, False)},
        workers=2,
        on_source_changed=lambda w, rels: changed.append(rels),
    )
    task = asyncio.create_task(pool.run(poll=0.05))

    def settled(led: Ledger) -> bool:
        c = led.counts()["w"]
        return c.synced == 199 and c.pending == 1 and not pool.inflight

    try:
        deadline = time.monotonic() + 30
        while not await ledger.call(settled, ledger.sync):
            assert time.monotonic() < deadline, "pool did not sync the group"
            await asyncio.sleep(0.02)
    finally:
        await pool.stop(1)
        task.cancel()
        await sink.close()
    assert changed == [["f007.bin"]]
    row = await ledger.call(ledger.sync.item_row, "w", "f007.bin")
    assert row["status"] == "pending" and row["attempts"] == 0  # not counted as a failure
    await ledger.close()
    store = Store.open(tmp_path / "store")
    try:
        keys = {i["key"] for i in store.catalog.list_items("ds")}
        assert len(keys) == 199 and "/f007.bin" not in keys
        assert store.blobs.verify_all() == []
    finally:
        store.close()


async def test_groups_fill_from_the_backlog_not_from_the_workers(tmp_path: Path) -> None:
    """One worker, 250 small files, a sink that takes 100 at a time: the groups are as
    big as the sink allows, and one call runs at a time."""
    root = tmp_path / "src"
    root.mkdir()
    ledger = AsyncLedger(tmp_path / "state")
    await ledger.open()
    ops = []
    for i in range(250):
        p = root / f"f{i:03d}.bin"
        p.write_bytes(b"%d" % i)
        plan = plan_for(p.name, os.stat(p))
        ops.append(Ledger.op_apply_plan("w", "ds", plan, [], type_conflicts, value_type, 0.0))
    await ledger.write_many(ops)
    sink = BatchingMemorySink(BatchLimits(items=100, bytes=1 << 20, linger=0.0, small=1 << 10))
    pool = SyncPool(ledger, sink, {"w": WatchSide(LocalFolderSource(root), 30.0, False)}, workers=1)
    task = asyncio.create_task(pool.run(poll=0.05))

    def done(led: Ledger) -> bool:
        return led.counts()["w"].synced == 250 and not pool.inflight

    try:
        deadline = time.monotonic() + 30
        while not await ledger.call(done, ledger.sync):
            assert time.monotonic() < deadline, f"groups so far: {sink.groups}"
            await asyncio.sleep(0.02)
    finally:
        await pool.stop(1)
        task.cancel()
        await ledger.close()
    assert len(sink.items) == 250
    assert sink.groups.count(100) == 2 and sum(sink.groups) == 250
    assert sink.most_at_once == 1


async def test_images_go_in_groups_checked_in_one_media_trip(tmp_path: Path) -> None:
    """Image items are checked by the media rules and still go in groups; a file that
    only claims to be a PNG fails alone with the reason."""
    root = tmp_path / "src"
    root.mkdir()
    for i in range(120):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(root / f"p{i:03d}.png")
    (root / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 20)
    watch = Watch.model_validate({"name": "w", "source": str(root), "dataset": "ds"})
    side = side_for(watch, None)
    ledger = AsyncLedger(tmp_path / "state")
    await ledger.open()
    ops = []
    for p in sorted(root.iterdir()):
        st = os.stat(p)
        f = PlannedFile(p.name, p.name, st.st_size, st.st_mtime_ns)
        plan = ItemPlan(
            p.name, "/", p.name, (PlannedSlot("0", "image", (f,)),), {}, f"{p.name}:{st.st_size}"
        )
        ops.append(Ledger.op_apply_plan("w", "ds", plan, [], type_conflicts, value_type, 0.0))
    await ledger.write_many(ops)
    sink = BatchingMemorySink(BatchLimits(items=100, linger=0.0))
    pool = SyncPool(ledger, sink, {"w": side}, workers=1, spool_root=str(tmp_path / "state"))
    task = asyncio.create_task(pool.run(poll=0.05))

    def done(led: Ledger) -> bool:
        c = led.counts()["w"]
        return c.synced == 120 and c.failed == 1 and not pool.inflight

    try:
        deadline = time.monotonic() + 30
        while not await ledger.call(done, ledger.sync):
            assert time.monotonic() < deadline, f"groups so far: {sink.groups}"
            await asyncio.sleep(0.02)
        row = await ledger.call(ledger.sync.item_row, "w", "zz-broken.png")
    finally:
        await pool.stop(1)
        task.cancel()
        await ledger.close()
    assert max(sink.groups) == 100 and sum(sink.groups) == 120
    assert "zz-broken.png" in row["last_error"]
    assert not (tmp_path / "state" / "spool").exists() or not any(
        (tmp_path / "state" / "spool").iterdir()
    )
