"""The `nucleus` sink against the real Scale Nucleus service. Skipped unless
NUCLEUS_API_KEY is set; NUCLEUS_BASE_URL overrides the API root, and
NUCLEUS_LIVE_IMAGE_URL (an s3://, gs:// or https:// image Nucleus may read) enables the
remote-URL test.

Each test fills a uniquely named dataset and deletes it afterwards. The flows are
those of tests/unit/test_nucleus_sink.py: a single image, a multi-slot item, a
channels item, a frame sequence, a metadata change (merge and removal), a content
change, a deletion, a refused DICOM series, a re-put that must not duplicate, and a
group put twice (as a restarted daemon would).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ingestd.config import NucleusBackend
from ingestd.core.errors import PermanentError
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
from ingestd.sinks.base import BatchItem
from ingestd.sinks.nucleus import NucleusSink
from PIL import Image

pytestmark = pytest.mark.skipif(
    not os.environ.get("NUCLEUS_API_KEY"), reason="NUCLEUS_API_KEY is not set"
)


def png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG")
    return path


def fp(path: Path) -> FilePayload:
    data = path.read_bytes()
    return FilePayload(
        path.name, str(path), len(data), "sha256:" + hashlib.sha256(data).hexdigest()
    )


def image_item(path: Path, **md: Any) -> ItemPayload:
    return ItemPayload("/live", path.name, (SlotPayload("0", "image", (fp(path),)),), md)


@pytest.fixture
async def live() -> AsyncIterator[tuple[NucleusSink, str]]:
    backend = NucleusBackend(
        kind="nucleus",
        api_key_env="NUCLEUS_API_KEY",
        base_url=os.environ.get("NUCLEUS_BASE_URL") or None,
    )
    sink = NucleusSink(backend, workers=4)
    name = f"ingestd-live-{uuid.uuid4().hex[:10]}"
    await sink.ensure_dataset(name)
    try:
        yield sink, name
    finally:
        ds = sink.datasets.peek(name) or await sink._find(name)
        if ds is not None:
            await sink.client.request("DELETE", sink._url("dataset", ds), what="cleaning up")
        await sink.close()


async def held(sink: NucleusSink, dataset: str, ref: str) -> dict[str, Any] | None:
    ds = await sink.datasets.get(dataset)
    return await sink._get_item(ds, ref)


async def test_single_image_change_metadata_and_delete(
    live: tuple[NucleusSink, str], tmp_path: Path
) -> None:
    sink, name = live
    img = png(tmp_path / "a.png", (200, 0, 0))
    await sink.put_item(name, image_item(img, camera="north", lap=1))
    item = await held(sink, name, "/live/a.png")
    assert item is not None and item["metadata"] == {"camera": "north", "lap": 1}

    await sink.update_metadata(name, image_item(img, camera="south", lap=2), "/live/a.png")
    item = await held(sink, name, "/live/a.png")
    assert item is not None and item["metadata"] == {"camera": "south", "lap": 2}

    await sink.update_metadata(name, image_item(img, camera="south"), "/live/a.png")
    item = await held(sink, name, "/live/a.png")
    assert item is not None and item["metadata"] == {"camera": "south"}

    png(img, (0, 0, 200))  # content change; re-put twice: never a duplicate
    await sink.put_item(name, image_item(img, camera="east"))
    await sink.put_item(name, image_item(img, camera="east"))
    item = await held(sink, name, "/live/a.png")
    assert item is not None and item["metadata"] == {"camera": "east"}

    await sink.delete_item(name, "/live", "a.png")
    assert await held(sink, name, "/live/a.png") is None


async def test_groups_and_frames(live: tuple[NucleusSink, str], tmp_path: Path) -> None:
    sink, name = live
    views = [png(tmp_path / "g" / f"{i}.png", (i * 60, 0, 0)) for i in range(3)]
    slots = tuple(
        SlotPayload(str(i), "image", (fp(v),), {"layout": {"type": "grid"}} if i == 0 else {})
        for i, v in enumerate(views)
    )
    await sink.put_item(name, ItemPayload("/live", "grid", slots, {"k": "v"}))
    anchor = await held(sink, name, "/live/grid")
    assert anchor is not None
    assert anchor["metadata"]["ingestd_parts"] == ["/live/grid#1", "/live/grid#2"]
    assert await held(sink, name, "/live/grid#2") is not None

    frames = [png(tmp_path / "f" / f"frame_{i:06d}.png", (0, i * 40, 0)) for i in range(3)]
    slot = SlotPayload("0", "frames", tuple(fp(f) for f in frames), {"timestamps": [0.0, 1.0, 2.0]})
    await sink.put_item(name, ItemPayload("/live", "clip.mp4", (slot,), {}))
    part = await held(sink, name, "/live/clip.mp4#0/frame_000002.png")
    assert part is not None and part["metadata"]["ingestd_time"] == 2.0

    await sink.delete_item(name, "/live", "grid")
    assert await held(sink, name, "/live/grid") is None
    assert await held(sink, name, "/live/grid#1") is None


async def test_dicom_is_refused(live: tuple[NucleusSink, str], tmp_path: Path) -> None:
    sink, name = live
    f = tmp_path / "x.dcm"
    f.write_bytes(b"\0" * 128 + b"DICM" + bytes(16))
    item = ItemPayload("/live", "ct", (SlotPayload("ct", "dicom", (fp(f),)),), {})
    with pytest.raises(PermanentError, match="DICOM"):
        await sink.put_item(name, item)


async def test_a_group_and_its_restarted_re_put(
    live: tuple[NucleusSink, str], tmp_path: Path
) -> None:
    """A group from the backlog (appends of 10, the jobs awaited together), then the
    same group from a sink that never saw it (a restart before the ledger recorded it):
    every image once, no error."""
    sink, name = live
    items = [image_item(png(tmp_path / f"{i:02d}.png", (i * 9, 0, 0)), n=i) for i in range(23)]
    first = await sink.put_items([BatchItem(name, it) for it in items])
    assert [r for r in first if isinstance(r, Exception)] == []
    again = await sink.put_items([BatchItem(name, it) for it in items])
    assert [r for r in again if isinstance(r, Exception)] == []
    for it in (items[0], items[22]):
        held_item = await held(sink, name, it.key)
        assert held_item is not None and held_item["metadata"] == it.metadata


@pytest.mark.skipif(
    not os.environ.get("NUCLEUS_LIVE_IMAGE_URL"), reason="NUCLEUS_LIVE_IMAGE_URL is not set"
)
async def test_remote_url_through_an_import_job(live: tuple[NucleusSink, str]) -> None:
    sink, name = live
    url = os.environ["NUCLEUS_LIVE_IMAGE_URL"]
    f = FilePayload(url.rsplit("/", 1)[-1], "", 0, "", url=url)
    await sink.put_item(
        name, ItemPayload("/live", "remote", (SlotPayload("0", "image", (f,)),), {"r": 1})
    )
    item = await held(sink, name, "/live/remote")
    assert item is not None and item["metadata"] == {"r": 1}
