"""The `http` sink against a fault-injecting ingestion server on real loopback sockets."""

from __future__ import annotations

import asyncio
import email.utils
import gc
import hashlib
import os
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from ingestd.core.errors import PermanentError, RetriableError, SourceChangedError
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
from ingestd.server.app import STATE
from ingestd.sinks.base import BatchItem, BatchPutter, PutResult, Sink
from ingestd.sinks.http import HttpSink
from ingestd.sinks.kit.pacer import parse_retry_after

from tests.support.fake_ingest_server import FakeIngestServer, Fault
from tests.support.server_app import TOKEN as SERVE_TOKEN
from tests.support.server_app import running
from tests.support.wait import wait_until

TOKEN = "tok-3f9c2e71d0"
KiB, MiB = 1 << 10, 1 << 20


def digest_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(MiB):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def payload(path: Path, name: str | None = None) -> FilePayload:
    return FilePayload(name or path.name, str(path), path.stat().st_size, digest_of(path))


def item_of(*paths: Path, path: str = "/", name: str = "item", **metadata: Any) -> ItemPayload:
    slots = tuple(SlotPayload(str(i), "image", (payload(p),)) for i, p in enumerate(paths))
    return ItemPayload(path, name, slots, dict(metadata))


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
async def server() -> AsyncIterator[FakeIngestServer]:
    s = FakeIngestServer(tokens={TOKEN})
    await s.start()
    yield s
    await s.stop()


def make_sink(server: FakeIngestServer, **kw: Any) -> HttpSink:
    sink = HttpSink(server.url, kw.pop("token", TOKEN), **kw)
    # Fast backoff so failure paths take milliseconds; the shape is what is tested.
    sink.backoff_base = kw.get("backoff_base", 0.01)
    sink.backoff_cap = 1.0
    return sink


@pytest.fixture
async def sink(server: FakeIngestServer) -> AsyncIterator[HttpSink]:
    s = make_sink(server)
    yield s
    await s.close()


# --- the basics --------------------------------------------------------------------------


async def test_implements_the_sink_interface(sink: HttpSink) -> None:
    assert isinstance(sink, Sink) and isinstance(sink, BatchPutter)
    caps = sink.capabilities
    assert caps.remote_urls and caps.delete and caps.batch is not None
    assert not caps.metadata_update
    assert TOKEN not in repr(sink)


async def test_small_item_round_trip(
    sink: HttpSink, server: FakeIngestServer, tmp_path: Path
) -> None:
    f = write(tmp_path / "a.jpg", b"jpeg bytes" * 100)
    await sink.ensure_dataset("photos")
    result = await sink.put_item("photos", item_of(f, name="a.jpg", camera="c1"))
    assert (result.backend_id, result.version, result.changed) == ("/a.jpg", 1, True)
    stored = server.items["photos"]["/a.jpg"]
    assert stored["metadata"] == {"camera": "c1"}
    [file] = stored["slots"][0]["files"]
    assert server.blobs[file["digest"]] == f.read_bytes()
    assert set(server.auth_headers) == {f"Bearer {TOKEN}"}
    # A small item is one request: its blob and manifest in one batch.
    assert server.requests[("POST", "batch")] == 1 and sum(server.requests.values()) == 2

    again = await sink.put_item("photos", item_of(f, name="a.jpg", camera="c1"))
    assert (again.version, again.changed) == (1, False)
    changed = await sink.put_item("photos", item_of(f, name="a.jpg", camera="c2"))
    assert (changed.version, changed.changed) == (2, True)


async def test_multi_file_item(sink: HttpSink, server: FakeIngestServer, tmp_path: Path) -> None:
    files = [write(tmp_path / f"{i}.png", os.urandom(1000 + i * 300_000)) for i in range(6)]
    result = await sink.put_item("ds", item_of(*files, path="/scans/a", name="study"))
    assert result.backend_id == "/scans/a/study"
    stored = server.items["ds"]["/scans/a/study"]
    assert [s["name"] for s in stored["slots"]] == [str(i) for i in range(6)]
    for f, slot in zip(files, stored["slots"], strict=True):
        assert server.blobs[slot["files"][0]["digest"]] == f.read_bytes()
    assert server.chunked_bodies == 0  # streamed bodies still announce their length


async def test_a_stored_blob_is_not_sent_again(
    sink: HttpSink, server: FakeIngestServer, tmp_path: Path
) -> None:
    f = write(tmp_path / "same.bin", os.urandom(1_500_000))  # too big for a batch
    copy = write(tmp_path / "copy.bin", f.read_bytes())
    await sink.put_item("ds", item_of(f, name="one"))
    received = server.bytes_received
    await sink.put_item("ds", item_of(copy, name="two"))
    assert server.requests[("PUT", "blob")] == 1
    assert server.requests[("HEAD", "blob")] == 2
    assert server.bytes_received - received < 2_000  # only the manifest
    assert set(server.items["ds"]) == {"/one", "/two"}
    assert server.requests[("POST", "batch")] == 0


