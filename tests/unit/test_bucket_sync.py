"""Bucket items through the sync pool, in process: register (references) and copy
(streamed or spooled bytes) into the memory and local sinks, the ETag-keyed unchanged
check, objects that change under the sync step, and what register cannot do."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ingestd.config import Watch, parse_bucket_url
from ingestd.ledger import AsyncLedger
from ingestd.pipeline.outcome import Outcome
from ingestd.pipeline.pool import SyncPool
from ingestd.pipeline.runner import WatchRunner
from ingestd.pipeline.side import WatchSide
from ingestd.runtime.backend import side_for
from ingestd.sinks.base import BatchLimits, Capabilities, Sink
from ingestd.sinks.local import LocalSink
from ingestd.sinks.memory import BatchingMemorySink, MemorySink
from ingestd.sources.bucket_poll import StoreHandle
from ingestd.sources.bucket_source import BucketSource
from ingestd.sources.objects import BucketError, MemoryObjectStore
from ingestd.store import Store
from PIL import Image

URL = parse_bucket_url("s3://bkt/pre")
OLD = time.time_ns() - 3600 * 10**9


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def png(size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


class Rig:
    """A bucket watch's runner and a sync pool over one in-memory store and sink."""

    def __init__(self, tmp: Path, sink: Sink, store: MemoryObjectStore, **watch: Any) -> None:
        data = {"name": "b", "source": str(URL), "dataset": "ds", "settle": "1s", **watch}
        self.watch = Watch.model_validate(data)
        self.store = store
        self.sink = sink
        self.tmp = tmp
        self.ledger = AsyncLedger(tmp / "state")
        self.outcomes: list[Outcome] = []
        self.pool: SyncPool | None = None
        self.runner: WatchRunner | None = None
        self._task: asyncio.Task[None] | None = None

    def side(self) -> WatchSide:
        side = side_for(self.watch, None)
        # The workers read through the same in-memory store as the runner.
        return WatchSide(
            BucketSource(StoreHandle.of(self.store)), side.settle, False, side.media, side.transfer
        )

    async def open(self) -> None:
        await self.ledger.open()
        self.runner = WatchRunner(
            self.watch, self.ledger, self._wake, source=BucketSource(StoreHandle.of(self.store))
        )
        self.pool = SyncPool(
            self.ledger,
            self.sink,
            {"b": self.side()},
            workers=2,
            on_outcome=self.outcomes.append,
            on_source_changed=lambda w, rels: self.runner and self.runner.hint_changed(rels),
            spool_root=str(self.tmp / "state"),
        )
        self._task = asyncio.create_task(self.pool.run(poll=0.05))

    def _wake(self) -> None:
        if self.pool is not None:
            self.pool.wake()

    async def sync(self, timeout: float = 20) -> None:
        """List once, then wait until nothing is pending."""
        assert self.runner is not None
        await self.runner.poll()
        deadline = time.monotonic() + timeout
        while True:
            pending = self.ledger.sync.counts().get("b")
            if (pending is None or pending.pending == 0) and self.pool.inflight == 0:  # type: ignore[union-attr]
                return
            assert time.monotonic() < deadline, f"still pending: {self.outcomes[-5:]}"
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        if self.pool is None:
            return
        pool, self.pool = self.pool, None
        await pool.stop(1)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.runner is not None:
            await self.runner.stop()
        await self.ledger.close()

    def results(self) -> list[str]:
        return [o.result for o in self.outcomes]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Rig] = []

    async def make(sink: Sink, store: MemoryObjectStore | None = None, **watch: Any) -> Rig:
        r = Rig(tmp_path, sink, store or MemoryObjectStore(URL), **watch)
        await r.open()
        made.append(r)
        return r

    yield make
    for r in made:
        await r.close()


async def test_register_sends_references_and_moves_no_bytes(rig: Any) -> None:
    sink = MemorySink(Capabilities(remote_urls=True, delete=True))
    r = await rig(sink)  # transfer not set: the sink takes URLs, so register
    info = r.store.put("cam/a.jpg", b"abc", OLD)
    await r.sync()
    item = sink.items[("ds", "/cam/a.jpg")]
    assert item["slots"][0]["files"] == [
        {"name": "a.jpg", "url": "s3://bkt/pre/cam/a.jpg", "size": 3, "etag": info.etag}
    ]
    # Images are registered as they are: never read (so not checked or downscaled).
    assert "get" not in r.store.calls and "range" not in r.store.calls
    assert sink.blobs == {}
    assert [o.bytes for o in r.outcomes] == [0]


