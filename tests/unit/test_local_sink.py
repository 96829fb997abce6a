"""The `local` sink end to end: real source files, a real store on disk."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from ingestd.core.errors import PermanentError, RetriableError, SourceChangedError
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
from ingestd.sinks.base import Sink
from ingestd.sinks.local import LocalSink
from ingestd.store import Catalog, Store

from tests.support.need import need

REPO = Path(__file__).resolve().parents[2]


def file_payload(path: Path) -> FilePayload:
    data = path.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return FilePayload(path.name, str(path), len(data), digest)


def item_of(*paths: Path, path: str = "/", name: str = "item", **metadata: object) -> ItemPayload:
    slots = tuple(SlotPayload(str(i), "image", (file_payload(p),)) for i, p in enumerate(paths))
    return ItemPayload(path, name, slots, dict(metadata))


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[LocalSink]:
    s = LocalSink(tmp_path / "store")
    yield s
    await s.close()


def stored(root: Path, dataset: str, path: str, name: str) -> dict[str, object] | None:
    with Store.open(root) as store:
        return store.catalog.get_item(dataset, path, name)


async def test_implements_the_sink_interface(sink: LocalSink) -> None:
    assert isinstance(sink, Sink)
    assert sink.capabilities.delete and sink.capabilities.metadata_update
    assert sink.capabilities.remote_urls and sink.capabilities.batch is not None


async def test_put_item_end_to_end(tmp_path: Path, sink: LocalSink) -> None:
    a = write(tmp_path / "src/a.png", b"A" * 5000)
    b = write(tmp_path / "src/b.png", b"B" * 7000)
    item = item_of(a, b, path="/cams/c1", name="pair", camera="c1")
    await sink.ensure_dataset("photos")

    result = await sink.put_item("photos", item)
    assert (result.backend_id, result.version, result.changed) == ("/cams/c1/pair", 1, True)

    got = stored(tmp_path / "store", "photos", "/cams/c1", "pair")
    assert got == {
        "key": "/cams/c1/pair",
        "path": "/cams/c1",
        "name": "pair",
        "version": 1,
        "slots": [s.manifest() for s in item.slots],
        "metadata": {"camera": "c1"},
    }
    with Store.open(tmp_path / "store") as store:
        for f in (a, b):
            p = file_payload(f)
            assert store.blobs.path(p.digest).read_bytes() == f.read_bytes()
        assert store.blobs.verify_all() == []

    # Sent again after a crash: nothing changes.
    again = await sink.put_item("photos", item)
    assert (again.version, again.changed) == (1, False)
    # New metadata: an update of the same item.
    updated = await sink.put_item("photos", item_of(a, b, path="/cams/c1", name="pair"))
    assert (updated.version, updated.changed) == (2, True)
    got = stored(tmp_path / "store", "photos", "/cams/c1", "pair")
    assert got is not None and got["metadata"] == {}

    await sink.delete_item("photos", "/cams/c1", "pair")
    assert stored(tmp_path / "store", "photos", "/cams/c1", "pair") is None
    await sink.delete_item("photos", "/cams/c1", "pair")  # deleting twice is fine


async def test_many_items_in_parallel(tmp_path: Path, sink: LocalSink) -> None:
    srcs = [write(tmp_path / f"src/{i}.png", os.urandom(1000)) for i in range(100)]
    results = await asyncio.gather(*(sink.put_item("ds", item_of(p, name=p.name)) for p in srcs))
    assert all(r.changed and r.version == 1 for r in results)
    with Store.open(tmp_path / "store") as store:
        assert store.catalog.count_items("ds") == 100
        assert len(list(store.blobs.digests())) == 100


async def test_file_changed_after_hashing(tmp_path: Path, sink: LocalSink) -> None:
    src = write(tmp_path / "src/a.png", b"first version")
    item = item_of(src)
    write(src, b"second version, still being written")
    with pytest.raises(SourceChangedError, match=r"a\.png changed after it was hashed"):
        await sink.put_item("ds", item)
    assert stored(tmp_path / "store", "ds", "/", "item") is None
    with Store.open(tmp_path / "store") as store:
        assert list(store.blobs.digests()) == []
    assert os.listdir(tmp_path / "store" / "tmp") == []


async def test_one_changed_file_keeps_the_whole_item_out(tmp_path: Path, sink: LocalSink) -> None:
    good = write(tmp_path / "src/good.png", b"good")
    bad = write(tmp_path / "src/bad.png", b"bad")
    item = item_of(good, bad)
    write(bad, b"worse")
    with pytest.raises(SourceChangedError, match=r"bad\.png"):
        await sink.put_item("ds", item)
    assert stored(tmp_path / "store", "ds", "/", "item") is None


async def test_vanished_file(tmp_path: Path, sink: LocalSink) -> None:
    src = write(tmp_path / "src/a.png", b"here, then gone")
    item = item_of(src)
    src.unlink()
    with pytest.raises(SourceChangedError, match=r"a\.png vanished"):
        await sink.put_item("ds", item)
    assert stored(tmp_path / "store", "ds", "/", "item") is None


async def test_unreadable_file_is_permanent(tmp_path: Path, sink: LocalSink) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads mode-000 files; test_unreadable_file_as_another_user covers it")
    src = write(tmp_path / "src/a.png", b"secret")
    item = item_of(src)
    src.chmod(0)
    try:
        with pytest.raises(PermanentError, match=r"cannot read .*a\.png: permission denied"):
            await sink.put_item("ds", item)
    finally:
        src.chmod(0o644)


# Root bypasses file permissions, so as root the same scenario runs in a child that
# drops to an unprivileged user.
CHILD_UNREADABLE = """
import asyncio, hashlib, os, sys
from pathlib import Path
from ingestd.core.errors import SyncError
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
from ingestd.sinks.local import LocalSink

