"""The labelbox backend end to end: the real CLI (`ingestd sync`, `ingestd run`) against
the fake Labelbox API (tests/support/fakes/labelbox.py) running as its own process, with real
files: PIL images, pydicom's bundled MR series, an OpenCV-written video. Every check
reads the fake's remote state: rows by global key, their hosted bytes, attachments and
metadata, and counts that would show a duplicate."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.support.daemon import Env
from tests.support.fakes.labelbox import FakeProcess
from tests.support.wait import wait_for

KEY = "lb-e2e-key-93c1f0d2a8"
ENV = "INGESTD_TEST_LABELBOX_KEY"
MR700 = (
    Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892003" / "MR700"
)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProcess]:
    monkeypatch.setenv(ENV, KEY)  # the CLI and the daemon inherit it
    proc = FakeProcess(KEY)
    yield proc
    proc.stop()


def backend(fake: FakeProcess) -> dict[str, Any]:
    return {"kind": "labelbox", "api_key_env": ENV, "base_url": fake.url}


def image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix == ".png" else "JPEG"
    Image.new("RGB", size, color).save(path, format=fmt)
    return path.read_bytes()


def video(path: Path, seconds: int, fps: int = 10) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (64, 48))
    assert writer.isOpened(), "this OpenCV build cannot write mp4v"
    for i in range(seconds * fps):
        writer.write(np.full((48, 64, 3), (i * 7) % 256, np.uint8))
    writer.release()


def sync(env: Env, rc: int = 0) -> str:
    proc = env.cli("sync", timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == rc, f"sync exited {proc.returncode}:\n{out}"
    assert KEY not in out
    return out


def rows(fake: FakeProcess, dataset: str = "ds") -> dict[str, dict[str, Any]]:
    return dict(fake.state()["datasets"].get(dataset, {}))


def gk(key: str, dataset: str = "ds") -> str:
    return f"ingestd:{dataset}:{key}"


def sha(data: bytes | None) -> str:
    assert data is not None, "the hosted URL serves nothing"
    return hashlib.sha256(data).hexdigest()


def test_items_of_every_kind_then_changes_and_a_deletion(env: Env, fake: FakeProcess) -> None:
    drop = env.drop()
    watches = [
        {
            "name": "imgs",
            "source": str(drop / "imgs"),
            "dataset": "ds",
            "metadata": {"sidecar": "{name}.json"},
            "on_delete": "delete",
        },
        {
            "name": "slots",
            "source": str(drop / "slots"),
            "dataset": "ds",
            "path": "/slots",
            "group": {"mode": "slots"},
        },
        {
            "name": "chan",
            "source": str(drop / "chan"),
            "dataset": "ds",
            "path": "/chan",
            "group": {"mode": "channels"},
        },
        {
            "name": "dicom",
            "source": str(drop / "dicom"),
            "dataset": "ds",
            "path": "/dicom",
            "group": {"mode": "series"},
        },
        {
            "name": "video",
            "source": str(drop / "video"),
            "dataset": "ds",
            "path": "/video",
            "video": {"mode": "frames", "fps": 1},
        },
    ]
    for w in watches:
        Path(str(w["source"])).mkdir(parents=True)
    env.write_config(watches, backend=backend(fake))

    a = image(drop / "imgs" / "a.jpg", (200, 10, 10))
    hashed = image(drop / "imgs" / "take #2.png", (10, 200, 10))
    image(drop / "imgs" / "gone.jpg", (10, 10, 200))
    (drop / "imgs" / "a.jpg.json").write_text(json.dumps({"camera": "north", "iso": 100}))
    views = [image(drop / "slots" / "pair" / f"{i}.jpg", (i * 60, 0, 0)) for i in range(3)]
    channels = [
        image(drop / "chan" / "cell" / f"{c}.png", (0, i * 90, 0)) for i, c in enumerate("bgr")
    ]
    shutil.copytree(MR700, drop / "dicom" / "mr")
    video(drop / "video" / "clip.mp4", seconds=3)

    sync(env)
    state = rows(fake)
    assert set(state) == {
        gk("/a.jpg"),
        gk("/take #2.png"),
        gk("/gone.jpg"),
        gk("/slots/pair"),
        gk("/chan/cell"),
        gk("/dicom/mr"),
        gk("/video/clip.mp4"),
    }
    row = state[gk("/a.jpg")]
    assert sha(fake.fetch(row["row_data"])) == sha(a)
    assert row["metadata"] == {"camera": "north", "iso": 100.0}
    assert sha(fake.fetch(state[gk("/take #2.png")]["row_data"])) == sha(hashed)
    assert state[gk("/take #2.png")]["external_id"] == "/take #2.png"

    pair = state[gk("/slots/pair")]
    assert sha(fake.fetch(pair["row_data"])) == sha(views[0])
    assert [(x["type"], sha(fake.fetch(x["value"]))) for x in pair["attachments"]] == [
        ("IMAGE", sha(v)) for v in views[1:]
    ]
    cell = state[gk("/chan/cell")]
    assert sha(fake.fetch(cell["row_data"])) == sha(channels[0])
    assert [(x["type"], x["name"]) for x in cell["attachments"]] == [
        ("IMAGE_OVERLAY", "g.png"),
        ("IMAGE_OVERLAY", "r.png"),
    ]
    mr = state[gk("/dicom/mr")]
    # labelbox 7.x knows no DICOM media type: the row leaves it to Labelbox
    assert mr["media_type"] is None and len(mr["attachments"]) == 6  # 7 slices
    slices = [fake.fetch(mr["row_data"])] + [fake.fetch(x["value"]) for x in mr["attachments"]]
    numbers = [
        int(pydicom.dcmread(_bytes_io(s), stop_before_pixels=True).InstanceNumber) for s in slices
    ]
    assert numbers == sorted(numbers) and len(set(numbers)) == 7
    clip = state[gk("/video/clip.mp4")]
    assert clip["media_type"] == "IMAGE" and len(clip["attachments"]) == 2  # 3 frames at 1 fps
    assert [x["name"].split()[0] for x in clip["attachments"]] == ["t=1.000s", "t=2.000s"]

    # A sidecar edit, a content change and a deletion, in one more pass.
    (drop / "imgs" / "a.jpg.json").write_text(json.dumps({"camera": "south"}))
    changed = image(drop / "imgs" / "take #2.png", (90, 90, 90))
    (drop / "imgs" / "gone.jpg").unlink()
    sync(env)
    after = rows(fake)
    assert set(after) == set(state) - {gk("/gone.jpg")}
    assert after[gk("/a.jpg")]["id"] == row["id"]
    assert after[gk("/a.jpg")]["metadata"] == {"camera": "south"}
    # A sidecar-only change updates metadata in place: the bytes are not uploaded again.
    assert after[gk("/a.jpg")]["row_data"] == row["row_data"]
    assert after[gk("/take #2.png")]["id"] == state[gk("/take #2.png")]["id"]
    assert sha(fake.fetch(after[gk("/take #2.png")]["row_data"])) == sha(changed)
    assert fake.state()["dataset_count"] == {"ds": 1}

    sync(env)  # nothing changed: nothing is sent again
    assert rows(fake) == after


def _bytes_io(data: bytes | None) -> Any:
    import io

    assert data is not None
    return io.BytesIO(data)


def test_a_429_storm_ends_with_everything_synced(env: Env, fake: FakeProcess) -> None:
    drop = env.drop()
    # One worker: requests go one after another, so the one after a 429 is its retry.
    env.write_config(
        [{"name": "w", "source": str(drop), "dataset": "ds"}], backend=backend(fake), workers=1
    )
    for i in range(4):
        image(drop / f"{i}.jpg", (i * 50, 0, 0))
    fake.fault(3, status=429, retry_after="1")
    sync(env)
    assert set(rows(fake)) == {gk(f"/{i}.jpg") for i in range(4)}
    requests = fake.state()["requests"]
    storm = [i for i, r in enumerate(requests) if r[2] == 429]
    assert len(storm) == 3
    for i in storm:  # each 429 was followed by at least its Retry-After of quiet
        if i + 1 < len(requests):
            assert requests[i + 1][0] - requests[i][0] >= 0.95


def test_a_restart_mid_upload_leaves_no_duplicate(env: Env, fake: FakeProcess) -> None:
    drop = env.drop()
    env.write_config(
        [{"name": "w", "source": str(drop), "dataset": "ds", "settle": "0.3s"}],
        backend=backend(fake),
    )
    env.start()
    fake.hold(True)
    data = image(drop / "a.jpg", (1, 2, 3), size=(640, 480))
    wait_for(lambda: fake.state()["held"] >= 1, 30, what="the upload to reach the fake")
    env.stop(signal.SIGKILL)  # a power cut mid-upload
    fake.hold(False)
    env.restart()
    wait_for(lambda: gk("/a.jpg") in rows(fake), 30, what="the row after the restart")
    env.stop()
    state = rows(fake)
    assert list(state) == [gk("/a.jpg")]
    assert sha(fake.fetch(state[gk("/a.jpg")]["row_data"])) == sha(data)
    assert KEY not in env.log()


def registered_watch(emulator: Any, bucket: str) -> dict[str, Any]:
    return {
        "name": "w",
        "source": emulator.url(bucket, "cams"),
        "source_options": emulator.source_options,
        "transfer": "register",
        "dataset": "ds",
    }


def test_azure_objects_are_registered_by_their_https_url(
    env: Env, fake: FakeProcess, azure_emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Labelbox's Azure integration reads https://<account>.blob.core.windows.net/
    <container>/<key>: that URL is the row's asset, and no bytes move. The dataset
    ingestd creates gets the organisation's default integration, as the SDK's
    create_dataset attaches it."""
    for k, v in azure_emulator.env.items():
        monkeypatch.setenv(k, v)
    fake.add_integration("azure-read")
    container = azure_emulator.create_bucket("lb")
    for name in ("x.jpg", "y #1.jpg"):
        path = env.root / "src" / name
        azure_emulator.put(container, f"cams/{name}", image(path, (5, 5, 5)))
    env.write_config([registered_watch(azure_emulator, container)], backend=backend(fake))
    sync(env)
    state = rows(fake)
    account = azure_emulator.source_options["account"]
    base = f"https://{account}.blob.core.windows.net/{container}/cams"
    assert {k: v["row_data"] for k, v in state.items()} == {
        gk("/x.jpg"): f"{base}/x.jpg",
        gk("/y #1.jpg"): f"{base}/y%20%231.jpg",
    }
    assert fake.state()["signers"] == {"ds": "azure-read"}
    uploaded = {f["filename"] for f in fake.state()["files"].values()}
    assert uploaded <= {"json_import.json", "manifest.json"}  # no object bytes moved
    assert fake.state()["upsert_tasks"] == [2]  # both rows in one task


def test_objects_labelbox_cannot_fetch_fail_with_a_reason(
    env: Env, fake: FakeProcess, s3_emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An S3-compatible store on a plain-http endpoint (the emulator here) has no URL
    Labelbox could read: each item fails saying so, and nothing reaches Labelbox."""
    for k, v in s3_emulator.env.items():
        monkeypatch.setenv(k, v)
    fake.add_integration("s3-read")
    bucket = s3_emulator.create_bucket("lb")
    s3_emulator.put(bucket, "cams/x.jpg", image(env.root / "src" / "x.jpg", (5, 5, 5)))
    env.write_config([registered_watch(s3_emulator, bucket)], backend=backend(fake))
    sync(env, rc=1)
    errors = {e["item"]: e["error"] for e in env.watch_status("w")["last_errors"]}
    assert "not an https URL" in errors["/x.jpg"] and "transfer: copy" in errors["/x.jpg"]
    assert rows(fake) == {}