async def test_copy_streams_bytes_with_their_sha256(rig: Any) -> None:
    sink = MemorySink()  # no remote URLs: copy
    r = await rig(sink, MemoryObjectStore(URL), video={"mode": "native"})
    data = os.urandom(3 << 20)
    r.store.put("clips/v.mp4", data, OLD)
    r.store.put("notes.txt", b"hello", OLD)
    await r.sync()
    [video] = sink.items[("ds", "/clips/v.mp4")]["slots"][0]["files"]
    assert video == {"name": "v.mp4", "digest": sha(data), "size": len(data)}
    assert sink.items[("ds", "/clips/v.mp4")]["slots"][0]["fps"] == 1.0
    assert sink.blobs[sha(data)] == data
    assert sink.items[("ds", "/notes.txt")]["slots"][0]["files"][0]["digest"] == sha(b"hello")
    # Hashed by one GET and sent by another; nothing was written to disk.
    assert r.store.calls.count("get") == 4
    assert not (r.tmp / "state" / "spool").exists()


async def test_unchanged_objects_are_not_downloaded_again(rig: Any) -> None:
    sink = MemorySink()
    r = await rig(sink)
    r.store.put("a.bin", b"one", OLD)
    await r.sync()
    puts = len(sink.calls)
    gets = r.store.calls.count("get")
    # Whatever re-queues the item (a restart mid-way, a rescan), the ETag-keyed
    # source key says nothing changed: no GET, no put.
    r.ledger.sync.conn.execute("UPDATE items SET status='pending'")
    r.pool.wake()
    await r.sync()
    assert r.results()[-1] == "unchanged"
    assert len(sink.calls) == puts and r.store.calls.count("get") == gets


async def test_an_overwritten_object_updates_its_item(rig: Any) -> None:
    sink = MemorySink()
    r = await rig(sink)
    r.store.put("a.bin", b"one", OLD)
    await r.sync()
    r.store.put("a.bin", b"two", OLD)
    await r.sync()
    item = sink.items[("ds", "/a.bin")]
    assert item["version"] == 2
    assert item["slots"][0]["files"][0]["digest"] == sha(b"two")


async def test_an_object_replaced_during_the_sync_is_sent_as_its_new_version(rig: Any) -> None:
    sink = MemorySink()
    r = await rig(sink)
    r.store.put("a.bin", b"one", OLD)
    # Planned from the listing, then replaced before a worker reads it.
    r.pool.workers = 0
    await r.runner.poll()
    r.store.put("a.bin", b"two!", OLD)
    r.pool.workers = 2
    r.pool.wake()
    deadline = time.monotonic() + 20
    while "changed" not in r.results():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await r.sync()
    assert sink.items[("ds", "/a.bin")]["slots"][0]["files"][0]["digest"] == sha(b"two!")
    assert sink.items[("ds", "/a.bin")]["version"] == 1  # the first version never went


async def test_store_outage_while_copying_is_retried(rig: Any) -> None:
    sink = MemorySink()
    r = await rig(sink)
    r.store.put("a.bin", b"one", OLD)
    r.pool.workers = 0
    await r.runner.poll()
    r.store.fail = BucketError("unreachable", "s3://bkt/pre/: cannot reach S3")
    r.pool.workers = 2
    r.pool.wake()
    deadline = time.monotonic() + 20
    while "retry" not in r.results():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert "cannot reach S3" in (r.outcomes[-1].error or "")
    r.store.fail = None
    r.ledger.sync.conn.execute("UPDATE items SET next_attempt=0")
    r.pool.wake()
    await r.sync()
    assert ("ds", "/a.bin") in sink.items


