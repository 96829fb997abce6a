"""The daemon with the `darwin` backend, end to end: `ingestd run` as a subprocess
against the fake V7 API (tests/support/fakes/darwin.py) running in a thread of this process.

Real data: PIL images, pydicom's bundled CT series, an OpenCV-written video. Each test
ends on the fake's remote state (items, archived items, slots, layouts, stored bytes)
and checks that no item exists twice. Waits poll the fake or the daemon's status.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.support.daemon import Env, synced_lines
from tests.support.fakes.darwin import API_KEY, TEAM, FakeDarwin, FakeDarwinThread
from tests.support.wait import wait_for

KEY_ENV = "INGESTD_E2E_V7_KEY"
CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDarwin]:
    monkeypatch.setenv(KEY_ENV, API_KEY)  # the daemon and CLI subprocesses inherit it
    with FakeDarwinThread() as f:
        yield f


def darwin_backend(fake: FakeDarwin, **kw: Any) -> dict[str, Any]:
    return {"kind": "darwin", "team": TEAM, "api_key_env": KEY_ENV, "base_url": fake.url, **kw}


def png(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG")
    return path.read_bytes()


def make_video(path: Path, frames: int, fps: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (64, 48))
    assert writer.isOpened(), "this OpenCV build cannot write mp4v"
    for i in range(frames):
        writer.write(np.full((48, 64, 3), (i * 10) % 256, np.uint8))
    writer.release()


def settled(env: Env) -> bool:
    """Every watch has nothing pending and nothing failed (failures fail the test)."""
    for w in env.status()["watches"]:
        assert not w["failed"], w["last_errors"]
        if w["pending"]:
            return False
    return True


def watch(name: str, source: Path, dataset: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "source": str(source), "dataset": dataset, "settle": "0.3s", **kw}


def test_every_kind_of_item_and_its_changes(env: Env, fake: FakeDarwin) -> None:
    root = env.drop()
    singles, rigs, cells, ct, clips = (
        root / n for n in ("singles", "rigs", "cells", "ct", "clips")
    )
    env.write_config(
        [
            watch(
                "singles",
                singles,
                "Photos",
                on_delete="delete",
                metadata={"sidecar": "{name}.json"},
            ),
            watch("rigs", rigs, "Rigs", group={"mode": "slots"}),
            watch("cells", cells, "Cells", group={"mode": "channels"}),
            watch("ct", ct, "CT", group={"mode": "series"}),
            watch("clips", clips, "Clips", video={"mode": "frames", "fps": 1}),
        ],
        backend=darwin_backend(fake),
    )
    a = png(singles / "a.png", (20, 20), (255, 0, 0))
    png(singles / "b.png", (20, 20), (0, 255, 0))
    views = [png(rigs / "scan1" / f"view{i}.png", (16, 16), (i * 60, 0, 0)) for i in range(5)]
    for c, rgb in zip("rgb", [(255, 0, 0), (0, 255, 0), (0, 0, 255)], strict=True):
        png(cells / "well1" / f"{c}.png", (16, 16), rgb)
    (ct / "s1").mkdir(parents=True)
    slices = sorted(CT5N.iterdir())[:3]
    for src in slices:
        shutil.copyfile(src, ct / "s1" / f"{src.name}.dcm")
    make_video(clips / "clip.mp4", 30, 10.0)  # 3 s: 3 frames at 1 fps
    env.start()
    wait_for(lambda: settled(env) and len(fake.live("Clips")) == 1, 45, what="the first sync")

    photos = fake.live("Photos")
    assert set(photos) == {"/a.png", "/b.png"}
    assert fake.content(photos["/a.png"]["id"], "0") == [("a.png", a)]

    [scan] = fake.live("Rigs").values()
    assert [s["slot_name"] for s in scan["slots"]] == ["0", "1", "2", "3", "4"]
    assert scan["layout"] == {
        "version": 3,
        "slots_grid": [[["0"], ["3"]], [["1"], ["4"]], [["2"]]],
    }
    assert [fake.content(scan["id"], str(i))[0][1] for i in range(5)] == views

    [well] = fake.live("Cells").values()
    names = ["b.png", "g.png", "r.png"]
    assert [s["slot_name"] for s in well["slots"]] == names
    assert well["layout"] == {"version": 3, "slots_grid": [[names]]}

    [series] = fake.live("CT").values()
    [(file_name, data)] = fake.content(series["id"], "s1")
    assert file_name == "s1.dcm" and data is not None
    zf = zipfile.ZipFile(io.BytesIO(data))
    assert zf.testzip() is None
    got = [pydicom.dcmread(io.BytesIO(zf.read(n))).SOPInstanceUID for n in zf.namelist()]
    assert sorted(got) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in slices)

    [clip] = fake.live("Clips").values()
    [slot] = clip["slots"]
    assert (slot["type"], slot["fps"], slot["file_name"]) == ("video", 1.0, "clip.avi")
    [(_, avi)] = fake.content(clip["id"], "0")
    (env.root / "got.avi").write_bytes(avi or b"")
    cap = cv2.VideoCapture(str(env.root / "got.avi"))
    count = 0
    while cap.read()[0]:
        count += 1
    cap.release()
    assert count == 3

    # A sidecar edit: V7 holds no metadata of ours, so nothing is registered or sent.
    registered = len(fake.api_calls("POST", "register_upload"))
    a_id = photos["/a.png"]["id"]
    before = len(synced_lines(env, "/a.png"))
    (singles / "a.png.json").write_text(json.dumps({"label": "cat"}))
    wait_for(lambda: len(synced_lines(env, "/a.png")) > before, 20, what="the sidecar change")
    assert len(fake.api_calls("POST", "register_upload")) == registered
    assert fake.live("Photos")["/a.png"]["id"] == a_id and fake.archived("Photos") == []

    # A content change: the old item is archived, the new one registered.
    b_id = photos["/b.png"]["id"]
    b2 = png(singles / "b.png", (40, 40), (0, 0, 255))
    wait_for(lambda: fake.live("Photos")["/b.png"]["id"] != b_id, 20, what="b.png replaced")
    wait_for(lambda: fake.live("Photos")["/b.png"]["status"] == "new", 20, what="b.png done")
    new_b = fake.live("Photos")["/b.png"]
    assert fake.content(new_b["id"], "0") == [("b.png", b2)]
    assert [i["id"] for i in fake.archived("Photos")] == [b_id]

    # A deletion with on_delete: delete: gone from V7 (deleted, not archived).
    (singles / "a.png").unlink()
    wait_for(lambda: "/a.png" not in fake.live("Photos"), 20, what="a.png deleted")
    assert [i["name"] for i in fake.all_items("Photos")] == ["b.png", "b.png"]
    assert env.stop() == 0
    for ds in ("Photos", "Rigs", "Cells", "CT", "Clips"):
        fake.live(ds)  # asserts no duplicate keys


def test_429_storm_and_a_restart_mid_upload(env: Env, fake: FakeDarwin) -> None:
    drop = env.drop()
    env.write_config([watch("w", drop, "ds")], backend=darwin_backend(fake))
    fake.storm(3, retry_after=1)  # the first calls of the run are throttled
    expected = {f"/img{i}.png": png(drop / f"img{i}.png", (12, 12), (i, 0, 0)) for i in range(4)}
    hold = fake.hold("held.png")
    held = png(drop / "held.png", (30, 30), (7, 7, 7))
    env.start()
    wait_for(lambda: hold.held >= 1, 30, what="the held upload to reach V7")
    env.kill()  # SIGKILL while V7's storage holds the upload
    hold.release.set()
    throttled = [c for c in fake.api_calls() if c.status == 429]
    assert len(throttled) == 3
    calls = fake.api_calls()
    for c in throttled:  # the same request came back no sooner than Retry-After said
        again = next(x for x in calls if x.at > c.at and (x.method, x.path) == (c.method, c.path))
        assert again.at - c.at >= 0.95
    assert fake.live("ds")["/held.png"]["status"] == "uploading"

    env.restart()
    wait_for(
        lambda: (
            settled(env)
            and len(fake.live("ds")) == 5
            and all(i["status"] == "new" for i in fake.live("ds").values())
        ),
        45,
        what="everything synced after the restart",
    )
    live = fake.live("ds")
    for key, data in {**expected, "/held.png": held}.items():
        assert fake.content(live[key]["id"], "0") == [(key[1:], data)]
    assert len(fake.all_items("ds")) == 5  # the half-made item was deleted: no duplicate
    assert env.stop() == 0
