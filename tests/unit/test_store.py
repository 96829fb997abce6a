"""The embedded store: content-addressed blobs and the SQLite item catalog, on real files."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import pytest
from ingestd.store import BlobStore, Catalog, DigestMismatch, Store

from tests.support.wait import wait_for

REPO = Path(__file__).resolve().parents[2]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def tmp_files(root: Path) -> list[str]:
    return sorted(os.listdir(root / "tmp"))


# A writer in another process, blocked mid-copy: it streams from a FIFO, so it has
# created its temp file and written some bytes but cannot finish until we say so.
CHILD_WRITER = """
import sys
from pathlib import Path
from ingestd.store import BlobStore
w = BlobStore(Path(sys.argv[1])).put_file(sys.argv[2])
print(w.digest, w.created)
"""


def start_blocked_writer(root: Path, fifo: Path) -> tuple[subprocess.Popen[str], BinaryIO]:
    os.mkfifo(fifo)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_WRITER, str(root), str(fifo)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    feeder = open(fifo, "wb")  # noqa: SIM115 - kept open across the test on purpose
    feeder.write(b"partial " * 1000)
    feeder.flush()
    wait_for(lambda: (root / "tmp").is_dir() and tmp_files(root))
    return child, feeder


# --- blobs ------------------------------------------------------------------------------


def test_put_file_stores_bytes_under_their_digest(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "store")
    data = os.urandom(10_000)
    w = blobs.put_file(write(tmp_path / "a.bin", data))
    assert (w.digest, w.size, w.created) == (sha(data), len(data), True)
    assert blobs.has(w.digest)
    assert blobs.path(w.digest) == (tmp_path / "store/blobs/sha256" / w.digest[7:9] / w.digest[7:])
    assert blobs.path(w.digest).read_bytes() == data
    assert list(blobs.digests()) == [w.digest]
    assert blobs.verify_all() == []
    assert tmp_files(tmp_path / "store") == []


def test_identical_content_is_stored_once(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "store")
    data = b"same bytes" * 100
    first = blobs.put_file(write(tmp_path / "a", data))
    second = blobs.put_file(write(tmp_path / "b", data), sha(data), len(data))
    third = blobs.put_file(tmp_path / "b")  # no hint: copied, hashed, then deduplicated
    assert first.created and not second.created and not third.created
    assert first.digest == second.digest == third.digest
    assert list(blobs.digests()) == [first.digest]
    assert tmp_files(tmp_path / "store") == []


def test_known_digest_skips_the_copy_but_checks_the_size(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "store")
    data = b"x" * 64
    blobs.put_file(write(tmp_path / "a", data))
    # Same size, other bytes: not read at all, because the caller vouches for the digest.
    other = write(tmp_path / "b", b"y" * 64)
    assert not blobs.put_file(other, sha(data), 64).created
    write(other, b"y" * 65)
    with pytest.raises(DigestMismatch, match="size mismatch"):
        blobs.put_file(other, sha(data), 64)
    other.unlink()
    with pytest.raises(FileNotFoundError):
        blobs.put_file(other, sha(data), 64)


def test_digest_mismatch_leaves_no_blob_and_no_temp(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "store")
    src = write(tmp_path / "a", b"changed after hashing")
    wrong = sha(b"what the prepare step hashed")
    with pytest.raises(DigestMismatch) as err:
        blobs.put_file(src, wrong)
    assert (err.value.expected, err.value.actual) == (wrong, sha(b"changed after hashing"))
    with pytest.raises(DigestMismatch, match="size mismatch"):
        blobs.put_file(src, expected_size=3)
    assert list(blobs.digests()) == []
    assert tmp_files(tmp_path / "store") == []


def test_missing_source_leaves_nothing(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "store")
    with pytest.raises(FileNotFoundError):
        blobs.put_file(tmp_path / "nope", sha(b""), 0)
    assert list(blobs.digests()) == [] and tmp_files(tmp_path / "store") == []


def test_empty_file(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "store")
    w = blobs.put_file(write(tmp_path / "empty", b""))
    assert (w.digest, w.size) == (sha(b""), 0)
    assert blobs.path(w.digest).read_bytes() == b""


@pytest.mark.parametrize(
    "bad",
    [
        "sha256:../../../../etc/passwd",
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "md5:" + "a" * 32,
        "a" * 64,
        "sha256:" + "a" * 64 + "/x",
    ],
)
def test_malformed_digests_are_refused(tmp_path: Path, bad: str) -> None:
    blobs = BlobStore(tmp_path / "store")
    with pytest.raises(ValueError, match="not a sha256 digest"):
        blobs.path(bad)
    with pytest.raises(ValueError):
        blobs.put_file(write(tmp_path / "a", b"x"), bad)


def test_verify_all_finds_blobs_whose_bytes_do_not_match_their_name(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "store")
    good = blobs.put_file(write(tmp_path / "a", b"good")).digest
    rotten = blobs.put_file(write(tmp_path / "b", b"rotten")).digest
    path = blobs.path(rotten)
    path.chmod(0o644)
    path.write_bytes(b"bit rot")
    assert blobs.verify_all() == [rotten]
    assert blobs.has(good)


def test_concurrent_writers_of_overlapping_content(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "store")
    contents = [os.urandom(2048) for _ in range(20)]
    srcs = [write(tmp_path / f"src/{i}", contents[i % 20]) for i in range(200)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(blobs.put_file, srcs))
    assert {r.digest for r in results} == {sha(c) for c in contents}
    assert sorted(blobs.digests()) == sorted(sha(c) for c in contents)
    assert blobs.verify_all() == []
    assert tmp_files(tmp_path / "store") == []


def test_large_file_is_streamed(tmp_path: Path) -> None:
    size = 50 * 1024 * 1024
    src = tmp_path / "big"
    block = os.urandom(1024 * 1024)
    h = hashlib.sha256()
    with open(src, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
            h.update(block)
    blobs = BlobStore(tmp_path / "store")
    tracemalloc.start()
    try:
        w = blobs.put_file(src, "sha256:" + h.hexdigest(), size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert w.created and w.size == size
    # One 1 MiB copy buffer plus small change; reading the file whole would be 50 MiB.
    assert peak < 3 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
    assert blobs.verify_all() == []


def test_crash_mid_copy_leaves_only_a_temp_which_the_next_open_removes(tmp_path: Path) -> None:
    root = tmp_path / "store"
    child, feeder = start_blocked_writer(root, tmp_path / "fifo")
    try:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        feeder.close()
    assert len(tmp_files(root)) == 1  # the crash left its temp behind ...
    blobs = BlobStore(root)
    assert tmp_files(root) == []  # ... and opening the store removed it
    assert list(blobs.digests()) == []  # nothing partial ever appeared under a final name


def test_open_keeps_the_temp_files_of_a_live_writer(tmp_path: Path) -> None:
    root = tmp_path / "store"
    write(root / "tmp" / "garbage-from-an-old-version", b"x")
    child, feeder = start_blocked_writer(root, tmp_path / "fifo")
    try:
        # Another process (say `ingestd items`) opens the store while the daemon writes.
        reader = BlobStore(root)
        assert len(tmp_files(root)) == 1  # the writer's temp survived, the garbage did not
        feeder.write(b"end")
    finally:
        feeder.close()
    out, _ = child.communicate(timeout=10)
    assert child.returncode == 0
    digest, created = out.split()
    assert created == "True"
    assert digest == sha(b"partial " * 1000 + b"end")
    assert reader.has(digest) and reader.verify_all() == []
    assert tmp_files(root) == []


def test_open_keeps_the_temp_files_of_another_store_in_this_process(tmp_path: Path) -> None:
    root = tmp_path / "store"
    writer = BlobStore(root)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(writer.put_file(fifo)))
    t.start()
    with open(fifo, "wb") as feeder:
        feeder.write(b"a" * 10)
        feeder.flush()
        wait_for(lambda: tmp_files(root))
        BlobStore(root)
        assert len(tmp_files(root)) == 1
    t.join(10)
    assert result and writer.has(sha(b"a" * 10))


# --- catalog ----------------------------------------------------------------------------


def slots_for(*digests: str) -> list[dict[str, object]]:
    return [
        {"name": str(i), "type": "image", "files": [{"name": f"{i}.png", "digest": d, "size": 1}]}
        for i, d in enumerate(digests)
    ]


D1, D2, D3 = (sha(bytes([i])) for i in range(3))


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    c = Catalog(tmp_path / "catalog.sqlite")
    yield c
    c.close()


def test_catalog_file_is_wal(tmp_path: Path, catalog: Catalog) -> None:
    conn = sqlite3.connect(tmp_path / "catalog.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_datasets(catalog: Catalog) -> None:
    assert catalog.datasets() == []
    assert catalog.ensure_dataset("photos") is True
    assert catalog.ensure_dataset("photos") is False
    assert catalog.has_dataset("photos") and not catalog.has_dataset("scans")
    catalog.upsert_item("scans", "/", "a.dcm", slots_for(D1), {})  # created implicitly
    assert catalog.datasets() == ["photos", "scans"]


def test_upsert_create_identical_changed(catalog: Catalog) -> None:
    meta = {"camera": "c1", "tags": ["a", "b"], "n": 1}
    assert catalog.upsert_item("ds", "/cams/c1", "x.jpg", slots_for(D1), meta) == (1, True)
    # The same item re-sent after a crash: no change, same version. Key order is irrelevant.
    same_meta = {"n": 1, "tags": ["a", "b"], "camera": "c1"}
    assert catalog.upsert_item("ds", "/cams/c1", "x.jpg", slots_for(D1), same_meta) == (1, False)
    assert catalog.upsert_item("ds", "/cams/c1", "x.jpg", slots_for(D2), same_meta) == (2, True)
    assert catalog.upsert_item("ds", "/cams/c1", "x.jpg", slots_for(D2), {"n": 2}) == (3, True)
    assert catalog.upsert_item("ds", "/cams/c1", "x.jpg", slots_for(D2), {"n": 2}) == (3, False)
    assert catalog.get_item("ds", "/cams/c1", "x.jpg") == {
        "key": "/cams/c1/x.jpg",
        "path": "/cams/c1",
        "name": "x.jpg",
        "version": 3,
        "slots": slots_for(D2),
        "metadata": {"n": 2},  # camera and tags were dropped, not merged
    }


def test_slot_order_is_part_of_the_item(catalog: Catalog) -> None:
    catalog.upsert_item("ds", "/", "a", slots_for(D1, D2), {})
    assert catalog.upsert_item("ds", "/", "a", slots_for(D2, D1), {}) == (2, True)


def test_items_at_the_root_and_in_other_datasets_are_distinct(catalog: Catalog) -> None:
    catalog.upsert_item("ds", "/", "a", slots_for(D1), {})
    catalog.upsert_item("other", "/", "a", slots_for(D2), {})
    item = catalog.get_item("ds", "/", "a")
    assert item is not None and item["key"] == "/a" and item["slots"] == slots_for(D1)
    assert catalog.count_items("ds") == 1 and catalog.count_items("other") == 1


@pytest.mark.parametrize(
    ("path", "name"),
    [("a", "x"), ("/a/", "x"), ("//a", "x"), ("/a//b", "x"), ("/", ""), ("/", "a/b"), ("", "x")],
)
def test_upsert_refuses_paths_that_would_spell_a_key_twice(
    catalog: Catalog, path: str, name: str
) -> None:
    with pytest.raises(ValueError):
        catalog.upsert_item("ds", path, name, [], {})
    assert catalog.count_items("ds") == 0


def test_upsert_refuses_metadata_that_is_not_json(catalog: Catalog) -> None:
    with pytest.raises(ValueError):
        catalog.upsert_item("ds", "/", "a", [], {"x": float("nan")})
    with pytest.raises(TypeError):
        catalog.upsert_item("ds", "/", "a", [], {"x": object()})
    assert catalog.count_items("ds") == 0


def test_unicode_survives(catalog: Catalog) -> None:
    catalog.upsert_item("ds", "/café", "ß.png", slots_for(D1), {"note": "東京"})
    item = catalog.get_item("ds", "/café", "ß.png")
    assert item is not None and item["metadata"] == {"note": "東京"}


def test_delete(catalog: Catalog) -> None:
    catalog.upsert_item("ds", "/", "a", slots_for(D1), {})
    assert catalog.delete_item("ds", "/", "a") is True
    assert catalog.delete_item("ds", "/", "a") is False
    assert catalog.get_item("ds", "/", "a") is None
    assert catalog.count_items("ds") == 0
    # Re-created after a delete, it starts over.
    assert catalog.upsert_item("ds", "/", "a", slots_for(D1), {}) == (1, True)


def test_list_items_orders_filters_and_pages(catalog: Catalog) -> None:
    for path, name in [
        ("/b", "2"),
        ("/a", "1"),
        ("/", "z"),
        ("/a", "10"),
        ("/a_b", "x"),  # `_` and `%` are wildcards in LIKE: they must not be here
        ("/a%", "y"),
        ("/ab", "q"),
        ("/é", "e"),
    ]:
        catalog.upsert_item("ds", path, name, slots_for(D1), {})
    catalog.upsert_item("other", "/a", "1", slots_for(D1), {})

    keys = [i["key"] for i in catalog.list_items("ds")]
    assert keys == sorted(keys)
    assert keys == ["/a%/y", "/a/1", "/a/10", "/a_b/x", "/ab/q", "/b/2", "/z", "/é/e"]
    assert [i["key"] for i in catalog.list_items("ds", prefix="/a/")] == ["/a/1", "/a/10"]
    assert [i["key"] for i in catalog.list_items("ds", prefix="/a_")] == ["/a_b/x"]
    assert [i["key"] for i in catalog.list_items("ds", prefix="/a%")] == ["/a%/y"]
    assert [i["key"] for i in catalog.list_items("ds", prefix="/é")] == ["/é/e"]
    assert [i["key"] for i in catalog.list_items("ds", prefix="/A")] == []
    assert catalog.list_items("ds", prefix="") == catalog.list_items("ds")
    assert [i["key"] for i in catalog.list_items("ds", limit=2)] == ["/a%/y", "/a/1"]
    assert [i["key"] for i in catalog.list_items("ds", prefix="/a", after_key="/a/1", limit=2)] == [
        "/a/10",
        "/a_b/x",
    ]

    paged: list[str] = []
    after = None
    while page := catalog.list_items("ds", limit=3, after_key=after):
        paged += [i["key"] for i in page]
        after = page[-1]["key"]
    assert paged == keys
    assert catalog.list_items("missing") == []


def test_prefix_ending_in_the_highest_code_point(catalog: Catalog) -> None:
    top = "\U0010ffff"
    catalog.upsert_item("ds", "/" + top, "a", [], {})
    catalog.upsert_item("ds", "/" + top + top, "b", [], {})
    catalog.upsert_item("ds", "/\ue000", "c", [], {})
    got = [i["name"] for i in catalog.list_items("ds", prefix="/" + top)]
    assert got == ["a", "b"]


def test_referenced_digests(catalog: Catalog) -> None:
    catalog.upsert_item("ds", "/", "a", slots_for(D1, D2), {})
    catalog.upsert_item("ds2", "/", "b", slots_for(D2), {})
    remote = [{"name": "0", "type": "image", "files": [{"name": "r.png", "url": "s3://b/r.png"}]}]
    catalog.upsert_item("ds2", "/", "c", remote, {})
    assert catalog.referenced_digests() == {D1, D2}
    catalog.upsert_item("ds", "/", "a", slots_for(D3), {})
    assert catalog.referenced_digests() == {D2, D3}


def test_threads_share_a_catalog(catalog: Catalog) -> None:
    def work(t: int) -> None:
        for i in range(100):
            catalog.upsert_item("ds", f"/t{t}", str(i), slots_for(D1), {"i": i})
            catalog.upsert_item("ds", "/", "shared", slots_for(D1), {"t": t, "i": i})
            catalog.list_items("ds", limit=5)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    assert catalog.count_items("ds") == 8 * 100 + 1
    shared = catalog.get_item("ds", "/", "shared")
    assert shared is not None and shared["version"] == 8 * 100  # every update counted once


CHILD_CATALOG = """
import sys
from pathlib import Path
from ingestd.store import Store
root, who, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
slots = [{"name": "0", "type": "file", "files": []}]
with Store.open(root) as store:
    for i in range(n):
        store.catalog.upsert_item("ds", "/" + who, str(i), slots, {"i": i})
        store.catalog.upsert_item("ds", "/", "shared", slots, {"who": who, "i": i})