async def test_images_are_spooled_checked_and_cleaned_up(rig: Any) -> None:
    sink = MemorySink()
    r = await rig(sink, images={"max_dimension": 16, "oversize": "downscale"})
    r.store.put("big.png", png((40, 30)), OLD)
    await r.sync()
    [f] = sink.items[("ds", "/big.png")]["slots"][0]["files"]
    with Image.open(io.BytesIO(sink.blobs[f["digest"]])) as im:
        assert max(im.size) == 16
    spool = r.tmp / "state" / "spool"
    assert not spool.exists() or not any(spool.iterdir())


async def test_a_corrupt_image_object_fails_with_a_reason(rig: Any) -> None:
    sink = MemorySink()
    r = await rig(sink)
    r.store.put("bad.jpg", b"\xff\xd8\xff\xe0 not really", OLD)
    await r.sync()
    assert r.results() == ["failed"]
    assert "bad.jpg" in (r.outcomes[0].error or "")


async def test_register_cannot_sample_frames_or_deidentify(rig: Any) -> None:
    sink = MemorySink(Capabilities(remote_urls=True))
    r = await rig(sink, dicom={"deidentify": True}, video={"mode": "frames"})
    r.store.put("v.mp4", b"\0\0\0\x18ftypmp42", OLD)
    r.store.put("s.dcm", b"\0" * 128 + b"DICM", OLD)
    await r.sync()
    errors = sorted(o.error or "" for o in r.outcomes)
    assert len(errors) == 2 and all("transfer: copy" in e for e in errors)
    assert sink.items == {}


async def test_the_local_sink_stores_references(rig: Any, tmp_path: Path) -> None:
    store_root = tmp_path / "store"
    objects = MemoryObjectStore(URL)
    info = objects.put("a.bin", b"A" * 5000, OLD)
    sink = LocalSink(store_root)
    assert sink.capabilities.remote_urls
    r = await rig(sink, objects)  # the local sink takes URLs: register by default
    await r.sync()
    await sink.close()
    with Store.open(store_root) as s:
        item = s.catalog.get_item("ds", "/", "a.bin")
        assert item is not None
        assert item["slots"][0]["files"] == [
            {"name": "a.bin", "url": "s3://bkt/pre/a.bin", "size": 5000, "etag": info.etag}
        ]
        assert list(s.blobs.digests()) == []


async def test_the_local_sink_stores_streamed_bytes(rig: Any, tmp_path: Path) -> None:
    store_root = tmp_path / "store"
    objects = MemoryObjectStore(URL)
    objects.put("b.bin", b"B" * 7000, OLD)
    objects.put("dir/c.bin", b"B" * 7000, OLD)  # same bytes: one blob
    sink = LocalSink(store_root)
    r = await rig(sink, objects, transfer="copy")
    await r.sync()
    await sink.close()
    with Store.open(store_root) as s:
        item = s.catalog.get_item("ds", "/", "b.bin")
        assert item is not None
        [f] = item["slots"][0]["files"]
        assert f == {"name": "b.bin", "digest": sha(b"B" * 7000), "size": 7000}
        assert s.blobs.path(f["digest"]).read_bytes() == b"B" * 7000
        assert list(s.blobs.digests()) == [f["digest"]]
        assert s.catalog.get_item("ds", "/dir", "c.bin") is not None


async def test_registered_objects_go_in_groups_from_the_backlog(rig: Any) -> None:
    """Groups fill from the backlog (up to the sink's limit), not from the workers: two
    workers, 230 objects, groups of up to 100, each object a reference with its https
    form for the platforms that fetch only https."""
    sink = BatchingMemorySink(BatchLimits(items=100, linger=0.0))
    r = await rig(sink)
    for i in range(230):
        r.store.put(f"cam/{i:03d}.jpg", b"jpeg %d" % i, OLD)
    await r.sync()
    assert len(sink.items) == 230
    assert sorted(sink.groups, reverse=True)[:2] == [100, 100] and sum(sink.groups) == 230
    assert sink.most_at_once <= 2  # `workers` still bounds the calls at once
    [ref] = sink.items[("ds", "/cam/007.jpg")]["slots"][0]["files"]
    assert ref["url"] == "s3://bkt/pre/cam/007.jpg" and "digest" not in ref
    [sent] = sink.sent["/cam/007.jpg"].slots[0].files
    assert sent.https_url == "https://bkt.s3.amazonaws.com/pre/cam/007.jpg"
    assert "get" not in r.store.calls  # a reference moves no bytes