async def main(work):
    src = work / "a.png"
    src.write_bytes(b"secret")
    digest = "sha256:" + hashlib.sha256(b"secret").hexdigest()
    src.chmod(0)
    item = ItemPayload("/", "item", (SlotPayload("0", "image", (FilePayload("a.png", str(src), 6, digest),)),), {})
    sink = LocalSink(work / "store")
    try:
        await sink.put_item("ds", item)
        print("no error")
    except SyncError as e:
        print(type(e).__name__, e.reason)
    finally:
        await sink.close()

asyncio.run(main(Path(sys.argv[1])))
"""


def test_unreadable_file_as_another_user() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch users; test_unreadable_file_is_permanent covers it")
    setpriv = shutil.which("setpriv")
    need(setpriv is not None, "root reads mode-000 files and setpriv (util-linux) is missing")
    assert setpriv is not None
    work = Path(tempfile.mkdtemp(prefix="ingestd-perm-"))
    try:
        work.chmod(0o777)
        as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
        proc = subprocess.run(
            [*as_nobody, sys.executable, "-c", CHILD_UNREADABLE, str(work)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("PermanentError cannot read "), proc.stdout
        assert "a.png: permission denied; fix its permissions" in proc.stdout
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def test_store_side_failure_is_retriable(tmp_path: Path, sink: LocalSink) -> None:
    src = write(tmp_path / "src/a.png", b"fine")
    await sink.ensure_dataset("ds")  # opens the store
    # Break the store for real: its temp folder becomes a file, so no temp can be created.
    shutil.rmtree(tmp_path / "store" / "tmp")
    write(tmp_path / "store" / "tmp", b"")
    with pytest.raises(RetriableError, match="cannot write to local store"):
        await sink.put_item("ds", item_of(src))
    catalog = Catalog(tmp_path / "store" / "catalog.sqlite")
    assert catalog.count_items("ds") == 0
    catalog.close()


async def test_invalid_item_name_is_permanent(tmp_path: Path, sink: LocalSink) -> None:
    src = write(tmp_path / "src/a.png", b"fine")
    with pytest.raises(PermanentError, match="item name"):
        await sink.put_item("ds", item_of(src, name="a/b"))


async def test_close_shuts_a_private_executor(tmp_path: Path) -> None:
    sink = LocalSink(tmp_path / "store")
    await sink.ensure_dataset("ds")
    await sink.close()
    await sink.close()  # twice is fine
    with pytest.raises(RetriableError, match="closed"):
        await sink.ensure_dataset("ds")


async def test_a_shared_executor_outlives_the_sink(tmp_path: Path) -> None:
    with ThreadPoolExecutor(2) as pool:
        sink = LocalSink(tmp_path / "store", executor=pool)
        await sink.put_item("ds", item_of(write(tmp_path / "a.png", b"a")))
        await sink.close()
        assert pool.submit(lambda: 42).result() == 42
    assert stored(tmp_path / "store", "ds", "/", "item") is not None
