"""Sinks take files as streams (bucket objects copied without a local copy) and as
remote references (registered objects): the local store, the memory double, the http
sink against a fault-injecting server, and `ingestd serve` itself."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ingestd.core.errors import SourceChangedError
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
from ingestd.sinks.http import HttpSink
from ingestd.sinks.local import LocalSink
from ingestd.sinks.memory import MemorySink
from ingestd.store import Store

from tests.support.fake_ingest_server import FakeIngestServer, Fault
from tests.support.server_app import item_url, running

KiB, MiB = 1 << 10, 1 << 20
TOKEN = "tok-streamed-5e1"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Source:
    """An opener over bytes that counts how often it was opened."""

    where = "s3://bkt/obj.bin"

    def __init__(self, data: bytes, chunk: int = 256 * KiB) -> None:
        self.data = data
        self.chunk = chunk
        self.opened = 0

    def __call__(self) -> AsyncIterator[bytes]:
        self.opened += 1
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), self.chunk):
            yield self.data[i : i + self.chunk]


def streamed(data: bytes, digest: str | None = None, name: str = "obj.bin") -> FilePayload:
    return FilePayload(name, "", len(data), digest or sha(data), etag="e1", opener=Source(data))


def reference(name: str = "ref.jpg") -> FilePayload:
    return FilePayload(name, "", 42, "", url=f"s3://bkt/{name}", etag="e2")


def item(*files: FilePayload, name: str = "item") -> ItemPayload:
    slots = tuple(SlotPayload(str(i), "file", (f,)) for i, f in enumerate(files))
    return ItemPayload("/", name, slots, {})


REF = {"name": "ref.jpg", "url": "s3://bkt/ref.jpg", "size": 42, "etag": "e2"}


async def test_local_sink_writes_streams_and_keeps_references(tmp_path: Path) -> None:
    data = os.urandom(700 * KiB)
    sink = LocalSink(tmp_path / "store")
    try:
        await sink.put_item("ds", item(streamed(data), reference()))
        # A stream whose bytes are not what was hashed is a changed source.
        with pytest.raises(SourceChangedError, match=r"obj\.bin changed after it was hashed"):
            await sink.put_item("ds", item(streamed(b"other", sha(b"expected")), name="bad"))
        # A blob the store holds is not streamed again.
        again = streamed(data)
        await sink.put_item("ds", item(again, name="again"))
        assert again.opener.opened == 0  # type: ignore[union-attr]
    finally:
        await sink.close()
    with Store.open(tmp_path / "store") as s:
        stored = s.catalog.get_item("ds", "/", "item")
        assert stored is not None
        files = [sl["files"][0] for sl in stored["slots"]]
        assert files == [{"name": "obj.bin", "digest": sha(data), "size": len(data)}, REF]
        assert s.blobs.path(sha(data)).read_bytes() == data
        assert s.catalog.get_item("ds", "/", "bad") is None
        assert sorted(s.blobs.digests()) == [sha(data)]


async def test_memory_sink_reads_streams_and_keeps_references() -> None:
    sink = MemorySink()
    await sink.put_item("ds", item(streamed(b"abc"), reference()))
    files = [sl["files"][0] for sl in sink.items[("ds", "/item")]["slots"]]
    assert files == [{"name": "obj.bin", "digest": sha(b"abc"), "size": 3}, REF]
    assert sink.blobs == {sha(b"abc"): b"abc"}
    with pytest.raises(SourceChangedError):
        await sink.put_item("ds", item(streamed(b"abd", sha(b"abc"))))


@pytest.fixture
async def server() -> AsyncIterator[FakeIngestServer]:
    s = FakeIngestServer(tokens={TOKEN})
    await s.start()
    yield s
    await s.stop()


def http_sink(server: FakeIngestServer, **kw: Any) -> HttpSink:
    sink = HttpSink(server.url, TOKEN, **kw)
    sink.backoff_base, sink.backoff_cap = 0.01, 1.0
    return sink


@pytest.mark.parametrize("size", [10 * KiB, 3 * MiB])
async def test_http_sink_streams_small_and_large_objects(
    server: FakeIngestServer, size: int
) -> None:
    data = os.urandom(size)
    sink = http_sink(server)
    try:
        await sink.put_item("ds", item(streamed(data), reference()))
    finally:
        await sink.close()
    stored = server.items["ds"]["/item"]
    assert [sl["files"][0] for sl in stored["slots"]][1] == REF
    assert server.blobs[sha(data)] == data


async def test_http_sink_resumes_a_streamed_upload_from_one_stream_per_attempt(
    server: FakeIngestServer,
) -> None:
    data = os.urandom(5 * MiB)
    sink = http_sink(server, resumable_threshold=256 * KiB, chunk_size=1 * MiB)
    f = streamed(data)
    # The second PATCH is cut part-way: the next attempt resumes from the server's offset.
    server.scripted.append(("PATCH", "upload", Fault()))
    server.script("PATCH", "upload", Fault(cut_after=300_000))
    try:
        await sink.put_item("ds", item(f))
    finally:
        await sink.close()
    assert server.blobs[sha(data)] == data
    assert server.requests[("POST", "uploads")] == 1
    # One GET for the whole upload: the cut chunk is sent again from memory, and a
    # stream is never read once per chunk.
    assert f.opener.opened == 1  # type: ignore[union-attr]
    assert server.bytes_received < 1.5 * len(data)


async def test_http_sink_reports_a_stream_that_differs_from_its_digest(
    server: FakeIngestServer,
) -> None:
    sink = http_sink(server)
    try:
        with pytest.raises(SourceChangedError, match=r"s3://bkt/obj\.bin changed"):
            await sink.put_item("ds", item(streamed(b"x" * 5000, sha(b"y" * 5000))))
    finally:
        await sink.close()


async def test_ingestd_serve_stores_and_lists_references(tmp_path: Path) -> None:
    store = tmp_path / "store"
    async with running(store) as srv:
        slots = [{"name": "0", "type": "image", "files": [REF]}]
        status, body, _ = await srv.call("PUT", item_url("ds", "a.jpg"), json={"slots": slots})
        assert status == 201, body
        _, listed, _ = await srv.call("GET", "/v1/datasets/ds/items")
        assert listed["items"][0]["slots"] == slots
        bad = [{"name": "0", "type": "image", "files": [{**REF, "size": -1}]}]
        status, body, _ = await srv.call("PUT", item_url("ds", "b.jpg"), json={"slots": bad})
        assert status == 400 and body["code"] == "bad_manifest" and "size" in body["error"]