async def test_tiny_blobs_are_put_without_asking(
    sink: HttpSink, server: FakeIngestServer, tmp_path: Path
) -> None:
    """Under head_min_size a HEAD costs as much as the PUT; the server's 200 for a blob
    it has keeps the store free of duplicates (the single-item routes, as against a
    server without batches)."""
    sink.batch_route = False
    f = write(tmp_path / "tiny.bin", os.urandom(1_000))
    await sink.put_item("ds", item_of(f, name="one"))
    await sink.put_item("ds", item_of(f, name="two"))
    assert server.requests[("HEAD", "blob")] == 0
    assert server.requests[("PUT", "blob")] == 2
    assert set(server.blob_writes.values()) == {1}


async def test_delete_item(sink: HttpSink, server: FakeIngestServer, tmp_path: Path) -> None:
    f = write(tmp_path / "x.jpg", b"x")
    await sink.put_item("ds", item_of(f, path="/a", name="x.jpg"))
    await sink.delete_item("ds", "/a", "x.jpg")
    assert server.items["ds"] == {}
    await sink.delete_item("ds", "/a", "x.jpg")  # already gone: done, not an error


async def test_names_round_trip(sink: HttpSink, server: FakeIngestServer, tmp_path: Path) -> None:
    f = write(tmp_path / "f.jpg", b"data")
    names = [
        ("/", "a#b.jpg"),
        ("/with space", "two words.jpg"),
        ("/", "line\nbreak.jpg"),
        ("/ünï/日本", "çødé 🙂.jpg"),
        ("/q", "what?x=1&y=%20.jpg"),
        ("/#hash/+plus", "100%.jpg"),
    ]
    for path, name in names:
        result = await sink.put_item("ds", item_of(f, path=path, name=name))
        assert result.backend_id == f"{path.rstrip('/')}/{name}"
    listed = [it async for it in sink.list_items("ds")]
    assert sorted((it["path"], it["name"]) for it in listed) == sorted(names)
    for path, name in names:
        await sink.delete_item("ds", path, name)
    assert [it async for it in sink.list_items("ds")] == []


async def test_list_items_pages(sink: HttpSink, server: FakeIngestServer, tmp_path: Path) -> None:
    f = write(tmp_path / "f.jpg", b"data")
    for i in range(7):
        await sink.put_item("ds", item_of(f, name=f"{i:02}.jpg"))
    sink.page_size = 3
    keys = [it["key"] async for it in sink.list_items("ds")]
    assert keys == [f"/{i:02}.jpg" for i in range(7)]
    assert server.requests[("GET", "items")] == 3
    assert [it async for it in sink.list_items("nope")] == []


# --- groups: POST /v1/batch ----------------------------------------------------------------


