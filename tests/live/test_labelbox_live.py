"""The `labelbox` sink against the real Labelbox service. Skipped unless LABELBOX_API_KEY
is set; LABELBOX_BASE_URL overrides the API root, and LABELBOX_LIVE_IMAGE_URL (an
https://, s3:// or gs:// image the organisation can read) enables the registered-URL
test.

Each test fills a uniquely named dataset and deletes its rows and the dataset
afterwards. Metadata uses the reserved `tag` field and one custom field named
`ingestd_live_note` (created once if missing; free plans allow 5 custom fields). The
flows are those of tests/unit/test_labelbox_sink.py: a single image, a multi-slot
item, a channels item, a DICOM series, a frame sequence, a metadata change that
removes a key, a content change, a deletion and a re-put that must not duplicate.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from ingestd.config import LabelboxBackend
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
from ingestd.sinks.labelbox import LabelboxSink, global_key
from PIL import Image

pytestmark = pytest.mark.skipif(
    not os.environ.get("LABELBOX_API_KEY"), reason="LABELBOX_API_KEY is not set"
)

MR700 = (
    Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892003" / "MR700"
)
NOTE = "ingestd_live_note"

Q_ROW = """query GetDataRowPyApi($id: ID!) {
  dataRow(where: {id: $id}) {
    id externalId globalKey rowData
    metadataFields { schemaId name value kind }
    attachments { type value name }
  }
}"""
M_DELETE_DATASET = """mutation deleteDatasetPyApi($datasetId: ID!) {
  updateDataset(where: {id: $datasetId}, data: {deleted: true}) { id }
}"""


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


class Live:
    def __init__(self, sink: LabelboxSink, dataset: str) -> None:
        self.sink = sink
        self.dataset = dataset
        self.keys: set[str] = set()

    async def put(self, item: ItemPayload) -> dict[str, Any]:
        self.keys.add(item.key)
        await self.sink.put_item(self.dataset, item)
        row = await self.row(item.key)
        assert row is not None, f"no row for {item.key}"
        return row

    async def ids(self, keys: list[str]) -> list[str]:
        gks = [global_key(self.dataset, k) for k in keys]
        data = await self.sink._gql(
            "query q($k: [ID!]!) { dataRowsForGlobalKeys(where: {ids: $k}) { jobId } }",
            {"k": gks},
            "live lookup",
        )
        job = data["dataRowsForGlobalKeys"]["jobId"]
        for _ in range(60):
            res = (
                await self.sink._gql(
                    "query r($j: ID!) { dataRowsForGlobalKeysResult(jobId: {id: $j}) "
                    "{ data { fetchedDataRows { id } } jobStatus } }",
                    {"j": job},
                    "live lookup",
                )
            )["dataRowsForGlobalKeysResult"]
            if res["jobStatus"] == "COMPLETE":
                return [r["id"] for r in res["data"]["fetchedDataRows"]]
            await asyncio.sleep(2)
        raise AssertionError("the global key lookup did not finish")

    async def row(self, key: str) -> dict[str, Any] | None:
        [rid] = await self.ids([key])
        if not rid:
            return None
        return (await self.sink._gql(Q_ROW, {"id": rid}, "live row"))["dataRow"]  # type: ignore[no-any-return]


def metadata(row: dict[str, Any]) -> dict[str, Any]:
    return {f["name"]: f["value"] for f in row.get("metadataFields") or []}


@pytest.fixture
async def live() -> AsyncIterator[Live]:
    backend = LabelboxBackend(
        kind="labelbox",
        api_key_env="LABELBOX_API_KEY",
        base_url=os.environ.get("LABELBOX_BASE_URL") or None,
    )
    sink = LabelboxSink(backend, workers=4)
    state = Live(sink, f"ingestd-live-{uuid.uuid4().hex[:10]}")
    await sink.ensure_dataset(state.dataset)
    try:
        yield state
    finally:
        for key in state.keys:
            path, _, name = key.rpartition("/")
            await sink.delete_item(state.dataset, path or "/", name)
        await sink._gql(
            M_DELETE_DATASET,
            {"datasetId": (await sink.dataset(state.dataset)).id},
            "deleting the live dataset",
        )
        await sink.close()


async def test_single_image_metadata_change_content_change_and_delete(
    live: Live, tmp_path: Path
) -> None:
    a = png(tmp_path / "a #1.png", (200, 0, 0))
    row = await live.put(image_item(a, tag="first", **{NOTE: "drop me"}))
    assert row["globalKey"] == global_key(live.dataset, "/live/a #1.png")
    assert row["externalId"] == "/live/a #1.png" and row["rowData"].startswith("https://")
    assert metadata(row) == {"tag": "first", NOTE: "drop me"}

    await live.sink.update_metadata(live.dataset, image_item(a, tag="second"), None)
    again = await live.row("/live/a #1.png")
    assert again is not None and again["id"] == row["id"]
    assert metadata(again) == {"tag": "second"}

    png(a, (0, 0, 200))
    changed = await live.put(image_item(a, tag="third"))
    assert changed["id"] == row["id"] and changed["rowData"] != row["rowData"]
    assert metadata(changed) == {"tag": "third"}

    await live.put(image_item(a, tag="third"))  # a re-put after a restart: same row
    assert (await live.ids(["/live/a #1.png"])) == [row["id"]]

    await live.sink.delete_item(live.dataset, "/live", "a #1.png")
    assert await live.row("/live/a #1.png") is None


async def test_multi_slot_channels_dicom_and_frames(live: Live, tmp_path: Path) -> None:
    views = [fp(png(tmp_path / f"v{i}.png", (i * 80, 0, 0))) for i in range(3)]
    layout = {"type": "grid", "columns": 2, "rows": [[["0"], ["1"]], [["2"]]]}
    slots = tuple(
        SlotPayload(str(i), "image", (f,), {"layout": layout} if i == 0 else {})
        for i, f in enumerate(views)
    )
    row = await live.put(ItemPayload("/live", "views", slots, {}))
    assert [a["type"] for a in row["attachments"]] == ["IMAGE", "IMAGE"]

    names = ["b.png", "g.png", "r.png"]
    chans = [fp(png(tmp_path / n, (0, 0, i * 80))) for i, n in enumerate(names)]
    cell = {"type": "grid", "columns": 1, "rows": [[names]]}
    slots = tuple(
        SlotPayload(n, "image", (f,), {"layout": cell} if i == 0 else {})
        for i, (n, f) in enumerate(zip(names, chans, strict=True))
    )
    row = await live.put(ItemPayload("/live", "cells", slots, {}))
    assert [a["type"] for a in row["attachments"]] == ["IMAGE_OVERLAY", "IMAGE_OVERLAY"]

    series = sorted(MR700.iterdir())[:3]
    slot = SlotPayload("mr", "dicom", tuple(fp(p) for p in series))
    row = await live.put(ItemPayload("/live", "mr", (slot,), {}))
    assert len(row["attachments"]) == 2

    frames = [fp(png(tmp_path / f"frame_{i:06d}.png", (i * 50, 50, 50))) for i in range(3)]
    slot = SlotPayload("0", "frames", tuple(frames), {"timestamps": [0.0, 1.0, 2.0], "fps": 1})
    row = await live.put(ItemPayload("/live", "clip.mp4", (slot,), {}))
    assert [a["type"] for a in row["attachments"]] == ["IMAGE", "IMAGE"]


@pytest.mark.skipif(
    not os.environ.get("LABELBOX_LIVE_IMAGE_URL"), reason="LABELBOX_LIVE_IMAGE_URL is not set"
)
async def test_a_registered_url(live: Live) -> None:
    url = os.environ["LABELBOX_LIVE_IMAGE_URL"]
    remote = FilePayload(url.rsplit("/", 1)[-1], "", 0, "", url=url)
    row = await live.put(
        ItemPayload("/live", "remote", (SlotPayload("0", "image", (remote,)),), {})
    )
    assert row["rowData"].startswith("https://")
