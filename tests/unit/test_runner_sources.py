"""One WatchRunner on every kind of Source: the same scenario, the same expectations, on a
real local folder (LocalFolderSource, a source with events) and on the in-memory object
store (BucketSource over MemoryObjectStore, a polled source). What differs by source is
only what its declared Features say; everything the runner records must be the same."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from ingestd.config import Watch, parse_bucket_url
from ingestd.core.source import Source
from ingestd.ledger import AsyncLedger
from ingestd.pipeline.runner import WatchRunner
from ingestd.sources.bucket_poll import StoreHandle
from ingestd.sources.bucket_source import BucketSource
from ingestd.sources.local import LocalFolderSource
from ingestd.sources.objects import MemoryObjectStore

from tests.support.wait import wait_until

OLD_S = time.time() - 3600  # an hour ago: settled by age where a source settles by age


class Folder:
    """Files written into a real folder, read through a LocalFolderSource."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()

    def watch(self) -> Watch:
        return Watch.model_validate(
            {"name": "w", "source": str(self.root), "dataset": "ds", "settle": "0.2s"}
        )

    def source(self) -> Source:
        return LocalFolderSource(self.root)

    def put(self, rel: str, data: bytes) -> None:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, (OLD_S, OLD_S))

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink()


class Bucket:
    """Objects in MemoryObjectStore, read through a BucketSource."""

    def __init__(self, root: Path) -> None:
        self.store = MemoryObjectStore(parse_bucket_url("s3://bkt/pre"), page_size=2)

    def watch(self) -> Watch:
        return Watch.model_validate(
            {"name": "w", "source": "s3://bkt/pre", "dataset": "ds", "settle": "0.2s"}
        )

    def source(self) -> Source:
        return BucketSource(StoreHandle.of(self.store))

    def put(self, rel: str, data: bytes) -> None:
        self.store.put(rel, data, int(OLD_S * 1e9))

    def delete(self, rel: str) -> None:
        self.store.delete(rel)


KINDS: dict[str, Callable[[Path], Any]] = {"folder": Folder, "bucket": Bucket}


@pytest.fixture(params=sorted(KINDS))
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    w = KINDS[request.param](tmp_path / "src")
    w.ledger = AsyncLedger(tmp_path / "state")
    await w.ledger.open()
    w.runners = []
    yield w
    for r in w.runners:
        await r.stop()
    await w.ledger.close()


def runner_for(world: Any) -> WatchRunner:
    r = WatchRunner(world.watch(), world.ledger, lambda: None, source=world.source(), observe=False)
    world.runners.append(r)
    return r


def items(world: Any) -> dict[str, str]:
    rows = world.ledger.sync.conn.execute("SELECT source_id, status FROM items").fetchall()
    return dict(rows)


async def settle_pass(r: WatchRunner) -> None:
    """One pass (the first through start(), which also runs settling and planning), then
    whatever it handed to settling is planned."""
    if r.scans == 0:
        await r.start()
    else:
        assert await r.scan("")
    await wait_until(lambda: not r.busy, 20, what="settled and planned")


async def test_the_same_runner_plans_new_files_and_counts_the_pass(world: Any) -> None:
    for rel in ("a.jpg", "cam/b.png", "cam/c.dat"):
        world.put(rel, rel.encode())
    r = runner_for(world)
    await settle_pass(r)
    if not r.source.features.events:
        await settle_pass(r)  # a polled source may take a second listing to settle
    assert items(world) == {"a.jpg": "pending", "cam/b.png": "pending", "cam/c.dat": "pending"}
    assert r.last_pass is not None and r.last_pass.files == 3
    # An unchanged second pass lists the same files and finds nothing new.
    assert await r.scan("")
    assert r.last_pass.files == 3 and r.last_pass.changed == 0 and r.last_pass.gone == 0
    assert r.files_seen == 3


async def test_a_gone_file_is_judged_by_the_same_pass(world: Any) -> None:
    for rel in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        world.put(rel, rel.encode())
    r = runner_for(world)
    await settle_pass(r)
    await settle_pass(r)
    world.delete("a.jpg")
    assert await r.scan("")
    assert r.last_pass is not None and r.last_pass.gone == 1 and r.last_pass.files == 3
    assert items(world)["a.jpg"] == "deleted"


async def test_a_source_that_cannot_be_listed_is_a_problem_and_deletes_nothing(
    world: Any, tmp_path: Path
) -> None:
    world.put("a.jpg", b"a")
    r = runner_for(world)
    await settle_pass(r)
    await settle_pass(r)
    if isinstance(world, Folder):
        world.root.rename(tmp_path / "unmounted")
    else:
        from ingestd.sources.objects import BucketError

        world.store.fail = BucketError("unreachable", "no answer from the store")
    assert not await r.scan("")
    problem = world.ledger.sync.watch_problems().get("w") or ""
    assert "nothing is deleted" in problem
    assert items(world) == {"a.jpg": "pending"}
    assert r.failures == 1 and r.next_delay() <= r.backoff_base