class Stream:
    """An object streamed from a bucket: an opener over bytes, counting its opens."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.opened = 0
        self.where = "s3://bkt/obj.bin"

    async def __call__(self) -> AsyncIterator[bytes]:
        self.opened += 1
        for i in range(0, len(self.data), 4096):
            yield self.data[i : i + 4096]


def streamed(data: bytes, name: str = "obj.bin") -> FilePayload:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return FilePayload(name, "", len(data), digest, opener=Stream(data))


def group(items: list[ItemPayload], dataset: str = "ds") -> list[BatchItem]:
    return [BatchItem(dataset, it) for it in items]


async def test_a_group_of_small_items_is_one_request(
    sink: HttpSink, server: FakeIngestServer, tmp_path: Path
) -> None:
    files = [write(tmp_path / f"{i:02}.png", os.urandom(5_000 + i)) for i in range(50)]
    big = write(tmp_path / "big.bin", os.urandom(1_500_000))  # over `small`: alone
    ref = FilePayload("ref.jpg", "", 10, "", url="s3://bkt/ref.jpg")
    obj = streamed(os.urandom(20_000))
    items = [item_of(f, name=f.name) for f in files]
    items += [
        item_of(big, name="big.bin"),
        ItemPayload("/", "ref.jpg", (SlotPayload("0", "image", (ref,)),), {}),
        ItemPayload("/", "obj.bin", (SlotPayload("0", "image", (obj,)),), {"from": "s3"}),
    ]
    results = await sink.put_items(group(items))
    assert all(isinstance(r, PutResult) and r.version == 1 and r.changed for r in results)
    assert [r.backend_id for r in results if isinstance(r, PutResult)] == [i.key for i in items]
    assert server.requests[("POST", "batch")] == 1
    assert server.requests[("PUT", "item")] == 1  # the big one, after its blob
    stored = server.items["ds"]
    assert len(stored) == 53
    assert server.blobs[digest_of(files[7])] == files[7].read_bytes()
    assert server.blobs[obj.digest] == obj.opener.data  # type: ignore[union-attr]
    assert stored["/ref.jpg"]["slots"][0]["files"] == [ref.manifest()]
    # The same group again: the server answers "unchanged" for each, in one request.
    again = await sink.put_items(group(items[:50]))
    assert all(isinstance(r, PutResult) and not r.changed for r in again)
    assert server.requests[("POST", "batch")] == 2
    assert set(server.item_writes.values()) == {1}


async def test_a_group_over_the_limits_takes_several_requests(
    sink: HttpSink, server: FakeIngestServer, tmp_path: Path
) -> None:
    f = write(tmp_path / "f.bin", b"x" * 100)
    items = [item_of(f, name=f"{i:03}") for i in range(600)]
    results = await sink.put_items(group(items))
    assert all(isinstance(r, PutResult) for r in results)
    limits = sink.capabilities.batch
    assert limits is not None and limits.items == 256
    assert server.requests[("POST", "batch")] == 3  # 256 + 256 + 88
    assert len(server.items["ds"]) == 600


async def test_a_bad_item_fails_alone_in_its_group(
    sink: HttpSink, server: FakeIngestServer, tmp_path: Path
) -> None:
    good = [write(tmp_path / f"g{i}.png", os.urandom(2_000)) for i in range(3)]
    changed = write(tmp_path / "changed.png", b"before")
    vanished = write(tmp_path / "vanished.png", b"here")
    items = [item_of(p, name=p.name) for p in (good[0], changed, good[1], vanished, good[2])]
    items.append(item_of(good[0], name="odd.png", when=object()))  # not JSON
    changed.write_bytes(b"after!")
    vanished.unlink()
    results = await sink.put_items(group(items))
    assert [type(r) for r in results] == [
        PutResult,
        SourceChangedError,
        PutResult,
        SourceChangedError,
        PutResult,
        PermanentError,
    ]
    assert str(changed) in str(results[1]) and "vanished" in str(results[3])
    assert "not JSON" in str(results[5])
    assert set(server.items["ds"]) == {"/g0.png", "/g1.png", "/g2.png"}
    assert server.requests[("POST", "batch")] == 1
    assert len(server.blob_sizes) == 3  # no bytes of the bad items were sent


async def test_a_blob_the_server_refuses_fails_its_items_alone(
    sink: HttpSink, server: FakeIngestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's own check: bytes that changed between the sink's read and the
    server's hash (or were corrupted on the way) fail the items naming them."""
    import ingestd.sinks.http.groups as groups

    a, b = write(tmp_path / "a.png", b"a" * 3000), write(tmp_path / "b.png", b"b" * 3000)
    real = groups.read_local_many

    def corrupt(files: list[FilePayload]) -> list[Any]:
        out = real(files)
        return [x[:-1] + b"!" if f.name == "b.png" else x for f, x in zip(files, out, strict=True)]

    monkeypatch.setattr(groups, "read_local_many", corrupt)
    results = await sink.put_items(group([item_of(a, name="a.png"), item_of(b, name="b.png")]))
    assert isinstance(results[0], PutResult)
    assert isinstance(results[1], SourceChangedError)
    assert str(b) in str(results[1]) and "the server read sha256:" in str(results[1])
    assert set(server.items["ds"]) == {"/a.png"}


async def test_a_server_without_batches_gets_the_single_item_routes(
    sink: HttpSink, server: FakeIngestServer, tmp_path: Path
) -> None:
    server.batch_route = False
    files = [write(tmp_path / f"{i}.png", os.urandom(1_000)) for i in range(5)]
    results = await sink.put_items(group([item_of(f, name=f.name) for f in files]))
    assert all(isinstance(r, PutResult) for r in results)
    assert not sink.batch_route
    await sink.put_item("ds", item_of(files[0], name="again.png"))
    assert server.requests[("POST", "batch")] == 1  # asked once
    assert server.requests[("PUT", "item")] == 6
    assert len(server.items["ds"]) == 6


async def test_a_group_over_the_servers_body_limit_goes_item_by_item(
    sink: HttpSink, server: FakeIngestServer, tmp_path: Path
) -> None:
    server.max_body = 5_000
    files = [write(tmp_path / f"{i}.png", os.urandom(3_000)) for i in range(3)]
    results = await sink.put_items(group([item_of(f, name=f.name) for f in files]))
    assert all(isinstance(r, PutResult) for r in results)
    assert sink.batch_route  # a 413 says nothing about the route
    assert server.requests[("PUT", "blob")] == 3 and len(server.items["ds"]) == 3


