"""Items from folders and media (issue 3), through the real CLI on real data: grouped
folders (slots, channels, DICOM series by folder or by UID, ready markers, late files),
video frame sampling and native upload, oversize and corrupt images, DICOM
de-identification, and touches that must not re-send anything.

Data is real: images are PIL-encoded JPEG/PNG, videos are written by OpenCV's
VideoWriter with each frame's index drawn as a barcode (so a stored frame tells which
source frame it is), and DICOM files are pydicom's bundled test series, copied under
shuffled names. Most tests use the one-pass `ingestd sync`, which is deterministic;
the daemon runs only where timing is the point (late files, ready markers).

Checks go to the stored bytes: each `items --json` file digest is looked up under
`<store>/blobs/sha256/` and re-opened with PIL, OpenCV's decoder or pydicom.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.support.daemon import Env, blob_path, sha256_digest, synced_lines
from tests.support.wait import wait_for

DICOM_DATA = Path(pydicom.__file__).parent / "data" / "test_files"
DICOMDIR = DICOM_DATA / "dicomdirtests"
MR700 = DICOMDIR / "98892003" / "MR700"  # one MR series, InstanceNumber 1..7
CT5N = DICOMDIR / "98892001" / "CT5N"  # CT series 5 "SmartScore - Gated 0.5 sec", 6..10
CT2N = DICOMDIR / "98892001" / "CT2N"  # CT series 4 "Scout", 1..2 (same patient and study)
PATIENT_NAME, PATIENT_ID = "Doe^Peter", "98890234"  # in MR700, CT5N and CT2N
BIRTH_DATE = "19700101"  # added to copies: the test files have none

# --- helpers -----------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    return sha256_digest(path.read_bytes())


def stored(env: Env, file: dict[str, Any]) -> bytes:
    """The bytes the store holds for one `items --json` file entry."""
    return blob_path(env, file["digest"]).read_bytes()


def sync(env: Env, rc: int = 0) -> subprocess.CompletedProcess[str]:
    """One pass; asserts its exit code (0: all synced, 1: some item failed)."""
    proc = env.cli("sync")
    assert proc.returncode == rc, f"sync exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def failures(env: Env, watch: str = "w") -> dict[str, str]:
    """item key → reason, for the watch's failed items."""
    return {e["item"]: e["error"] for e in env.watch_status(watch)["last_errors"]}


def only_slot(item: dict[str, Any]) -> dict[str, Any]:
    assert len(item["slots"]) == 1, item["slots"]
    return item["slots"][0]


def png(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG")
    return path.read_bytes()


def jpeg(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG", quality=90)
    return path.read_bytes()


# Videos: frame i carries i as a 12-bit barcode (8 px black/white cells, top strip),
# which survives mp4v and JPEG encoding, so a sampled frame names its source frame.
VIDEO_W, VIDEO_H, BITS = 96, 48, 12


def _barcode_frame(i: int) -> np.ndarray:
    frame = np.full((VIDEO_H, VIDEO_W, 3), 128, np.uint8)
    for b in range(BITS):
        frame[:16, b * 8 : (b + 1) * 8] = 255 if (i >> b) & 1 else 0
    return frame


def frame_index(data: bytes) -> int:
    a = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=float)
    return sum(1 << b for b in range(BITS) if a[2:14, b * 8 + 2 : b * 8 + 6].mean() > 128)


def make_video(path: Path, frames: int, fps: float) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (VIDEO_W, VIDEO_H))
    assert writer.isOpened(), "this OpenCV build cannot write mp4v"
    for i in range(frames):
        writer.write(_barcode_frame(i))
    writer.release()
    return path.read_bytes()