"""


def test_processes_write_one_store_concurrently(tmp_path: Path) -> None:
    root = tmp_path / "store"  # fresh: the children also race to create the schema
    n = 150
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD_CATALOG, str(root), f"p{p}", str(n)], cwd=REPO
        )
        for p in range(4)
    ]
    while any(c.poll() is None for c in children):
        with Store.open(root) as reader:  # like `ingestd items` during a sync
            reader.catalog.count_items("ds")
        time.sleep(0.02)
    assert [c.returncode for c in children] == [0, 0, 0, 0]
    with Store.open(root) as store:
        assert store.catalog.count_items("ds") == 4 * n + 1
        shared = store.catalog.get_item("ds", "/", "shared")
        assert shared is not None and shared["version"] == 4 * n


def test_store_open_creates_the_layout(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "store"
    with Store.open(root) as store:
        assert (root / "catalog.sqlite").is_file()
        assert (root / "blobs" / "sha256" / "00").is_dir()
        assert (root / "blobs" / "sha256" / "ff").is_dir()
        w = store.blobs.put_file(write(tmp_path / "a", b"a"))
        store.catalog.upsert_item("ds", "/", "a", slots_for(w.digest), {})
    with Store.open(root) as again:
        assert again.catalog.referenced_digests() == {w.digest}
        assert again.blobs.has(w.digest)


# -- the rename's durability (issue 14, point 9) ---------------------------------------


def test_a_group_fsyncs_each_blob_directory_once_before_the_catalog_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local sink's batch put: every blob directory that got a rename is fsynced
    (a real fsync, observed), once per directory however many blobs it got, and before
    the catalog transaction that names the blobs."""
    import asyncio
    import stat

    from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
    from ingestd.sinks.base import BatchItem
    from ingestd.sinks.local import LocalSink

    src = tmp_path / "src"
    src.mkdir()
    items = []
    shards: list[str] = []
    for i in range(40):
        data = b"blob %d " % i * 30
        (src / f"f{i}").write_bytes(data)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        shards.append(digest[7:9])
        f = FilePayload(f"f{i}", str(src / f"f{i}"), len(data), digest)
        items.append(
            BatchItem("ds", ItemPayload("/", f"f{i}", (SlotPayload("0", "file", (f,)),), {}))
        )
    events: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            events.append("dir " + os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    real_upsert = Catalog.upsert_items

    def upsert_items(self: Catalog, *a: object, **kw: object) -> object:
        events.append("catalog")
        return real_upsert(self, *a, **kw)

    sink = LocalSink(tmp_path / "store")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Catalog, "upsert_items", upsert_items)

    async def put() -> list[object]:
        await sink.ensure_dataset("ds")
        events.clear()  # opening the store syncs its folders once
        results = await sink.put_items(items)
        await sink.close()
        return list(results)

    results = asyncio.run(put())
    assert all(not isinstance(r, Exception) for r in results), results
    assert "catalog" in events
    before = events[: events.index("catalog")]
    blobs = str((tmp_path / "store" / "blobs" / "sha256").resolve())
    synced = [e[4:] for e in before if e.startswith("dir ")]
    assert sorted(synced) == sorted({f"{blobs}/{s}" for s in shards}), "one fsync per shard"