async def test_put_items_against_ingestd_serve(tmp_path: Path) -> None:
    """The sink and the real server (its app in-process, on a loopback socket)."""
    files = [write(tmp_path / "src" / f"{i:03}.png", os.urandom(8_000 + i)) for i in range(300)]
    changed = write(tmp_path / "src" / "changed.png", b"before")
    big = write(tmp_path / "src" / "big.bin", os.urandom(3 * MiB + 17))
    items = [item_of(f, path="/scans", name=f.name, n=i) for i, f in enumerate(files)]
    items += [item_of(changed, name="changed.png"), item_of(big, name="big.bin")]
    changed.write_bytes(b"after!")
    async with running(tmp_path / "store") as srv:
        sink = HttpSink(
            f"http://127.0.0.1:{srv.port}",
            SERVE_TOKEN,
            resumable_threshold=1 * MiB,
            chunk_size=1 * MiB,
        )
        try:
            await sink.ensure_dataset("ds")
            results = await sink.put_items(group(items))
            again = await sink.put_items(group(items[:10]))
        finally:
            await sink.close()
        _, metrics, _ = await srv.call("GET", "/metrics", headers={})
        store = srv.app[STATE].store
        assert store is not None
        held = {i["key"]: i for i in store.catalog.list_items("ds")}
        blob = store.blobs.path(digest_of(files[42])).read_bytes()
        big_blob = store.blobs.path(digest_of(big)).read_bytes()
    assert [type(r) for r in results] == [PutResult] * 300 + [SourceChangedError, PutResult]
    assert all(isinstance(r, PutResult) and not r.changed for r in again)
    assert len(held) == 301 and "/changed.png" not in held
    assert held["/scans/042.png"]["metadata"] == {"n": 42}
    assert blob == files[42].read_bytes() and big_blob == big.read_bytes()
    text = metrics.decode()
    batches = [
        line
        for line in text.splitlines()
        if line.startswith("ingestd_serve_requests_total") and 'route="/v1/batch"' in line
    ]
    assert batches and sum(float(line.rsplit(" ", 1)[1]) for line in batches) == 3  # 256+45, 10
    assert 'ingestd_serve_items_total{result="created"} 301.0' in text


# --- large files: the resumable protocol -------------------------------------------------