def copy_shuffled(sources: list[Path], dest: Path, seed: int, ext: str = ".dcm") -> list[Path]:
    """Copy DICOM files into `dest` under random names whose order is not the files'
    InstanceNumber order. Returns the copies, in the order of `sources`."""
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = [f"{rng.getrandbits(40):010x}{ext}" for _ in sources]
    out = []
    for src, name in zip(sources, names, strict=True):
        shutil.copyfile(src, dest / name)
        out.append(dest / name)
    by_name = sorted(out, key=lambda p: p.name)
    assert [instance(p) for p in by_name] != sorted(instance(p) for p in out), "names in order"
    return out


def instance(path_or_bytes: Path | bytes) -> int:
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return int(pydicom.dcmread(src, stop_before_pixels=True).InstanceNumber)


def dcm(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def series_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def log_events(proc: subprocess.CompletedProcess[str], event: str) -> list[dict[str, Any]]:
    """The JSON log lines with this `event` that a one-pass sync wrote to stderr."""
    out = []
    for line in proc.stderr.splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if e.get("event") == event:
            out.append(e)
    return out


# --- 1. grouped folders ------------------------------------------------------------------


def test_series_in_instance_order_whatever_the_file_names(env: Env) -> None:
    drop = env.drop()
    env.write_config(
        [{"name": "w", "source": str(drop), "dataset": "ds", "group": {"mode": "series"}}]
    )
    # The series under shuffled names; every other copy has no extension at all, so it
    # is DICOM by its content only.
    copies = copy_shuffled(series_files(MR700), drop / "MR700", seed=7)
    for i, p in enumerate(copies):
        if i % 2:
            p.rename(p.with_suffix(""))
    copies = series_files(drop / "MR700")
    (drop / "MR700" / "notes.txt").write_text("not DICOM: ignored in series mode")
    deeper = drop / "MR700" / "sub" / "deeper.dcm"  # below the group's first level: ignored
    deeper.parent.mkdir()
    shutil.copyfile(DICOM_DATA / "CT_small.dcm", deeper)
    loose = drop / "loose.dcm"  # outside any group folder: a single item
    shutil.copyfile(DICOM_DATA / "MR_small.dcm", loose)
    sources = {sha256_file(p): p for p in copies}
    sync(env)

    items = env.items_by_key()
    assert set(items) == {"/MR700", "/loose.dcm"}
    series = items["/MR700"]
    assert (series["path"], series["name"], series["version"]) == ("/", "MR700", 1)
    slot = only_slot(series)
    assert (slot["name"], slot["type"]) == ("MR700", "dicom")
    assert len(slot["files"]) == 7
    assert {f["digest"] for f in slot["files"]} == set(sources)
    for f in slot["files"]:
        src = sources[f["digest"]]
        assert f["size"] == src.stat().st_size
        assert stored(env, f) == src.read_bytes()
    assert [instance(stored(env, f)) for f in slot["files"]] == [1, 2, 3, 4, 5, 6, 7]
    uid = pydicom.dcmread(copies[0], stop_before_pixels=True).SeriesInstanceUID
    assert series["metadata"]["Modality"] == "MR"
    assert series["metadata"]["SeriesInstanceUID"] == uid

    single = only_slot(items["/loose.dcm"])
    assert single["type"] == "dicom"
    assert [f["digest"] for f in single["files"]] == [sha256_file(loose)]


def test_flat_export_split_by_uid_and_refused_without_it(env: Env) -> None:
    by_uid, by_folder, anon = env.drop("by_uid"), env.drop("by_folder"), env.drop("anon")
    env.write_config(
        [
            {
                "name": "uid",
                "source": str(by_uid),
                "dataset": "uid",
                "group": {"mode": "series", "series_by": "uid"},
            },
            {
                "name": "folder",
                "source": str(by_folder),
                "dataset": "folder",
                "group": {"mode": "series"},
            },
            {
                "name": "anon",
                "source": str(anon),
                "dataset": "anon",
                "group": {"mode": "series", "series_by": "uid"},
                "dicom": {"deidentify": True},
            },
        ]
    )
    mixed = series_files(CT5N) + series_files(CT2N)  # two series of one study, one folder
    for drop in (by_uid, by_folder, anon):
        copy_shuffled(mixed, drop / "export", seed=11)
    sync(env, rc=1)

    items = env.items_by_key("uid")
    assert set(items) == {
        "/export/98890234_4_Scout",
        "/export/98890234_5_SmartScore_-_Gated_0.5_sec",
    }
    expected = {
        "/export/98890234_4_Scout": (CT2N, [1, 2]),
        "/export/98890234_5_SmartScore_-_Gated_0.5_sec": (CT5N, [6, 7, 8, 9, 10]),
    }
    uids = set()
    for key, (folder, numbers) in expected.items():
        item = items[key]
        assert item["path"] == "/export"
        slot = only_slot(item)
        assert (slot["name"], slot["type"]) == (item["name"], "dicom")
        assert {f["digest"] for f in slot["files"]} == {
            sha256_file(p) for p in series_files(folder)
        }
        blobs = [stored(env, f) for f in slot["files"]]
        assert [instance(b) for b in blobs] == numbers
        series_uids = {dcm(b).SeriesInstanceUID for b in blobs}
        assert len(series_uids) == 1
        assert item["metadata"]["SeriesInstanceUID"] in series_uids
        uids |= series_uids
    assert len(uids) == 2

    assert env.items("folder") == []
    st = env.watch_status("folder")
    assert (st["failed"], st["synced"]) == (1, 0)
    reason = failures(env, "folder")["/export"]
    assert "series_by" in reason and "2" in reason, reason

    # De-identified: the default name template's PatientID must not name the items.
    anon_items = env.items_by_key("anon")
    assert len(anon_items) == 2
    assert sorted(len(only_slot(i)["files"]) for i in anon_items.values()) == [2, 5]
    for key, item in anon_items.items():
        assert item["path"] == "/export"
        assert PATIENT_ID not in key and "Scout" not in key, key
        assert PATIENT_ID not in json.dumps(item), item


def test_channels_of_different_sizes_fail_naming_the_odd_file(env: Env) -> None:
    drop = env.drop()
    env.write_config(
        [{"name": "w", "source": str(drop), "dataset": "ds", "group": {"mode": "channels"}}]
    )
    good = {
        name: png(drop / "cells" / name, (64, 48), color)
        for name, color in [
            ("red.png", (255, 0, 0)),
            ("green.png", (0, 255, 0)),
            ("blue.png", (0, 0, 255)),
        ]
    }
    png(drop / "odd" / "ch1.png", (64, 48), (10, 10, 10))
    png(drop / "odd" / "ch2.png", (64, 48), (20, 20, 20))
    png(drop / "odd" / "ch3.png", (48, 64), (30, 30, 30))  # the odd one: rotated
    sync(env, rc=1)

    items = env.items_by_key()
    assert set(items) == {"/cells"}
    slots = items["/cells"]["slots"]
    assert [s["name"] for s in slots] == ["blue.png", "green.png", "red.png"]
    for s in slots:
        assert s["type"] == "image"
        assert [f["digest"] for f in s["files"]] == [sha256_digest(good[s["name"]])]
    reason = failures(env)["/odd"]
    assert "ch3.png" in reason and re.search(r"48\s*[×x]\s*64", reason), reason
    assert "ch1.png is" not in reason and "ch2.png is" not in reason, reason


def test_slots_in_natural_order_and_loose_files_stay_single(env: Env) -> None:
    drop = env.drop()
    env.write_config(
        [{"name": "w", "source": str(drop), "dataset": "ds", "group": {"mode": "slots"}}]
    )
    data = {
        name: png(drop / "seq" / name, (32, 24), (i * 60, 0, 0))
        for i, name in enumerate(["img10.png", "img2.png", "img1.png"])
    }
    deeper = png(drop / "seq" / "more" / "img3.png", (32, 24), (0, 0, 9))
    loose = png(drop / "single.png", (32, 24), (0, 9, 0))
    sync(env)

    items = env.items_by_key()
    assert set(items) == {"/seq", "/single.png"}
    slots = items["/seq"]["slots"]
    assert [s["name"] for s in slots] == ["0", "1", "2"]
    assert [s["type"] for s in slots] == ["image"] * 3
    assert [s["files"][0]["digest"] for s in slots] == [
        sha256_digest(data[n]) for n in ("img1.png", "img2.png", "img10.png")
    ]
    assert [s["files"][0]["name"] for s in slots] == ["img1.png", "img2.png", "img10.png"]
    assert sha256_digest(deeper) not in {f["digest"] for s in slots for f in s["files"]}
    layout = items["/seq"].get("layout") or slots[0].get("layout")
    assert layout and layout["type"] == "grid", items["/seq"]
    single = only_slot(items["/single.png"])
    assert single["type"] == "image"
    assert [f["digest"] for f in single["files"]] == [sha256_digest(loose)]


def test_late_file_updates_the_settled_group(env: Env) -> None:
    drop = env.drop()
    env.write_config(
        [{"name": "w", "source": str(drop), "dataset": "ds", "group": {"mode": "slots"}}]
    )
    env.start()
    first = [png(drop / "seq" / f"f{i}.png", (16, 16), (i * 50, 0, 0)) for i in (1, 2)]
    item = wait_for(
        lambda: (i := env.items_by_key().get("/seq")) and len(i["slots"]) == 2 and i,
        what="/seq with two slots",
    )
    assert item["version"] == 1
    late = png(drop / "seq" / "f10.png", (16, 16), (0, 0, 200))
    item = wait_for(
        lambda: (i := env.items_by_key().get("/seq")) and i["version"] == 2 and i,
        what="/seq version 2",
    )
    assert set(env.items_by_key()) == {"/seq"}
    assert [s["name"] for s in item["slots"]] == ["0", "1", "2"]
    assert [s["files"][0]["digest"] for s in item["slots"]] == [
        sha256_digest(d) for d in [*first, late]
    ]
    assert len(synced_lines(env, "/seq")) == 2
    assert env.stop() == 0


def test_ready_marker_plans_the_group_without_waiting_for_settle(env: Env) -> None:
    drop = env.drop()
    env.write_config(
        [
            {
                "name": "w",
                "source": str(drop),
                "dataset": "ds",
                "settle": "30s",  # only the marker can explain an item within 30 s
                "include": ["*.png"],  # the marker gets through anyway
                "group": {"mode": "slots", "ready_marker": ".done"},
            }
        ]
    )
    env.start()
    t0 = time.monotonic()
    png(drop / "other" / "c.png", (16, 16), (0, 0, 1))  # no marker: waits for settle
    data = [png(drop / "batch" / n, (16, 16), (i, 0, 0)) for i, n in enumerate(["a.png", "b.png"])]
    (drop / "batch" / ".done").write_bytes(b"")
    item = wait_for(lambda: env.items_by_key().get("/batch"), 20, what="/batch after .done")
    items = env.items_by_key()
    assert time.monotonic() - t0 < 30, "too slow to tell the marker from the settle time"
    assert "/other" not in items, "a group without its marker did not wait for settle"
    assert [s["name"] for s in item["slots"]] == ["0", "1"]
    files = [f for s in item["slots"] for f in s["files"]]
    assert [f["name"] for f in files] == ["a.png", "b.png"]
    assert [f["digest"] for f in files] == [sha256_digest(d) for d in data]
    assert env.stop() == 0


# --- 2. video ----------------------------------------------------------------------------


def test_video_sampled_at_2fps_and_corrupt_video_fails(env: Env) -> None:
    drop = env.drop()
    env.write_config(
        [
            {
                "name": "w",
                "source": str(drop),
                "dataset": "ds",
                "video": {"mode": "frames", "fps": 2},
            }
        ]
    )
    source = make_video(drop / "clip.mp4", 300, 30.0)  # 10 s at 30 fps
    (drop / "bad.mp4").write_bytes(random.Random(3).randbytes(20_000))
    sync(env, rc=1)

    items = env.items_by_key()
    assert set(items) == {"/clip.mp4"}
    slot = only_slot(items["/clip.mp4"])
    assert slot["type"] == "frames"
    assert len(slot["files"]) == 20
    assert slot["timestamps"] == pytest.approx([k * 0.5 for k in range(20)], abs=0.01)
    frames = [stored(env, f) for f in slot["files"]]
    for data in frames:
        with Image.open(io.BytesIO(data)) as im:
            assert (im.format, im.size) == ("JPEG", (VIDEO_W, VIDEO_H))
    assert [frame_index(d) for d in frames] == [15 * k for k in range(20)]
    assert sha256_file(drop / "clip.mp4") == sha256_digest(source)
    spool = env.state / "spool"
    assert not spool.exists() or not [p for p in spool.rglob("*") if p.is_file()]
    reason = failures(env)["/bad.mp4"]
    assert "bad.mp4" in reason and "video" in reason, reason


def test_video_at_2997_sampled_at_2997_keeps_every_frame(env: Env) -> None:
    drop = env.drop()
    env.write_config(
        [
            {
                "name": "w",
                "source": str(drop),
                "dataset": "ds",
                "video": {"mode": "frames", "fps": 29.97, "format": "png"},
            }
        ]
    )
    make_video(drop / "ntsc.mp4", 60, 30000 / 1001)
    sync(env)

    slot = only_slot(env.items_by_key()["/ntsc.mp4"])
    assert slot["type"] == "frames"
    assert len(slot["files"]) == 60
    assert slot["timestamps"] == pytest.approx([i * 1001 / 30000 for i in range(60)], abs=0.01)
    frames = [stored(env, f) for f in slot["files"]]
    assert Image.open(io.BytesIO(frames[0])).format == "PNG"
    assert [frame_index(d) for d in frames] == list(range(60))


def test_native_video_uploads_the_file_with_an_fps_hint(env: Env) -> None:
    drop = env.drop()
    env.write_config(
        [
            {
                "name": "w",
                "source": str(drop),
                "dataset": "ds",
                "video": {"mode": "native", "fps": 5},
            }
        ]
    )
    source = make_video(drop / "clip.mp4", 30, 30.0)
    sync(env)

    slot = only_slot(env.items_by_key()["/clip.mp4"])
    assert slot["type"] == "video"
    assert slot["fps"] == 5
    assert slot["files"] == [
        {"name": "clip.mp4", "digest": sha256_digest(source), "size": len(source)}
    ]
    assert stored(env, slot["files"][0]) == source


# --- 3. images ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_rotated_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6000×4000 stored, EXIF orientation 6 (shown rotated 90° clockwise: 4000×6000),
    with a red block in the stored top-left corner, which shows at the top right."""
    path = tmp_path_factory.mktemp("images") / "big.jpg"
    im = Image.new("RGB", (6000, 4000), (200, 200, 200))
    im.paste((255, 0, 0), (0, 0, 600, 400))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, format="JPEG", quality=85, exif=exif.tobytes())
    return path


def test_oversize_jpeg_is_stored_downscaled_and_upright(env: Env, big_rotated_jpeg: Path) -> None:
    drop = env.drop()
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds"}])
    original = drop / "big.jpg"
    shutil.copyfile(big_rotated_jpeg, original)
    before = sha256_file(original)
    sync(env)

    assert sha256_file(original) == before, "the original was modified"
    slot = only_slot(env.items_by_key()["/big.jpg"])
    assert slot["type"] == "image"
    [f] = slot["files"]
    assert f["digest"] != before
    data = stored(env, f)
    assert (f["size"], f["digest"]) == (len(data), sha256_digest(data))
    with Image.open(io.BytesIO(data)) as im:
        assert im.getexif().get(0x0112, 1) == 1, "still asks viewers to rotate"
        width, height = im.size
        assert height == 5000 and 3330 <= width <= 3334, im.size
        rgb = im.convert("RGB")
        # The marker: stored top-left → shown top-right once rotated 90° clockwise.
        r, g, b = rgb.getpixel((width - 100, 100))
        assert r > 200 and g < 60 and b < 60, (r, g, b)
        assert rgb.getpixel((100, 100)) == pytest.approx((200, 200, 200), abs=8)


def test_oversize_rejected_truncated_fails_small_stored_unchanged(
    env: Env, big_rotated_jpeg: Path
) -> None:
    drop = env.drop()
    env.write_config(
        [
            {
                "name": "w",
                "source": str(drop),
                "dataset": "ds",
                "images": {"oversize": "reject"},
            }
        ]
    )
    shutil.copyfile(big_rotated_jpeg, drop / "big.jpg")
    whole = jpeg(drop / "whole.jpg", (320, 240), (10, 120, 200))
    (drop / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    small = png(drop / "small.png", (40, 30), (1, 2, 3))
    hashes = {p.name: sha256_file(p) for p in drop.iterdir()}
    sync(env, rc=1)

    assert {p.name: sha256_file(p) for p in drop.iterdir()} == hashes
    items = env.items_by_key()
    assert set(items) == {"/whole.jpg", "/small.png"}
    for name, data in [("whole.jpg", whole), ("small.png", small)]:
        slot = only_slot(items[f"/{name}"])
        assert slot["type"] == "image"
        assert slot["files"] == [{"name": name, "digest": sha256_digest(data), "size": len(data)}]
    errors = failures(env)
    assert set(errors) == {"/big.jpg", "/cut.jpg"}
    assert "big.jpg" in errors["/big.jpg"], errors
    assert re.search(r"(4000|6000)\s*[×x]\s*(6000|4000)", errors["/big.jpg"]), errors
    assert "cut.jpg" in errors["/cut.jpg"] and "truncated" in errors["/cut.jpg"], errors


# --- 4. DICOM de-identification -------------------------------------------------------------


def identifiable_series(dest: Path, seed: int) -> list[Path]:
    """MR700 under shuffled names, with a birth date added (the test files have none)."""
    copies = copy_shuffled(series_files(MR700), dest, seed)
    for p in copies:
        ds = pydicom.dcmread(p)
        assert (str(ds.PatientName), ds.PatientID) == (PATIENT_NAME, PATIENT_ID)
        ds.PatientBirthDate = BIRTH_DATE
        ds.save_as(p)
    return copies


def test_deidentified_series_keeps_pixels_and_maps_uids_stably(env: Env) -> None:
    drop = env.drop()
    env.write_config(
        [
            {
                "name": "w",
                "source": str(drop),
                "dataset": "ds",
                "group": {"mode": "series"},
                "dicom": {"deidentify": True},
            }
        ]
    )
    copies = identifiable_series(drop / "scan1", seed=5)
    loose = drop / "single.dcm"  # a loose DICOM file is de-identified too
    shutil.copyfile(DICOM_DATA / "CT_small.dcm", loose)
    hashes = {p: sha256_file(p) for p in [*copies, loose]}
    originals = {instance(p): pydicom.dcmread(p) for p in copies}
    first = sync(env)

    assert {p: sha256_file(p) for p in hashes} == hashes, "an original was modified"
    single = only_slot(env.items_by_key()["/single.dcm"])
    assert single["type"] == "dicom"
    single_ds = dcm(stored(env, single["files"][0]))
    source_ds = pydicom.dcmread(loose)
    assert str(single_ds.get("PatientName", "")) != str(source_ds.PatientName)
    assert single_ds.get("PatientID", "") != source_ds.PatientID
    assert single_ds.SOPInstanceUID != source_ds.SOPInstanceUID
    assert single_ds.PixelData == source_ds.PixelData

    item = env.items_by_key()["/scan1"]
    slot = only_slot(item)
    assert (slot["name"], slot["type"], len(slot["files"])) == ("scan1", "dicom", 7)
    assert not {f["digest"] for f in slot["files"]} & {hashes[p] for p in copies}
    stored_ds = [dcm(stored(env, f)) for f in slot["files"]]
    assert [int(ds.InstanceNumber) for ds in stored_ds] == [1, 2, 3, 4, 5, 6, 7]
    src_series = originals[1].SeriesInstanceUID
    new_series = {ds.SeriesInstanceUID for ds in stored_ds}
    assert len(new_series) == 1 and src_series not in new_series
    for f, ds in zip(slot["files"], stored_ds, strict=True):
        src = originals[int(ds.InstanceNumber)]
        raw = stored(env, f)
        for secret in (PATIENT_NAME, PATIENT_ID, BIRTH_DATE, src.SOPInstanceUID):
            assert secret.encode() not in raw, f"{secret} left in {f['name']}"
        assert str(ds.get("PatientName", "")) != PATIENT_NAME
        assert ds.get("PatientID", "") != PATIENT_ID
        assert not ds.get("PatientBirthDate")
        assert ds.StudyInstanceUID != src.StudyInstanceUID
        assert ds.SOPInstanceUID != src.SOPInstanceUID
        assert ds.PixelData == src.PixelData
    for value in (PATIENT_NAME, PATIENT_ID, src_series):
        assert value not in str(item["metadata"]), item["metadata"]
        assert value not in first.stderr
    assert item["metadata"].get("SeriesInstanceUID") in (None, *new_series)

    # A second run (a new process, the key from state_dir) maps the same UIDs the same way.
    again = identifiable_series(drop / "scan1_again", seed=6)
    assert {sha256_file(p) for p in again} == {hashes[p] for p in copies}
    sync(env)
    items = env.items_by_key()
    assert items["/scan1"]["version"] == 1
    second = [dcm(stored(env, f)) for f in only_slot(items["/scan1_again"])["files"]]
    assert [ds.SeriesInstanceUID for ds in second] == [ds.SeriesInstanceUID for ds in stored_ds]
    assert [ds.SOPInstanceUID for ds in second] == [ds.SOPInstanceUID for ds in stored_ds]


def test_loose_dicom_without_extension_is_found_by_content_and_deidentified(env: Env) -> None:
    drop = env.drop()
    env.write_config(
        [{"name": "w", "source": str(drop), "dataset": "ds", "dicom": {"deidentify": True}}]
    )
    source = series_files(MR700)[0]
    shutil.copyfile(source, drop / "scan")  # DICOM by its preamble only
    sync(env)

    slot = only_slot(env.items_by_key()["/scan"])
    raw = stored(env, slot["files"][0])
    assert PATIENT_NAME.encode() not in raw and PATIENT_ID.encode() not in raw
    assert slot["type"] == "dicom"
    assert dcm(raw).PixelData == pydicom.dcmread(source).PixelData


# --- touches -------------------------------------------------------------------------------


def test_touched_media_items_are_not_sent_again(env: Env) -> None:
    drop = env.drop()
    env.write_config(
        [
            {
                "name": "w",
                "source": str(drop),
                "dataset": "ds",
                "group": {"mode": "series"},
                "video": {"mode": "frames", "fps": 2},
                "dicom": {"deidentify": True},
            }
        ]
    )
    make_video(drop / "clip.mp4", 30, 30.0)
    jpeg(drop / "photo.jpg", (64, 48), (90, 60, 30))
    copy_shuffled(series_files(MR700), drop / "scan", seed=9)
    sync(env)
    keys = {"/clip.mp4", "/photo.jpg", "/scan"}
    before = env.items_by_key()
    assert set(before) == keys
    assert only_slot(before["/clip.mp4"])["type"] == "frames"

    for p in drop.rglob("*"):
        if p.is_file():
            st = p.stat()
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    proc = sync(env)
    assert env.items_by_key() == before
    assert {e["item"] for e in log_events(proc, "unchanged content, nothing sent")} == keys
    assert log_events(proc, "synced") == []
