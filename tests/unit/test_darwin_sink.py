"""The V7 Darwin sink against the fake V7 API (tests/support/fakes/darwin.py) on loopback.

Each test ends by reading the fake's remote state: which items exist (archived ones
too), their slots, layouts and the bytes each upload stored; the request-floor tests
count the API requests the fake answered."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cv2
import pytest
import structlog
from ingestd.config import DarwinBackend
from ingestd.core.errors import PermanentError, RetriableError, SourceChangedError
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
from ingestd.plan.groups import LAYOUT_KEY
from ingestd.sinks.base import BatchItem, BatchPutter, Sink
from ingestd.sinks.darwin import DarwinSink, slots_layout, slugify, storage_key
from ingestd.sinks.darwin.calls import v7_rule
from ingestd.sinks.kit.client import Answer
from PIL import Image

from tests.support.fakes.darwin import API_KEY, STORAGE, TEAM, FakeDarwin

KEY_ENV = "INGESTD_TEST_V7_KEY"
DS = "Test Photos"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_of(path: Path, name: str | None = None) -> FilePayload:
    data = path.read_bytes()
    return FilePayload(name or path.name, str(path), len(data), digest_of(data))


def image(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def single(path: Path, *, folder: str = "/", **metadata: Any) -> ItemPayload:
    return ItemPayload(folder, path.name, (SlotPayload("0", "image", (file_of(path),)),), metadata)


def lookups(fake: FakeDarwin) -> list[Any]:
    """The item listings (`GET .../items`) the fake answered."""
    return [c for c in fake.api_calls("GET") if c.path.endswith("/items")]


@pytest.fixture
async def fake() -> AsyncIterator[FakeDarwin]:
    f = FakeDarwin()
    await f.start()
    yield f
    await f.stop()


def backend(fake: FakeDarwin, **kw: Any) -> DarwinBackend:
    return DarwinBackend.model_validate(
        {
            "kind": "darwin",
            "team": TEAM,
            "api_key_env": KEY_ENV,
            "base_url": fake.url,
            **kw,
        },
        context={"check_paths": False},
    )


def make_sink(fake: FakeDarwin, **kw: Any) -> DarwinSink:
    sink = DarwinSink(backend(fake, **kw), workers=4)
    # Fast backoff so failure paths take milliseconds; the shape is what is tested.
    for client in (sink.v7.api, sink.v7.storage):
        client.backoff_base = 0.01
        client.backoff_cap = 2.0
    return sink


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    return API_KEY


@pytest.fixture
async def sink(fake: FakeDarwin) -> AsyncIterator[DarwinSink]:
    s = make_sink(fake)
    yield s
    await s.close()


# --- the basics --------------------------------------------------------------------------


async def test_implements_the_sink_interface(sink: DarwinSink) -> None:
    assert isinstance(sink, Sink) and isinstance(sink, BatchPutter)
    caps = sink.capabilities
    assert caps.delete and caps.metadata_update is False
    assert caps.batch is not None and caps.batch.items == 500  # one register_upload


async def test_bucket_objects_are_registered_only_with_an_external_storage(
    fake: FakeDarwin,
) -> None:
    """Without backend.storage_slug V7 cannot register bucket objects, so the sink does
    not offer remote URLs and `transfer` defaults to copy instead of failing every item."""
    plain, connected = make_sink(fake), make_sink(fake, storage_slug="lab-bucket")
    try:
        assert not plain.capabilities.remote_urls
        assert connected.capabilities.remote_urls
    finally:
        await plain.close()
        await connected.close()


async def test_dataset_is_created_once_and_found_by_slug(
    sink: DarwinSink, fake: FakeDarwin
) -> None:
    await sink.ensure_dataset(DS)
    await sink.ensure_dataset(DS)
    d = fake.dataset(DS)
    assert d is not None and d["slug"] == "test-photos" == slugify(DS)
    assert len(fake.api_calls("POST", "/datasets")) == 1
    # A fresh sink finds the existing dataset by its slug instead of creating another.
    other = make_sink(fake)
    try:
        await other.ensure_dataset(DS)
    finally:
        await other.close()
    assert len(fake.api_calls("POST", "/datasets")) == 1


async def test_dataset_created_meanwhile_is_looked_up_again(
    sink: DarwinSink, fake: FakeDarwin
) -> None:
    # The first listing misses it; the create answers 422 "has already been taken".
    orig = fake._list_datasets
    calls = 0

    def late() -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            fake.add_dataset("test photos")  # slugs the same
            from aiohttp import web

            return web.json_response([])
        return orig()

    fake._list_datasets = late  # type: ignore[method-assign]
    await sink.ensure_dataset(DS)
    assert [d["slug"] for d in [fake.dataset(DS)] if d] == ["test-photos"]
    assert [c.status for c in fake.api_calls("POST", "/datasets")] == [422]


async def test_single_image(sink: DarwinSink, fake: FakeDarwin, tmp_path: Path) -> None:
    p = image(tmp_path / "cat.png")
    item = single(p, folder="/pets/cats", source="cam1")
    await sink.ensure_dataset(DS)
    result = await sink.put_item(DS, item)
    live = fake.live(DS)
    assert set(live) == {"/pets/cats/cat.png"}
    remote = live["/pets/cats/cat.png"]
    assert (result.backend_id, result.version, result.changed) == (remote["id"], 1, True)
    assert remote["status"] == "new"
    assert [s["slot_name"] for s in remote["slots"]] == ["0"]
    assert remote["slots"][0]["type"] == "image"
    assert fake.content(remote["id"], "0") == [("cat.png", p.read_bytes())]
    # The bytes went to the pre-signed URL without the key, with a length, unchunked.
    [put] = fake.puts
    assert put.status == 200
    assert "Authorization" not in put.headers
    assert put.headers["Content-Length"] == str(p.stat().st_size)
    assert "Transfer-Encoding" not in put.headers
    # register, sign, confirm: no lookup before registering a never-synced item
    routes = [c.path.rsplit("/", 1)[-1] for c in fake.calls if "/v2/" in c.path]
    assert routes == ["register_upload", "sign", "confirm"]


# --- layouts and multi-file items ----------------------------------------------------------


def _grid(*columns: list[int]) -> list[list[list[str]]]:
    return [[[str(i)] for i in column] for column in columns]


@pytest.mark.parametrize(
    ("n", "grid"),
    [
        # darwin-py's SLOTS_GRID_MAP (darwin/utils/utils.py): columns of cells, read by rows
        (2, _grid([0], [1])),
        (3, _grid([0], [1], [2])),
        (4, _grid([0, 2], [1, 3])),
        (5, _grid([0, 3], [1, 4], [2])),
        (7, _grid([0, 3, 6], [1, 4], [2, 5])),
        (10, _grid([0, 4, 8], [1, 5, 9], [2, 6], [3, 7])),
        (13, _grid([0, 4, 8, 12], [1, 5, 9], [2, 6, 10], [3, 7, 11])),
        (16, _grid([0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15])),
        (20, _grid([0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15])),
    ],
)
def test_slots_layout_is_darwin_pys(n: int, grid: list[list[list[str]]]) -> None:
    assert slots_layout([str(i) for i in range(n)]) == {"version": 3, "slots_grid": grid}


def test_one_slot_has_no_layout_and_channels_share_one_cell() -> None:
    assert slots_layout(["0"]) is None
    names = ["r.png", "g.png", "b.png"]
    hint = {"type": "grid", "columns": 1, "rows": [[names]]}
    assert slots_layout(names, hint) == {"version": 3, "slots_grid": [[names]]}
    many = [f"c{i}.png" for i in range(17)]
    with pytest.raises(PermanentError, match="at most 16 channels"):
        slots_layout(many, {"type": "grid", "columns": 1, "rows": [[many]]})


async def test_multi_slot_item_with_layout(
    sink: DarwinSink, fake: FakeDarwin, tmp_path: Path
) -> None:
    paths = [image(tmp_path / f"v{i}.png", (40 * i, 0, 0)) for i in range(5)]
    names = [str(i) for i in range(5)]
    hint = {"type": "grid", "columns": 3, "rows": [[["0"], ["1"], ["2"]], [["3"], ["4"]]]}
    slots = tuple(
        SlotPayload(n, "image", (file_of(p),), {LAYOUT_KEY: hint} if n == "0" else {})
        for n, p in zip(names, paths, strict=True)
    )
    await sink.put_item(DS, ItemPayload("/rigs", "scan1", slots, {}))
    remote = fake.live(DS)["/rigs/scan1"]
    assert [s["slot_name"] for s in remote["slots"]] == names
    assert remote["layout"] == {"version": 3, "slots_grid": _grid([0, 3], [1, 4], [2])}
    for n, p in zip(names, paths, strict=True):
        assert fake.content(remote["id"], n) == [(p.name, p.read_bytes())]
    assert remote["status"] == "new"


async def test_channels_item(sink: DarwinSink, fake: FakeDarwin, tmp_path: Path) -> None:
    paths = [
        image(tmp_path / f"{c}.png", rgb)
        for c, rgb in zip("rgb", [(255, 0, 0), (0, 255, 0), (0, 0, 255)], strict=True)
    ]
    names = [p.name for p in paths]
    hint = {"type": "grid", "columns": 1, "rows": [[names]]}
    slots = tuple(
        SlotPayload(p.name, "image", (file_of(p),), {LAYOUT_KEY: hint} if i == 0 else {})
        for i, p in enumerate(paths)
    )
    await sink.put_item(DS, ItemPayload("/", "cells", slots, {}))
    remote = fake.live(DS)["/cells"]
    assert [s["slot_name"] for s in remote["slots"]] == names
    assert remote["layout"] == {"version": 3, "slots_grid": [[names]]}
    assert fake.content(remote["id"], "g.png") == [("g.png", paths[1].read_bytes())]


async def test_dicom_series_is_one_slot_holding_a_zip_of_the_slices(
    sink: DarwinSink, fake: FakeDarwin, tmp_path: Path
) -> None:
    from pydicom.data import get_testdata_file

    ct = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    slices = []
    for i in range(3):
        p = tmp_path / "series1" / f"IM{i:04d}.dcm"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(ct + bytes([i]) * (i + 1))  # distinct, odd and even lengths
        slices.append(p)
    big = tmp_path / "series1" / "IM0003.dcm"  # several read blocks
    big.write_bytes(ct + os.urandom(5 << 19))
    slices.append(big)
    slot = SlotPayload("series1", "dicom", tuple(file_of(p) for p in slices))
    await sink.put_item(DS, ItemPayload("/ct", "series1", (slot,), {"Modality": "CT"}))
    remote = fake.live(DS)["/ct/series1"]
    assert [(s["slot_name"], s["type"]) for s in remote["slots"]] == [("series1", "dicom")]
    [(file_name, data)] = fake.content(remote["id"], "series1")
    assert file_name == "series1.dcm" and data is not None
    zf = zipfile.ZipFile(io.BytesIO(data))
    assert zf.testzip() is None
    assert zf.namelist() == [p.name for p in slices]
    for p in slices:
        assert zf.read(p.name) == p.read_bytes()
    assert remote["slots"][0]["size_bytes"] == len(data)


async def test_sampled_frames_become_one_video_at_the_sampling_rate(
    sink: DarwinSink, fake: FakeDarwin, tmp_path: Path
) -> None:
    frames = []
    for i in range(5):
        p = tmp_path / "spool" / f"frame_{i:06d}.jpg"
        p.parent.mkdir(exist_ok=True)
        Image.new("RGB", (32, 24), (50 * i, 255 - 50 * i, 0)).save(p, quality=90)
        frames.append(p)
    extra = {"timestamps": [i * 0.5 for i in range(5)], "fps": 2.0, "source": "clip.mp4"}
    slot = SlotPayload("0", "frames", tuple(file_of(p) for p in frames), extra)
    await sink.put_item(DS, ItemPayload("/", "clip.mp4", (slot,), {}))
    remote = fake.live(DS)["/clip.mp4"]
    [s] = remote["slots"]
    assert (s["slot_name"], s["type"], s["fps"], s["file_name"]) == ("0", "video", 2.0, "clip.avi")
    [(_, data)] = fake.content(remote["id"], "0")
    assert data is not None
    avi = tmp_path / "got.avi"
    avi.write_bytes(data)
    cap = cv2.VideoCapture(str(avi))
    try:
        assert cap.isOpened()
        assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(2.0)
        decoded = []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            decoded.append(frame)
    finally:
        cap.release()
    assert len(decoded) == 5
    assert decoded[0].shape == (24, 32, 3)
    # The frames are the JPEGs as they were: each decodes like its source file.
    for got, p in zip(decoded, frames, strict=True):
        want = cv2.imread(str(p))
        assert abs(got.astype(int) - want.astype(int)).max() <= 2


async def test_native_video_carries_its_fps(
    sink: DarwinSink, fake: FakeDarwin, tmp_path: Path
) -> None:
    p = tmp_path / "run.mp4"
    p.write_bytes(b"\0\0\0\x18ftypmp42" + bytes(200))
    slot = SlotPayload("0", "video", (file_of(p),), {"fps": 29.97})
    await sink.put_item(DS, ItemPayload("/", "run.mp4", (slot,), {}))
    [s] = fake.live(DS)["/run.mp4"]["slots"]
    assert (s["type"], s["fps"]) == ("video", 29.97)


# --- bucket objects (transfer: register) ---------------------------------------------------


def remote_file(url: str, size: int = 1234) -> FilePayload:
    return FilePayload(url.rsplit("/", 1)[-1], "", size, "", url=url, etag='"e1"')


def test_storage_key_strips_scheme_and_bucket() -> None:
    assert storage_key("s3://bucket/raw/a b.jpg") == "raw/a b.jpg"
    assert storage_key("gs://b/x/y/z.dcm") == "x/y/z.dcm"
    assert storage_key("az://container/p/q.png") == "p/q.png"
    with pytest.raises(PermanentError, match="transfer: copy"):
        storage_key("https://example.invalid/a.jpg")


async def test_bucket_item_is_registered_from_external_storage(
    fake: FakeDarwin,
) -> None:
    sink = make_sink(fake, storage_slug=STORAGE)
    try:
        single_item = ItemPayload(
            "/raw", "a.jpg", (SlotPayload("0", "image", (remote_file("s3://bkt/raw/a.jpg"),)),), {}
        )
        series = ItemPayload(
            "/raw",
            "s1",
            (
                SlotPayload(
                    "s1",
                    "dicom",
                    tuple(remote_file(f"s3://bkt/raw/s1/{i}.dcm") for i in range(3)),
                ),
            ),
            {},
        )
        r1 = await sink.put_item(DS, single_item)
        r2 = await sink.put_item(DS, series)
        # Registered again (a restart): adopted, nothing registered twice.
        r3 = await sink.put_item(DS, single_item)
    finally:
        await sink.close()
    assert (r1.changed, r2.changed, r3.changed) == (True, True, False)
    live = fake.live(DS)
    assert set(live) == {"/raw/a.jpg", "/raw/s1"}
    [slot] = live["/raw/a.jpg"]["slots"]
    assert slot["source_files"] == [{"file_name": "a.jpg", "storage_key": "raw/a.jpg"}]
    [slot] = live["/raw/s1"]["slots"]
    assert (slot["slot_name"], slot["type"]) == ("s1", "dicom")
    assert [f["storage_key"] for f in slot["source_files"]] == [f"raw/s1/{i}.dcm" for i in range(3)]
    # The restart's put was refused as ALREADY_EXISTS, looked up once and kept.
    assert len(fake.api_calls("POST", "register_existing")) == 3
    assert len(lookups(fake)) == 1
    assert not fake.api_calls("POST", "register_upload") and not fake.puts


async def test_bucket_item_without_storage_slug_names_the_fix(
    sink: DarwinSink, fake: FakeDarwin
) -> None:
    item = ItemPayload(
        "/", "a.jpg", (SlotPayload("0", "image", (remote_file("s3://b/a.jpg"),)),), {}
    )
    with pytest.raises(PermanentError, match=r"backend\.storage_slug is not set"):
        await sink.put_item(DS, item)
    assert fake.live(DS) == {}


# --- changes and deletions ----------------------------------------------------------------


async def test_metadata_change_is_a_no_op_on_v7(
    sink: DarwinSink, fake: FakeDarwin, tmp_path: Path
) -> None:
    p = image(tmp_path / "cat.png")
    old = single(p, camera="a")
    first = await sink.put_item(DS, old)
    before = len(fake.calls)
    again = await sink.put_item(DS, single(p, camera="b"), previous=old.manifest())
    assert (again.backend_id, again.version, again.changed) == (first.backend_id, 1, False)
    # One lookup (is it still there, under which id), nothing registered or sent.
    assert [c.path.rsplit("/", 1)[-1] for c in fake.calls[before:]] == ["items"]
    assert len(fake.api_calls("POST", "register_upload")) == 1
    assert len(fake.puts) == 1
    assert list(fake.live(DS)) == ["/cat.png"] and fake.archived(DS) == []


async def test_a_synced_item_deleted_on_v7_is_made_again(
    sink: DarwinSink, fake: FakeDarwin, tmp_path: Path
) -> None:
    p = image(tmp_path / "cat.png")
    item = single(p)
    first = await sink.put_item(DS, item)
    fake._remove({"filters": {"item_ids": [first.backend_id]}}, archive=False)  # by hand
    again = await sink.put_item(DS, item, previous=item.manifest())
    assert again.changed and again.backend_id != first.backend_id
    assert fake.content(again.backend_id, "0") == [("cat.png", p.read_bytes())]


@pytest.mark.parametrize("replace", ["archive", "delete"])
async def test_content_change_replaces_the_item(
    replace: str, fake: FakeDarwin, tmp_path: Path
) -> None:
    sink = make_sink(fake, replace=replace)
    try:
        p = image(tmp_path / "cat.png", (255, 0, 0), size=24)
        old = single(p)
        first = await sink.put_item(DS, old)
        image(p, (0, 0, 255), size=48)  # new content (and size)
        second = await sink.put_item(DS, single(p), previous=old.manifest())
    finally:
        await sink.close()
    live = fake.live(DS)
    assert list(live) == ["/cat.png"]
    assert live["/cat.png"]["id"] == second.backend_id != first.backend_id
    assert fake.content(second.backend_id, "0") == [("cat.png", p.read_bytes())]
    assert second.changed
    if replace == "archive":
        [old] = fake.archived(DS)
        assert old["id"] == first.backend_id
        assert second.version == 2
    else:
        assert fake.archived(DS) == []
        assert len(fake.all_items(DS)) == 1
        assert second.version == 1


async def test_previous_manifest_tells_a_same_size_change_from_a_metadata_change(
    sink: DarwinSink, fake: FakeDarwin, tmp_path: Path
) -> None:
    p = tmp_path / "scan.dcm"
    p.write_bytes(b"A" * 4096)
    old = ItemPayload("/", "scan.dcm", (SlotPayload("0", "dicom", (file_of(p),)),), {"v": 1})
    first = await sink.put_item(DS, old)
    p.write_bytes(b"B" * 4096)  # same name, same size, other bytes
    new = ItemPayload("/", "scan.dcm", (SlotPayload("0", "dicom", (file_of(p),)),), {"v": 1})
    # Metadata-only change with the ledger's manifest: the item stays.
    meta = ItemPayload(old.path, old.name, old.slots, {"v": 2})
    assert not (await sink.put_item(DS, meta, previous=old.manifest())).changed
    # Without the manifest V7's names and sizes are all there is to compare: adopted.
    assert not (await sink.put_item(DS, new)).changed
    # With it, the digests differ: replaced.
    result = await sink.put_item(DS, new, previous=old.manifest())
    assert result.changed and result.version == 2
    assert [i["id"] for i in fake.archived(DS)] == [first.backend_id]
    assert fake.content(result.backend_id, "0") == [("scan.dcm", b"B" * 4096)]


async def test_delete_item(sink: DarwinSink, fake: FakeDarwin, tmp_path: Path) -> None:
    a = image(tmp_path / "a.png")
    b = image(tmp_path / "b.png", (1, 2, 3))
    await sink.put_item(DS, single(a, folder="/x"))
    await sink.put_item(DS, single(b, folder="/x"))
    await sink.delete_item(DS, "/x", "a.png")
    await sink.delete_item(DS, "/x", "a.png")  # gone already: nothing to do
    await sink.delete_item(DS, "/nowhere", "b.png")  # another folder: untouched
    assert set(fake.live(DS)) == {"/x/b.png"}
    assert fake.archived(DS) == []
    assert len(fake.api_calls("DELETE")) == 1


async def test_an_item_already_on_v7_is_adopted(fake: FakeDarwin, tmp_path: Path) -> None:
    p = image(tmp_path / "cat.png")
    other = make_sink(fake)
    try:
        made = await other.put_item(DS, single(p))  # e.g. by a run whose ledger is gone
    finally:
        await other.close()
    sink = make_sink(fake)
    try:
        result = await sink.put_item(DS, single(p))
    finally:
        await sink.close()
    assert (result.backend_id, result.changed) == (made.backend_id, False)
    # The crash case: registered as new, refused as ALREADY_EXISTS, looked up, kept.
    assert len(fake.api_calls("POST", "register_upload")) == 2
    assert len(lookups(fake)) == 1
    assert len(fake.puts) == 1
    assert len(fake.all_items(DS)) == 1


async def test_new_slot_names_merged_by_v7_are_not_left_behind(
    sink: DarwinSink, fake: FakeDarwin, tmp_path: Path
) -> None:
    """V7 merges slot names that are new into an item it holds and refuses the others
    (darwin-py #937). A never-synced item registered over an older one with fewer
    slots is therefore looked up after the refusal and replaced as a whole."""
    views = [image(tmp_path / f"v{i}.png", (60 * i, 0, 0)) for i in range(2)]
    older = ItemPayload("/", "scan", (SlotPayload("0", "image", (file_of(views[0]),)),), {})
    other = make_sink(fake)
    try:
        first = await other.put_item(DS, older)
    finally:
        await other.close()
    slots = tuple(SlotPayload(str(i), "image", (file_of(p),)) for i, p in enumerate(views))
    result = await sink.put_item(DS, ItemPayload("/", "scan", slots, {}))
    assert result.changed and result.backend_id != first.backend_id
    live = fake.live(DS)["/scan"]
    assert [s["slot_name"] for s in live["slots"]] == ["0", "1"] and live["status"] == "new"
    for i, p in enumerate(views):
        assert fake.content(live["id"], str(i)) == [(p.name, p.read_bytes())]
    [old] = fake.archived(DS)
    assert old["id"] == first.backend_id


# --- the request floor -------------------------------------------------------------------


@pytest.fixture
async def fast(fake: FakeDarwin) -> AsyncIterator[DarwinSink]:
    """A sink with the client-side budget lifted (V7's 1,000 a minute would make these
    tests take a minute): what is counted here is requests, not time."""
    s = make_sink(fake, requests_per_minute=1_000_000)
    yield s
    await s.close()


def pngs(folder: Path, n: int) -> list[ItemPayload]:
    return [
        single(image(folder / f"{i}.png", (i % 256, i // 256, 9)), folder="/g") for i in range(n)
    ]


async def test_a_group_costs_one_registration_and_two_requests_a_file(
    fast: DarwinSink, fake: FakeDarwin, tmp_path: Path
) -> None:
    await fast.ensure_dataset(DS)
    items = pngs(tmp_path, 120)
    before = len(fake.calls)
    results = await fast.put_items([BatchItem(DS, it) for it in items])
    assert all(not isinstance(r, Exception) and r.changed for r in results), results
    assert len(fake.api_calls("POST", "register_upload")) == 1
    assert len(lookups(fake)) == 0  # no lookups
    assert (len(fake.calls) - before) / len(items) <= 2 + 1 / len(items)
    live = fake.live(DS)
    assert len(live) == 120
    for it in items[:5]:
        path = it.slots[0].files[0].local_path
        assert fake.content(live[it.key]["id"], "0") == [(it.name, Path(path).read_bytes())]


async def test_a_group_is_registered_in_chunks_of_what_v7_takes(
    sink: DarwinSink, fake: FakeDarwin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ingestd.sinks.darwin.sink.UPLOAD_CHUNK", 4)
    results = await sink.put_items([BatchItem(DS, it) for it in pngs(tmp_path, 10)])
    assert all(not isinstance(r, Exception) for r in results)
    assert [len(json.loads(b)["items"]) for b in fake.bodies("register_upload")] == [4, 4, 2]
    assert len(fake.live(DS)) == 10


async def test_bucket_objects_are_registered_a_hundred_a_request(fake: FakeDarwin) -> None:
    sink = make_sink(fake, storage_slug=STORAGE)
    try:
        await sink.ensure_dataset(DS)
        items = [
            ItemPayload(
                "/raw",
                f"{i}.jpg",
                (SlotPayload("0", "image", (remote_file(f"s3://bkt/raw/{i}.jpg"),)),),
                {},
            )
            for i in range(250)
        ]
        before = len(fake.calls)
        results = await sink.put_items([BatchItem(DS, it) for it in items])
    finally:
        await sink.close()
    assert all(not isinstance(r, Exception) and r.changed for r in results), results[:3]
    assert len(fake.calls) - before == 3  # 100 + 100 + 50
    assert (len(fake.calls) - before) / len(items) <= 0.05
    assert len(fake.live(DS)) == 250


async def test_a_synced_group_is_looked_up_a_hundred_items_a_request(
    fast: DarwinSink, fake: FakeDarwin, tmp_path: Path
) -> None:
    items = pngs(tmp_path, 150)
    await fast.put_items([BatchItem(DS, it) for it in items])
    before = len(fake.calls)
    again = await fast.put_items([BatchItem(DS, it, it.manifest()) for it in items])
    assert all(not isinstance(r, Exception) and not r.changed for r in again)
    assert [c.path.rsplit("/", 1)[-1] for c in fake.calls[before:]] == ["items", "items"]


def test_v7_rule_out_of_storage_is_not_retried() -> None:
    full = Answer(
        429, {}, json.dumps({"errors": {"code": "INSUFFICIENT_REMAINING_STORAGE"}}).encode()
    )
    busy = Answer(429, {"Retry-After": "1"}, b'{"errors": {"message": "Too Many Requests"}}')
    assert (v7_rule(full), v7_rule(busy), v7_rule(Answer(502, {}, b""))) == (
        "reject",
        "retry",
        "retry",
    )
    assert v7_rule(Answer(200, {}, b"{}")) == "ok"


async def test_out_of_storage_names_the_fix(sink: DarwinSink) -> None:
    full = Answer(
        429, {}, json.dumps({"errors": {"code": "INSUFFICIENT_REMAINING_STORAGE"}}).encode()
    )
    error = sink.v7.api.rejection(full, "registering item /a.png")
    assert isinstance(error, PermanentError) and "out of storage" in str(error)


async def test_blocked_reasons(sink: DarwinSink, fake: FakeDarwin, tmp_path: Path) -> None:
    p = image(tmp_path / "cat.png")
    fake.block_next("ITEM_COUNT_LIMIT_EXCEEDED")
    with pytest.raises(PermanentError, match="item limit"):
        await sink.put_item(DS, single(p))
    fake.block_next("FILE_UPLOAD_TIMEOUT")
    with pytest.raises(RetriableError, match="FILE_UPLOAD_TIMEOUT"):
        await sink.put_item(DS, single(p))
    fake.block_next("SOMETHING_NEW")
    with pytest.raises(PermanentError, match="SOMETHING_NEW"):
        await sink.put_item(DS, single(p))
    assert fake.live(DS) == {}
    assert (await sink.put_item(DS, single(p))).changed
    assert list(fake.live(DS)) == ["/cat.png"]


# --- faults -------------------------------------------------------------------------------


async def test_429_storm_honours_retry_after(
    sink: DarwinSink, fake: FakeDarwin, tmp_path: Path
) -> None:
    p = image(tmp_path / "cat.png")
    await sink.ensure_dataset(DS)
    fake.storm(3, retry_after=1)
    await sink.put_item(DS, single(p))
    calls = fake.api_calls()
    throttled = [i for i, c in enumerate(calls) if c.status == 429]
    assert len(throttled) == 3
    for i in throttled:
        assert calls[i + 1].at - calls[i].at >= 0.95, "a retry came before Retry-After"
    assert fake.live(DS)["/cat.png"]["status"] == "new"
    assert len(fake.all_items(DS)) == 1


async def test_requests_per_minute_is_a_client_side_budget(
    fake: FakeDarwin, tmp_path: Path
) -> None:
    sink = make_sink(fake, requests_per_minute=60)  # 1 a second, bursts of 3
    try:
        await sink.put_item(DS, single(image(tmp_path / "cat.png")))
    finally:
        await sink.close()
    calls = fake.api_calls()
    assert len(calls) == 5  # datasets GET + POST, register, sign, confirm
    assert calls[-1].at - calls[0].at >= 1.8
    assert all(c.status < 300 for c in calls)
    assert len(fake.puts) == 1  # storage PUTs are not V7 API calls and not budgeted


async def test_5xx_is_retried_and_runs_out_into_a_retriable_error(
    sink: DarwinSink, fake: FakeDarwin, tmp_path: Path
) -> None:
    p = image(tmp_path / "cat.png")
    fake.fail_next(2, 503)
    await sink.put_item(DS, single(p))
    assert list(fake.live(DS)) == ["/cat.png"]
    fake.fail_next(50, 500)
    with pytest.raises(RetriableError, match="gave up after 6 attempts"):
        await sink.delete_item(DS, "/", "cat.png")


async def test_a_put_cut_mid_body_is_sent_again_from_the_start(
    sink: DarwinSink, fake: FakeDarwin, tmp_path: Path
) -> None:
    p = tmp_path / "big.png"
    image(p, size=400)
    fake.drop_puts(1)
    result = await sink.put_item(DS, single(p))
    assert [c.status for c in fake.puts] == [-1, 200]
    assert fake.content(result.backend_id, "0") == [("big.png", p.read_bytes())]
    assert fake.live(DS)["/big.png"]["status"] == "new"


async def test_put_after_an_interrupted_upload_leaves_no_duplicate(
    fake: FakeDarwin, tmp_path: Path
) -> None:
    p = image(tmp_path / "cat.png")
    hold = fake.hold("cat.png")
    first = make_sink(fake)
    task = asyncio.create_task(first.put_item(DS, single(p)))
    deadline = time.monotonic() + 10
    while hold.held == 0:
        assert time.monotonic() < deadline, "the upload never reached the fake"
        await asyncio.sleep(0.01)
    task.cancel()  # the daemon stops (or dies) mid-upload
    with pytest.raises(asyncio.CancelledError):
        await task
    await first.close()
    half = fake.live(DS)["/cat.png"]
    assert half["status"] == "uploading"
    hold.release.set()
    fresh = make_sink(fake)
    try:
        result = await fresh.put_item(DS, single(p))
    finally:
        await fresh.close()
    live = fake.live(DS)
    assert list(live) == ["/cat.png"] and live["/cat.png"]["status"] == "new"
    assert result.backend_id != half["id"] and result.changed
    assert len(fake.all_items(DS)) == 1  # the half-made item was deleted, not archived
    assert fake.content(result.backend_id, "0") == [("cat.png", p.read_bytes())]


async def test_a_small_file_changed_after_hashing_never_reaches_v7(
    sink: DarwinSink, fake: FakeDarwin, tmp_path: Path
) -> None:
    """Small files are read ahead whole and checked before their items are
    registered: a changed one fails its item and V7 never hears of it."""
    p = tmp_path / "scan.dcm"
    p.write_bytes(b"A" * 10_000)
    item = ItemPayload("/", "scan.dcm", (SlotPayload("0", "dicom", (file_of(p),)),), {})
    p.write_bytes(b"B" * 10_000)
    await sink.ensure_dataset(DS)
    before = len(fake.calls)
    with pytest.raises(SourceChangedError, match="changed after it was hashed"):
        await sink.put_item(DS, item)
    assert len(fake.calls) == before and fake.all_items(DS) == []
    p.write_bytes(b"A" * 5_000)  # and now it shrank
    with pytest.raises(SourceChangedError, match="shrank"):
        await sink.put_item(DS, item)
    assert len(fake.calls) == before
    fixed = ItemPayload("/", "scan.dcm", (SlotPayload("0", "dicom", (file_of(p),)),), {})
    await sink.put_item(DS, fixed)
    assert fake.live(DS)["/scan.dcm"]["status"] == "new"


async def test_a_big_file_changed_while_it_streams_is_never_confirmed(
    sink: DarwinSink, fake: FakeDarwin, tmp_path: Path
) -> None:
    p = tmp_path / "scan.dcm"
    size = 3 << 20  # streamed in blocks, not read ahead
    p.write_bytes(b"A" * size)
    item = ItemPayload("/", "scan.dcm", (SlotPayload("0", "dicom", (file_of(p),)),), {})
    p.write_bytes(b"A" * (size - 1) + b"B")  # only the last byte differs
    with pytest.raises(SourceChangedError, match="changed after it was hashed"):
        await sink.put_item(DS, item)
    # The half-made item is deleted again: V7 shows nothing stuck in `uploading`.
    assert fake.live(DS) == {}
    p.write_bytes(b"A" * (size // 2))  # and now it shrank
    with pytest.raises(SourceChangedError, match="shrank"):
        await sink.put_item(DS, item)
    # The last bytes are held back until they are verified: storage never stored a
    # thing, nothing was confirmed, and each put signed once (no retry loop).
    assert all(up.data is None for up in fake.uploads.values())
    assert not fake.api_calls("POST", "confirm")
    assert len(fake.api_calls("GET", "/sign")) == 2
    fixed = ItemPayload("/", "scan.dcm", (SlotPayload("0", "dicom", (file_of(p),)),), {})
    await sink.put_item(DS, fixed)
    assert fake.live(DS)["/scan.dcm"]["status"] == "new"
    assert len(fake.all_items(DS)) == 1


async def test_api_key_never_in_logs_or_errors(
    fake: FakeDarwin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = image(tmp_path / "cat.png")
    with structlog.testing.capture_logs() as logs:
        sink = make_sink(fake)
        try:
            fake.storm(2, retry_after=0)
            fake.fail_next(1, 502)
            await sink.put_item(DS, single(p))
            image(p, (9, 9, 9), size=30)
            await sink.put_item(DS, single(p))
        finally:
            await sink.close()
        monkeypatch.setenv(KEY_ENV, "v7-wrong-key-0123456789")
        bad = make_sink(fake)
        try:
            with pytest.raises(PermanentError) as err:
                await bad.put_item(DS, single(p))
        finally:
            await bad.close()
    text = json.dumps(logs, default=str) + str(err.value) + repr(sink) + repr(bad)
    assert "HTTP 401" in str(err.value) and KEY_ENV in str(err.value)
    assert API_KEY not in text and "v7-wrong-key-0123456789" not in text
    assert any(e.get("event") == "replacing item on V7" for e in logs)
    logging.getLogger(__name__).debug("checked %d log lines", len(logs))


async def test_a_dataset_deleted_on_v7_is_created_again(
    sink: DarwinSink, fake: FakeDarwin, tmp_path: Path
) -> None:
    await sink.put_item(DS, single(image(tmp_path / "a.png")))
    gone = fake.dataset(DS)
    assert gone is not None
    fake._archive_dataset(str(gone["id"]))  # someone removed it in V7's web app
    with pytest.raises(RetriableError, match="created again"):
        await sink.put_item(DS, single(image(tmp_path / "b.png")))
    await sink.put_item(DS, single(tmp_path / "b.png"))
    again = fake.dataset(DS)
    assert again is not None and again["id"] != gone["id"]
    assert list(fake.live(DS)) == ["/b.png"]