async def test_big_file_goes_through_resumable_upload(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    big = write(tmp_path / "big.bin", os.urandom(3 * MiB + 123))
    sink = make_sink(server, resumable_threshold=256 * KiB, chunk_size=1 * MiB)
    try:
        await sink.put_item("ds", item_of(big, name="big"))
    finally:
        await sink.close()
    assert server.requests[("POST", "uploads")] == 1
    assert server.requests[("PATCH", "upload")] == 4
    assert server.requests[("PUT", "blob")] == 0
    assert server.blobs[digest_of(big)] == big.read_bytes()
    assert server.uploads == {}


async def test_dropped_patch_resumes_from_the_server_offset(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    data = os.urandom(3 * MiB)
    big = write(tmp_path / "big.bin", data)
    sink = make_sink(server, resumable_threshold=256 * KiB, chunk_size=2 * MiB)
    # The first PATCH is cut after 1.2 MB of its 2 MiB: the server keeps those bytes.
    server.script("PATCH", "upload", Fault(cut_after=1_200_000))
    try:
        await sink.put_item("ds", item_of(big, name="big"))
    finally:
        await sink.close()
    assert server.blobs[digest_of(big)] == data
    assert server.requests[("POST", "uploads")] == 1  # the same upload, resumed
    # The PATCH sent again learnt the server's offset (416) and went on from there.
    assert server.statuses[416] == 1
    assert server.bytes_received < 1.5 * len(data)


async def test_resume_survives_a_failed_call(server: FakeIngestServer, tmp_path: Path) -> None:
    """An upload that runs out of attempts resumes on the next put_item (the ledger's
    retry), from where the server stopped, not from zero."""
    data = os.urandom(4 * MiB)
    big = write(tmp_path / "big.bin", data)
    sink = make_sink(server, resumable_threshold=256 * KiB, chunk_size=1 * MiB)
    sink.max_attempts = 2
    server.script("PATCH", "upload", Fault(status=500), times=2)
    server.script("PATCH", "upload", Fault(cut_after=0))  # consumed after the 500s
    server.scripted.insert(0, ("PATCH", "upload", Fault()))  # first chunk goes through
    try:
        with pytest.raises(RetriableError):
            await sink.put_item("ds", item_of(big, name="big"))
        assert server.uploads and next(iter(server.uploads.values())).offset == 1 * MiB
        await sink.put_item("ds", item_of(big, name="big"))
    finally:
        await sink.close()
    assert server.requests[("POST", "uploads")] == 1
    assert server.blobs[digest_of(big)] == data
    assert server.bytes_received < 1.5 * len(data)


async def test_progress_keeps_a_flaky_big_upload_going(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    """More cuts than max_attempts, but each one moves the offset: no give-up."""
    data = os.urandom(3 * MiB)
    big = write(tmp_path / "big.bin", data)
    sink = make_sink(server, resumable_threshold=256 * KiB, chunk_size=1 * MiB)
    sink.max_attempts = 2
    server.script("PATCH", "upload", Fault(cut_after=300_000), times=6)
    try:
        await sink.put_item("ds", item_of(big, name="big"))
    finally:
        await sink.close()
    assert server.blobs[digest_of(big)] == data


async def test_413_on_a_single_put_falls_back_to_chunks(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    server.max_body = 1 * MiB
    f = write(tmp_path / "f.bin", os.urandom(3 * MiB))
    sink = make_sink(server, chunk_size=512 * KiB)
    try:
        await sink.put_item("ds", item_of(f, name="f"))
    finally:
        await sink.close()
    assert server.blobs[digest_of(f)] == f.read_bytes()
    assert server.requests[("POST", "uploads")] == 1


# --- retries -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [503, 429])
async def test_retry_after_is_honoured(
    status: int, sink: HttpSink, server: FakeIngestServer, tmp_path: Path
) -> None:
    f = write(tmp_path / "f.jpg", b"data")
    server.script("POST", "batch", Fault(status=status, retry_after="1"))
    start = time.monotonic()
    await sink.put_item("ds", item_of(f))
    assert time.monotonic() - start >= 1.0
    assert server.statuses[status] == 1
    assert "/item" in server.items["ds"]


async def test_retry_after_as_an_http_date(
    sink: HttpSink, server: FakeIngestServer, tmp_path: Path
) -> None:
    f = write(tmp_path / "f.jpg", b"data")
    sink.backoff_cap = 5.0  # a longer Retry-After would go back to the ledger
    when = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: 1–2 s away
    server.script("POST", "batch", Fault(status=503, retry_after=when))
    start = time.monotonic()
    await sink.put_item("ds", item_of(f))
    assert time.monotonic() - start >= 0.9


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


async def test_a_long_retry_after_goes_back_to_the_ledger(
    sink: HttpSink, server: FakeIngestServer, tmp_path: Path
) -> None:
    f = write(tmp_path / "f.jpg", b"data")
    server.script("POST", "batch", Fault(status=429, retry_after="120"))
    start = time.monotonic()
    with pytest.raises(RetriableError) as e:
        await sink.put_item("ds", item_of(f))
    assert time.monotonic() - start < 1.0
    assert e.value.retry_after == 120.0
    assert "429" in e.value.reason


async def test_5xx_exhausts_attempts_into_a_retriable_error(
    sink: HttpSink, server: FakeIngestServer, tmp_path: Path
) -> None:
    f = write(tmp_path / "f.jpg", b"data")
    server.script("POST", "batch", Fault(status=502, error="bad gateway upstream"), times=10)
    with pytest.raises(RetriableError) as e:
        await sink.put_item("ds", item_of(f))
    assert server.requests[("POST", "batch")] == sink.max_attempts
    assert "502" in e.value.reason and "bad gateway upstream" in e.value.reason


async def test_a_stalled_server_times_out_and_is_retried(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    f = write(tmp_path / "f.jpg", b"data")
    server.script("POST", "batch", Fault(stall=5.0))
    sink = make_sink(server, timeout=0.5)
    try:
        start = time.monotonic()
        await sink.put_item("ds", item_of(f))
        assert 0.5 <= time.monotonic() - start < 4.0
    finally:
        await sink.close()
    assert "/item" in server.items["ds"]


async def test_a_server_that_stops_reading_a_body_is_detected(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    """Without the stall guard the upload would wait in drain() forever: sock_read
    only starts once the body is sent."""
    data = os.urandom(48 * MiB)
    f = write(tmp_path / "big.bin", data)
    server.keep_bytes = False
    server.script("PUT", "blob", Fault(hang_after=256 * KiB, stall=30.0))
    sink = make_sink(server, timeout=1.0, resumable_threshold=1 << 40)
    try:
        start = time.monotonic()
        await sink.put_item("ds", item_of(f))
        assert time.monotonic() - start < 15.0
    finally:
        await sink.close()
    assert digest_of(f) in server.blob_sizes


async def test_flaky_server_stores_everything_exactly_once(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    """10 % error answers (500/503/429 with Retry-After) and 2 % cut connections (half
    mid-body, half after the work was done) over 200 small files."""
    server.error_rate, server.drop_rate, server.retry_after = 0.10, 0.02, "0"
    files = [write(tmp_path / f"{i:03}.bin", os.urandom(2_000 + i * 97)) for i in range(200)]
    sink = make_sink(server, workers=8)
    limit = asyncio.Semaphore(8)
    results = {}

    async def one(p: Path) -> None:
        async with limit:
            for _ in range(5):  # the ledger's retries, should a call run out of attempts
                try:
                    results[p.name] = await sink.put_item("ds", item_of(p, name=p.name))
                    return
                except RetriableError:
                    await asyncio.sleep(0.05)
            raise AssertionError(f"{p.name} never stored")

    try:
        await asyncio.gather(*(one(p) for p in files))
    finally:
        await sink.close()
    items = server.items["ds"]
    assert len(items) == 200
    assert all(it["version"] == 1 for it in items.values())
    assert set(server.item_writes.values()) == {1}
    assert set(server.blob_writes.values()) == {1}
    for p in files:
        assert server.blobs[digest_of(p)] == p.read_bytes()
    assert server.statuses[500] + server.statuses[503] + server.statuses[429] > 20
    assert sum(1 for r in results.values() if r.version == 1) == 200


# --- what fails for good, and what means the file moved ----------------------------------


async def test_digest_mismatch_means_the_source_changed(
    sink: HttpSink, server: FakeIngestServer, tmp_path: Path
) -> None:
    f = write(tmp_path / "f.jpg", b"original")
    item = item_of(f)
    f.write_bytes(b"modified")  # same size, different bytes
    with pytest.raises(SourceChangedError) as e:
        await sink.put_item("ds", item)
    assert str(f) in e.value.reason
    assert server.blob_sizes == {} and "ds" not in server.items


async def test_digest_mismatch_on_a_resumable_upload(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    f = write(tmp_path / "big.bin", os.urandom(1 * MiB))
    item = item_of(f)
    write(f, os.urandom(1 * MiB))
    sink = make_sink(server, resumable_threshold=256 * KiB, chunk_size=256 * KiB)
    try:
        with pytest.raises(SourceChangedError):
            await sink.put_item("ds", item)
        assert sink.blobs.uploads == {}  # the server discarded it; a redo starts afresh
    finally:
        await sink.close()
    assert server.blob_sizes == {}


@pytest.mark.parametrize("size", [10, 3 * MiB])
async def test_a_file_that_changed_size_or_vanished(
    size: int, sink: HttpSink, server: FakeIngestServer, tmp_path: Path
) -> None:
    f = write(tmp_path / "f.bin", os.urandom(size))
    item = item_of(f)
    write(f, os.urandom(size + 1))
    with pytest.raises(SourceChangedError):
        await sink.put_item("ds", item)
    f.unlink()
    with pytest.raises(SourceChangedError, match="vanished"):
        await sink.put_item("ds", item)
    # A small file is read (and checked) before its batch is built: nothing was sent.
    # A big one is checked while it streams: its last block is never sent.
    assert server.requests[("POST", "batch")] == 0
    assert server.blob_sizes == {}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
async def test_an_unreadable_file_is_a_permanent_failure(
    sink: HttpSink, server: FakeIngestServer, tmp_path: Path
) -> None:
    f = write(tmp_path / "secret.jpg", b"data")
    item = item_of(f)
    f.chmod(0)
    try:
        with pytest.raises(PermanentError, match="permission denied"):
            await sink.put_item("ds", item)
    finally:
        f.chmod(0o644)


@pytest.mark.parametrize("size", [10, 3 * MiB])
async def test_permission_denied_is_permanent_even_as_root(
    size: int,
    sink: HttpSink,
    server: FakeIngestServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ingestd.sinks.base as base
    import ingestd.sinks.kit.verified as verified

    f = write(tmp_path / "f.bin", os.urandom(size))
    item = item_of(f)

    def denied(*a: Any, **kw: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(f))

    monkeypatch.setattr(verified, "open", denied, raising=False)  # small files
    monkeypatch.setattr(base.aiofiles, "open", denied)  # streamed files
    with pytest.raises(PermanentError, match="permission denied"):
        await sink.put_item("ds", item)


@pytest.mark.parametrize("batch", [True, False])
async def test_a_bad_name_is_rejected_with_the_servers_message(
    batch: bool, sink: HttpSink, server: FakeIngestServer, tmp_path: Path
) -> None:
    sink.batch_route = batch
    f = write(tmp_path / "f.jpg", b"data")
    with pytest.raises(PermanentError) as e:
        await sink.put_item("ds", item_of(f, path="/a", name=".."))
    assert "400" in e.value.reason and "bad path segment" in e.value.reason
    assert server.requests[("POST", "batch") if batch else ("PUT", "item")] == 1  # not retried


async def test_422_is_permanent_with_the_servers_message(
    sink: HttpSink, server: FakeIngestServer, tmp_path: Path
) -> None:
    f = write(tmp_path / "f.jpg", b"data")
    server.script(
        "POST",
        "batch",
        Fault(status=422, error="metadata key 'camera' is a number elsewhere", code="bad_meta"),
    )
    with pytest.raises(PermanentError) as e:
        await sink.put_item("ds", item_of(f))
    assert "metadata key 'camera' is a number elsewhere" in e.value.reason
    assert "422" in e.value.reason


@pytest.mark.parametrize("token", ["wrong-token-8d1e4b", None])
async def test_401_names_the_token_but_never_shows_it(
    token: str | None, server: FakeIngestServer, tmp_path: Path
) -> None:
    f = write(tmp_path / "f.jpg", b"data")
    sink = make_sink(server, token=token)
    try:
        with structlog.testing.capture_logs() as logs, pytest.raises(PermanentError) as e:
            await sink.put_item("ds", item_of(f))
    finally:
        await sink.close()
    assert "401" in e.value.reason and "token" in e.value.reason
    assert "backend.token_env" in e.value.reason  # where the token comes from
    assert server.requests[("POST", "batch")] == 1  # not retried
    if token is not None:
        assert token not in e.value.reason
        assert token not in repr(logs) and token not in repr(sink)


async def test_missing_blobs_are_sent_again(
    sink: HttpSink, server: FakeIngestServer, tmp_path: Path
) -> None:
    f = write(tmp_path / "f.jpg", os.urandom(1_500_000))  # not in a batch; HEAD asked
    await sink.put_item("ds", item_of(f, name="one"))
    # The server loses the blob but HEAD still claims it (a store that GC'd under us).
    digest = digest_of(f)
    del server.blob_sizes[digest], server.blobs[digest]
    original = server._blob_head

    async def lying_head(request: Any, d: str, **kw: Any) -> Any:
        from aiohttp import web

        return web.Response(status=200)

    server._blob_head = lying_head  # type: ignore[method-assign]
    try:
        result = await sink.put_item("ds", item_of(f, name="two"))
    finally:
        server._blob_head = original  # type: ignore[method-assign]
    assert result.version == 1
    assert server.blob_sizes[digest] == f.stat().st_size
    assert server.statuses[409] == 1


# --- outages -----------------------------------------------------------------------------


async def test_an_outage_is_one_warning_one_probe_at_a_time_and_one_info(
    server: FakeIngestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [write(tmp_path / f"{i}.jpg", os.urandom(100)) for i in range(10)]
    sink = make_sink(server)
    sink.backoff_base, sink.backoff_cap = 0.05, 0.4
    await sink.ensure_dataset("ds")
    sends = 0  # requests that reach the network
    in_flight = 0
    max_in_flight_while_down = 0
    original = aiohttp.ClientSession.request

    class Counted:
        """Counts requests, and how many of those started while the gate was down
        (probes) were under way at once."""

        def __init__(self, cm: Any) -> None:
            self.cm = cm
            self.while_down = False

        async def __aenter__(self) -> Any:
            nonlocal sends, in_flight, max_in_flight_while_down
            sends += 1
            self.while_down = sink.gate.down
            if self.while_down:
                in_flight += 1
                max_in_flight_while_down = max(max_in_flight_while_down, in_flight)
            try:
                return await self.cm.__aenter__()
            except BaseException:
                self._done()
                raise

        async def __aexit__(self, *exc: Any) -> Any:
            self._done()
            return await self.cm.__aexit__(*exc)

        def _done(self) -> None:
            nonlocal in_flight
            if self.while_down:
                in_flight -= 1
                self.while_down = False

    def counting(self: aiohttp.ClientSession, *a: Any, **kw: Any) -> Any:
        return Counted(original(self, *a, **kw))

    monkeypatch.setattr(aiohttp.ClientSession, "request", counting)
    await server.stop()
    try:
        with structlog.testing.capture_logs() as logs:
            results = await asyncio.gather(
                *(sink.put_item("ds", item_of(p, name=p.name)) for p in files),
                return_exceptions=True,
            )
            assert all(isinstance(r, RetriableError) for r in results), results
            assert all("unreachable" in r.reason or "connect" in r.reason for r in results)  # type: ignore[union-attr]
            # Without the gate: 10 calls x 5 attempts = 50 connection attempts.
            assert sends < 10 + 15, sends
            assert max_in_flight_while_down <= 1
            down = [e for e in logs if e["event"] == "ingestion server unreachable"]
            assert len(down) == 1 and down[0]["log_level"] == "warning"
            assert down[0]["url"] == server.url
            assert not sink.reachable  # the sync step logs its retries quietly meanwhile

            await server.start()  # same port
            await asyncio.gather(*(sink.put_item("ds", item_of(p, name=p.name)) for p in files))
        assert sink.reachable
        up = [e for e in logs if e["event"] == "ingestion server reachable again"]
        assert len(up) == 1 and up[0]["log_level"] == "info"
        assert len([e for e in logs if e["log_level"] == "warning"]) == 1
        assert TOKEN not in repr(logs)
    finally:
        await sink.close()
    assert len(server.items["ds"]) == 10


async def test_calls_during_an_outage_wait_instead_of_spinning(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    """A call made while the server is down costs no connection attempt unless it is
    the probe, and takes its backoff time before giving up: no hot loop."""
    f = write(tmp_path / "f.jpg", b"x")
    sink = make_sink(server)
    sink.backoff_base, sink.backoff_cap = 0.05, 0.2
    await server.stop()
    try:
        with pytest.raises(RetriableError):
            await sink.put_item("ds", item_of(f))
        start = time.monotonic()
        with pytest.raises(RetriableError):
            await sink.put_item("ds", item_of(f))
        assert time.monotonic() - start >= 0.05
    finally:
        await sink.close()


async def test_closing_the_sink_ends_its_retries(server: FakeIngestServer, tmp_path: Path) -> None:
    """A call retrying when the sink is closed (a shutdown) stops at its next attempt
    instead of opening a new connection pool behind the closed sink."""
    f = write(tmp_path / "f.jpg", b"x")
    sink = make_sink(server)
    sink.backoff_base, sink.backoff_cap = 0.2, 0.2
    sink.max_attempts = 100  # it must not give up on its own before the close
    server.script("POST", "batch", Fault(status=503), times=100)
    task = asyncio.create_task(sink.put_item("ds", item_of(f)))
    await wait_until(lambda: server.requests[("POST", "batch")] >= 1, what="the first attempt")
    await sink.close()
    with pytest.raises(RetriableError, match="closed"):
        await asyncio.wait_for(task, 5)
    assert server.requests[("POST", "batch")] <= 2  # at most one attempt already under way


async def test_server_restart_mid_upload(server: FakeIngestServer, tmp_path: Path) -> None:
    """A killed server drops connections mid-body; after it comes back the upload
    resumes from the offset it kept."""
    data = os.urandom(8 * MiB)
    big = write(tmp_path / "big.bin", data)
    sink = make_sink(server, resumable_threshold=256 * KiB, chunk_size=1 * MiB)
    sink.backoff_base, sink.backoff_cap = 0.1, 0.5
    server.script("PATCH", "upload", Fault(hang_after=512 * KiB, stall=10.0), times=1)
    server.scripted.insert(0, ("PATCH", "upload", Fault()))
    server.scripted.insert(0, ("PATCH", "upload", Fault()))
    task = asyncio.create_task(sink.put_item("ds", item_of(big, name="big")))
    try:
        for _ in range(200):
            if server.uploads and next(iter(server.uploads.values())).offset >= 2 * MiB + 512 * KiB:
                break
            await asyncio.sleep(0.02)
        await server.stop()
        await asyncio.sleep(0.3)
        await server.start()
        await asyncio.wait_for(task, 30)
    finally:
        await sink.close()
    assert server.blobs[digest_of(big)] == data
    assert server.requests[("POST", "uploads")] == 1
    assert server.bytes_received < 1.5 * len(data)


# --- memory ------------------------------------------------------------------------------


@pytest.mark.parametrize("resumable", [True, False])
async def test_streaming_a_200mb_file_keeps_memory_small(resumable: bool, tmp_path: Path) -> None:
    server = FakeIngestServer(keep_bytes=False)  # the server side shares this process
    await server.start()
    block = os.urandom(MiB)
    big = tmp_path / "big.bin"
    with open(big, "wb") as fh:
        for i in range(200):
            fh.write(block[i:] + block[:i])
    item = item_of(big)
    sink = make_sink(server, resumable_threshold=(64 << 20) if resumable else 1 << 40)
    gc.collect()
    tracemalloc.start()
    try:
        await sink.put_item("ds", item)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await sink.close()
        await server.stop()
    assert server.blob_sizes[item.slots[0].files[0].digest] == 200 * MiB
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB"
