"""The darwin sink against the real V7 service. Skipped unless V7_API_KEY is set.

Environment: V7_API_KEY (a key with upload, archive and delete rights), V7_TEAM (the
team slug), optionally V7_BASE_URL, and for the external-storage test V7_STORAGE_SLUG
plus V7_STORAGE_URL, the s3://, gs:// or az:// URL of one image already in that
storage. Every test works in a uniquely named dataset and archives it afterwards.

These tests also settle what the fake could only assume from documentation: that a
series ZIP and a frames AVI are accepted, that an archived item frees its name, that
the lookup filters answer as the sink expects. Run them with
`V7_API_KEY=... V7_TEAM=... pytest tests/live/test_darwin_live.py -v`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from ingestd.config import DarwinBackend
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
from ingestd.plan.groups import LAYOUT_KEY
from ingestd.sinks.darwin import DarwinSink
from ingestd.sinks.darwin.api import Found, key_of
from PIL import Image

pytestmark = pytest.mark.skipif(
    not os.environ.get("V7_API_KEY"), reason="V7_API_KEY is not set (live V7 tests)"
)

CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


def file_of(path: Path) -> FilePayload:
    data = path.read_bytes()
    return FilePayload(
        path.name, str(path), len(data), "sha256:" + hashlib.sha256(data).hexdigest()
    )


def png(path: Path, color: tuple[int, int, int], size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


@pytest.fixture
async def live() -> AsyncIterator[tuple[DarwinSink, str]]:
    team = os.environ.get("V7_TEAM")
    if not team:
        pytest.skip("V7_TEAM is not set")
    cfg = DarwinBackend.model_validate(
        {
            "kind": "darwin",
            "team": team,
            "api_key_env": "V7_API_KEY",
            "base_url": os.environ.get("V7_BASE_URL") or None,
            "storage_slug": os.environ.get("V7_STORAGE_SLUG") or None,
        }
    )
    sink = DarwinSink(cfg, workers=4)
    dataset = f"ingestd-live-{secrets.token_hex(4)}"
    await sink.ensure_dataset(dataset)
    try:
        yield sink, dataset
    finally:
        ds = await sink._datasets.get(dataset)
        await sink.v7.api.request(
            "PUT", f"{sink.v7.base}/datasets/{ds.id}/archive", what="archiving", json_body={}
        )
        await sink.close()


async def find(sink: DarwinSink, dataset: str, path: str, name: str) -> Found:
    ds = await sink._datasets.get(dataset)
    k = key_of(path, name)
    return (await sink.v7.find(ds, [k]))[k]


async def wait_processed(sink: DarwinSink, dataset: str, path: str, name: str) -> dict[str, Any]:
    deadline = time.monotonic() + 300
    while True:
        found = await find(sink, dataset, path, name)
        assert len(found.live) == 1, found
        item = found.live[0]
        if item.get("status") not in ("uploading", "processing"):
            assert item.get("status") != "error", item
            return item
        assert time.monotonic() < deadline, f"{path}/{name} still {item.get('status')}"
        await asyncio.sleep(3)


async def test_items_of_every_kind(live: tuple[DarwinSink, str], tmp_path: Path) -> None:
    sink, ds = live
    # single image
    cat = png(tmp_path / "cat.png", (200, 0, 0))
    single = ItemPayload("/single", "cat.png", (SlotPayload("0", "image", (file_of(cat),)),), {})
    first = await sink.put_item(ds, single)
    assert first.changed
    # multi-slot with layout
    views = [png(tmp_path / "rig" / f"{i}.png", (0, 40 * i, 0)) for i in range(5)]
    hint = {"type": "grid", "rows": [[["0"], ["1"], ["2"]], [["3"], ["4"]]]}
    slots = tuple(
        SlotPayload(str(i), "image", (file_of(p),), {LAYOUT_KEY: hint} if i == 0 else {})
        for i, p in enumerate(views)
    )
    await sink.put_item(ds, ItemPayload("/rigs", "scan1", slots, {}))
    # channels
    chans = [png(tmp_path / "well" / f"{c}.png", (9, 9, 9)) for c in "rgb"]
    names = [p.name for p in chans]
    chint = {"type": "grid", "columns": 1, "rows": [[names]]}
    cslots = tuple(
        SlotPayload(p.name, "image", (file_of(p),), {LAYOUT_KEY: chint} if i == 0 else {})
        for i, p in enumerate(chans)
    )
    await sink.put_item(ds, ItemPayload("/cells", "well1", cslots, {}))
    # DICOM series
    series_dir = tmp_path / "s1"
    series_dir.mkdir()
    slices = []
    for src in sorted(CT5N.iterdir()):
        slices.append(Path(shutil.copyfile(src, series_dir / f"{src.name}.dcm")))
    series = SlotPayload("s1", "dicom", tuple(file_of(p) for p in slices))
    await sink.put_item(ds, ItemPayload("/ct", "s1", (series,), {}))
    # sampled frames as one AVI
    frames = []
    for i in range(6):
        p = tmp_path / "frames" / f"frame_{i:06d}.jpg"
        p.parent.mkdir(exist_ok=True)
        Image.new("RGB", (64, 48), (40 * i, 0, 255 - 40 * i)).save(p, quality=90)
        frames.append(p)
    fslot = SlotPayload(
        "0",
        "frames",
        tuple(file_of(p) for p in frames),
        {"fps": 2.0, "timestamps": [i / 2 for i in range(6)], "source": "clip.mp4"},
    )
    await sink.put_item(ds, ItemPayload("/clips", "clip.mp4", (fslot,), {}))
    # native video with fps
    video = tmp_path / "run.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (64, 48))
    for i in range(20):
        writer.write(np.full((48, 64, 3), i * 10, np.uint8))
    writer.release()
    vslot = SlotPayload("0", "video", (file_of(video),), {"fps": 5.0})
    await sink.put_item(ds, ItemPayload("/clips", "run.mp4", (vslot,), {}))

    got = await wait_processed(sink, ds, "/single", "cat.png")
    assert got["id"] == first.backend_id
    scan = await wait_processed(sink, ds, "/rigs", "scan1")
    assert sorted(s["slot_name"] for s in scan["slots"]) == ["0", "1", "2", "3", "4"]
    well = await wait_processed(sink, ds, "/cells", "well1")
    assert sorted(s["slot_name"] for s in well["slots"]) == sorted(names)
    ct = await wait_processed(sink, ds, "/ct", "s1")
    assert [s["slot_name"] for s in ct["slots"]] == ["s1"]
    clip = await wait_processed(sink, ds, "/clips", "clip.mp4")
    assert [s.get("type") for s in clip["slots"]] == ["video"]
    await wait_processed(sink, ds, "/clips", "run.mp4")

    # metadata-only change and a fresh sink's restart: adopted, nothing sent
    again = await sink.put_item(ds, ItemPayload(single.path, single.name, single.slots, {"k": 1}))
    assert (again.backend_id, again.changed) == (first.backend_id, False)
    # content change: archived and registered again
    png(cat, (0, 0, 200), size=96)
    changed = await sink.put_item(
        ds, ItemPayload("/single", "cat.png", (SlotPayload("0", "image", (file_of(cat),)),), {})
    )
    assert changed.changed and changed.backend_id != first.backend_id
    await wait_processed(sink, ds, "/single", "cat.png")
    found = await find(sink, ds, "/single", "cat.png")
    assert [i["id"] for i in found.live] == [changed.backend_id]
    # deletion
    await sink.delete_item(ds, "/clips", "run.mp4")
    found = await find(sink, ds, "/clips", "run.mp4")
    assert found.live == []


async def test_external_storage_item(live: tuple[DarwinSink, str]) -> None:
    sink, ds = live
    url = os.environ.get("V7_STORAGE_URL")
    if not url or not sink.storage_slug:
        pytest.skip("V7_STORAGE_SLUG and V7_STORAGE_URL are not set")
    name = url.rsplit("/", 1)[-1]
    f = FilePayload(name, "", 0, "", url=url)
    item = ItemPayload("/ext", name, (SlotPayload("0", "image", (f,)),), {})
    first = await sink.put_item(ds, item)
    assert first.changed
    await wait_processed(sink, ds, "/ext", name)
    again = await sink.put_item(ds, item)
    assert (again.backend_id, again.changed) == (first.backend_id, False)


async def test_a_group_and_its_restart(live: tuple[DarwinSink, str], tmp_path: Path) -> None:
    """One register_upload for a group, then the same group from a restarted sink
    (refused as ALREADY_EXISTS, looked up by many `item_names[]` at once, kept), then
    with the ledger's manifests (one lookup, nothing sent). Settles that V7 accepts
    many items a registration and answers a lookup of many names."""
    from ingestd.sinks.base import BatchItem

    sink, ds = live
    items = [
        ItemPayload(
            "/group",
            f"g{i}.png",
            (SlotPayload("0", "image", (file_of(png(tmp_path / f"g{i}.png", (i, 9, 9))),)),),
            {},
        )
        for i in range(5)
    ]
    first = await sink.put_items([BatchItem(ds, it) for it in items])
    assert all(not isinstance(r, Exception) and r.changed for r in first), first
    for it in items:
        await wait_processed(sink, ds, it.path, it.name)
    again = await sink.put_items([BatchItem(ds, it) for it in items])
    assert [getattr(r, "backend_id", r) for r in again] == [r.backend_id for r in first]  # type: ignore[union-attr]
    synced = await sink.put_items([BatchItem(ds, it, it.manifest()) for it in items])
    assert all(not isinstance(r, Exception) and not r.changed for r in synced), synced
