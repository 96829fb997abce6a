"""The in-memory test double behaves like a real sink where the sync step relies on it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from ingestd.core.errors import PermanentError, RetriableError, SourceChangedError
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
from ingestd.sinks.base import Capabilities, Sink
from ingestd.sinks.memory import MemorySink


def item_of(src: Path, name: str = "item", **metadata: object) -> ItemPayload:
    data = src.read_bytes()
    f = FilePayload(src.name, str(src), len(data), "sha256:" + hashlib.sha256(data).hexdigest())
    return ItemPayload("/", name, (SlotPayload("0", "image", (f,)),), dict(metadata))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    p = tmp_path / "a.png"
    p.write_bytes(b"pixels")
    return p


async def test_put_is_idempotent_and_versions_updates(src: Path) -> None:
    sink = MemorySink()
    assert isinstance(sink, Sink)
    await sink.ensure_dataset("ds")
    first = await sink.put_item("ds", item_of(src, tag="a"))
    again = await sink.put_item("ds", item_of(src, tag="a"))
    updated = await sink.put_item("ds", item_of(src, tag="b"))
    assert (first.version, first.changed) == (1, True)
    assert (again.version, again.changed) == (1, False)
    assert (updated.version, updated.changed) == (2, True)
    stored = sink.items[("ds", "/item")]
    assert stored["metadata"] == {"tag": "b"} and stored["version"] == 2
    assert stored["slots"][0]["files"][0]["size"] == 6
    assert sink.blobs == {"sha256:" + hashlib.sha256(b"pixels").hexdigest(): b"pixels"}
    await sink.delete_item("ds", "/", "item")
    await sink.close()
    assert sink.items == {} and sink.closed
    assert sink.calls == [
        ("ensure_dataset", "ds"),
        ("put_item", "ds", "/item"),
        ("put_item", "ds", "/item"),
        ("put_item", "ds", "/item"),
        ("delete_item", "ds", "/item"),
        ("close",),
    ]


async def test_scripted_failures(src: Path) -> None:
    sink = MemorySink()
    sink.fail_next(2, RetriableError("server busy", retry_after=3))
    for _ in range(2):
        with pytest.raises(RetriableError, match="server busy"):
            await sink.put_item("ds", item_of(src))
    assert (await sink.put_item("ds", item_of(src))).version == 1
    assert len(sink.calls) == 3  # failed calls are recorded too

    sink.fail_next(1, PermanentError("rejected"))
    with pytest.raises(PermanentError):
        await sink.delete_item("ds", "/", "item")
    assert ("ds", "/item") in sink.items
    await sink.delete_item("ds", "/", "item")
    assert sink.items == {}


async def test_changed_and_vanished_files(src: Path) -> None:
    sink = MemorySink()
    item = item_of(src)
    src.write_bytes(b"other pixels")
    with pytest.raises(SourceChangedError, match="changed after it was hashed"):
        await sink.put_item("ds", item)
    src.unlink()
    with pytest.raises(SourceChangedError, match="vanished"):
        await sink.put_item("ds", item)
    assert sink.items == {} and sink.blobs == {}


async def test_capabilities_are_configurable(src: Path) -> None:
    sink = MemorySink(Capabilities(remote_urls=True))
    assert sink.capabilities.remote_urls and not sink.capabilities.delete
    await sink.put_item("ds", item_of(src))
    with pytest.raises(PermanentError, match="cannot delete"):
        await sink.delete_item("ds", "/", "item")
