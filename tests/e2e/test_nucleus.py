"""The `nucleus` backend end to end: the real CLI as a subprocess (`ingestd sync` for the
deterministic flows, `ingestd run` where a daemon must be killed) against the fake Scale
Nucleus API (tests/support/fakes/nucleus.py) served from a thread of this process.

Files are real: images written by Pillow, a video by OpenCV's VideoWriter, DICOM files
from pydicom's bundled test data. Checks go to the fake's remote state: which
reference_ids exist, their metadata, and the digests of the bytes it received.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.support.daemon import Env, synced_lines
from tests.support.fakes.nucleus import FakeNucleus, FakeNucleusThread
from tests.support.wait import wait_for

KEY_ENV = "NUCLEUS_E2E_API_KEY"
MR700 = (
    Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892003" / "MR700"
)


@pytest.fixture
def nucleus(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeNucleus, str]]:
    fake = FakeNucleus(job_polls=1)
    # The daemon and every CLI call inherit this process's environment.
    monkeypatch.setenv(KEY_ENV, fake.api_key)
    with FakeNucleusThread(fake) as server:
        yield fake, server.url


def backend(url: str) -> dict[str, Any]:
    return {
        "kind": "nucleus",
        "api_key_env": KEY_ENV,
        "base_url": url,
        "requests_per_minute": 60000,
    }


def image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def video(path: Path, frames: int, fps: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (64, 48))
    assert writer.isOpened(), "this OpenCV build cannot write mp4v"
    for i in range(frames):
        writer.write(np.full((48, 64, 3), (i * 8) % 256, np.uint8))
    writer.release()


def failures(env: Env, watch: str) -> dict[str, str]:
    return {e["item"]: e["error"] for e in env.watch_status(watch)["last_errors"]}


def test_items_groups_media_changes_and_deletes(env: Env, nucleus: tuple[FakeNucleus, str]) -> None:
    fake, url = nucleus
    drops = {n: env.drop(n) for n in ("photos", "grid", "chan", "ct", "vid")}
    common = {"dataset": "ds", "settle": "0.3s"}
    env.write_config(
        [
            {
                "name": "photos",
                "source": str(drops["photos"]),
                "path": "/photos",
                "metadata": {"sidecar": "{name}.json"},
                "on_delete": "delete",
                **common,
            },
            {
                "name": "grid",
                "source": str(drops["grid"]),
                "path": "/grid",
                "group": {"mode": "slots"},
                **common,
            },
            {
                "name": "chan",
                "source": str(drops["chan"]),
                "path": "/chan",
                "group": {"mode": "channels"},
                **common,
            },
            {
                "name": "ct",
                "source": str(drops["ct"]),
                "path": "/ct",
                "group": {"mode": "series"},
                **common,
            },
            {
                "name": "vid",
                "source": str(drops["vid"]),
                "path": "/vid",
                "video": {"mode": "frames", "fps": 1},
                **common,
            },
        ],
        backend=backend(url),
    )
    d_a = image(drops["photos"] / "a.jpg", (200, 10, 10))
    (drops["photos"] / "a.jpg.json").write_text(json.dumps({"camera": "north", "lap": 1}))
    d_b = image(drops["photos"] / "sub" / "b.png", (10, 200, 10))
    image(drops["photos"] / "c.png", (10, 10, 200))
    grid = [image(drops["grid"] / "scan1" / f"{i}.png", (i * 60, 0, 0)) for i in range(3)]
    chan = [
        image(drops["chan"] / "cell" / f"{c}.png", (0, i * 90, 0))
        for i, c in enumerate(("dapi", "gfp"))
    ]
    (drops["ct"] / "series1").mkdir()
    for f in sorted(MR700.iterdir())[:3]:
        shutil.copy(f, drops["ct"] / "series1" / f"{f.name}.dcm")
    video(drops["vid"] / "clip.mp4", 30, 10.0)  # 3 s: frames at 0, 1 and 2 s

    proc = env.cli("sync")
    assert proc.returncode == 1, proc.stderr  # the DICOM series cannot go to Nucleus

    items = fake.items("ds")
    assert items["/photos/a.jpg"]["metadata"] == {"camera": "north", "lap": 1}
    assert items["/photos/a.jpg"]["image"]["digest"] == d_a
    assert items["/photos/sub/b.png"]["image"]["digest"] == d_b
    # a multi-slot group: one image per slot, the first under the item key
    assert items["/grid/scan1"]["image"]["digest"] == grid[0]
    assert items["/grid/scan1#2"]["image"]["digest"] == grid[2]
    assert items["/grid/scan1"]["metadata"]["ingestd_parts"] == ["/grid/scan1#1", "/grid/scan1#2"]
    # channels: parts named after the files
    assert items["/chan/cell#gfp.png"]["image"]["digest"] == chan[1]
    assert items["/chan/cell"]["metadata"]["ingestd_slot"] == "dapi.png"
    # sampled frames: one image per frame with its time
    frames = sorted((k for k in items if k.startswith("/vid/clip.mp4")), key=len)
    assert len(frames) == 3, frames
    times = sorted(items[k]["metadata"]["ingestd_time"] for k in frames)
    assert times == pytest.approx([0.0, 1.0, 2.0], abs=0.05)
    # DICOM: a clear failure, nothing sent
    assert not [k for k in items if k.startswith("/ct")]
    reason = failures(env, "ct")["/ct/series1"]
    assert "DICOM" in reason and "PNG/JPEG" in reason, reason
    expected = {
        "/photos/a.jpg",
        "/photos/sub/b.png",
        "/photos/c.png",
        "/grid/scan1",
        "/grid/scan1#1",
        "/grid/scan1#2",
        "/chan/cell",
        "/chan/cell#gfp.png",
        *frames,
    }
    assert set(items) == expected

    # A sidecar edit that drops a key, a content change inside a group, a deletion.
    (drops["photos"] / "a.jpg.json").write_text(json.dumps({"camera": "south"}))
    grid[1] = image(drops["grid"] / "scan1" / "1.png", (1, 2, 3))
    (drops["photos"] / "sub" / "b.png").unlink()
    proc = env.cli("sync")
    assert proc.returncode == 1, proc.stderr

    after = fake.items("ds")
    assert after["/photos/a.jpg"]["metadata"] == {"camera": "south"}  # lap is gone
    assert after["/photos/a.jpg"]["image"]["digest"] == d_a
    assert after["/grid/scan1#1"]["image"]["digest"] == grid[1]
    assert "/photos/sub/b.png" not in after
    assert set(after) == expected - {"/photos/sub/b.png"}  # no duplicates, nothing stray
    assert len(fake.dataset_ids("ds")) == 1
    # untouched items were not sent again
    assert after["/photos/c.png"]["version"] == 1
    assert after["/chan/cell"]["version"] == 1


def test_429_storm_with_retry_after(env: Env, nucleus: tuple[FakeNucleus, str]) -> None:
    fake, url = nucleus
    drop = env.drop()
    env.write_config(
        [{"name": "w", "source": str(drop), "dataset": "ds", "settle": "0.3s"}],
        backend=backend(url),
    )
    digests = {f"/{i}.png": image(drop / f"{i}.png", (i * 40, 9, 9)) for i in range(4)}
    fake.storm(3, retry_after="1")
    proc = env.cli("sync")
    assert proc.returncode == 0, proc.stderr
    log = fake.requests()
    storm = [r for r in log if r.status == 429]
    assert len(storm) == 3
    # The storm hits the dataset lookup, which the workers share: after each 429 the
    # next request came no sooner than Retry-After allowed.
    for r in storm:
        nxt = next(x for x in log if x.at > r.at)
        assert nxt.at - r.at >= 0.95, (r, nxt)
    items = fake.items("ds")
    assert {k: v["image"]["digest"] for k, v in items.items()} == digests


def test_a_folder_of_small_images_goes_in_few_requests(
    env: Env, nucleus: tuple[FakeNucleus, str]
) -> None:
    """The sync step hands the sink groups from its backlog: 45 images are appended
    10 a request, and their jobs awaited together, not one request and poll each."""
    fake, url = nucleus
    drop = env.drop()
    env.write_config(
        [{"name": "w", "source": str(drop), "dataset": "ds", "settle": "0s"}],
        backend=backend(url),
    )
    digests = {f"/{i:02d}.png": image(drop / f"{i:02d}.png", (i * 5, 9, 9)) for i in range(45)}
    proc = env.cli("sync")
    assert proc.returncode == 0, proc.stderr
    items = fake.items("ds")
    assert {k: v["image"]["digest"] for k, v in items.items()} == digests
    assert all(fake.blobs("ds")[k] == (drop / k[1:]).read_bytes() for k in digests)
    assert len(fake.appends()) <= 8  # 5 if one group took them all
    assert len(fake.job_answers()) <= 12


def test_restart_mid_upload_leaves_no_duplicates(
    env: Env, nucleus: tuple[FakeNucleus, str]
) -> None:
    fake, url = nucleus
    drop = env.drop()
    env.write_config(
        [{"name": "w", "source": str(drop), "dataset": "ds", "settle": "0.3s"}],
        backend=backend(url),
    )
    fake.hold()  # uploads are stored, then their answers wait
    env.start()
    digests = {
        f"/{n}.png": image(drop / f"{n}.png", c) for n, c in (("x", (5, 5, 5)), ("y", (9, 9, 9)))
    }
    wait_for(lambda: fake.stored_while_held >= 1, 30, what="an upload to reach the fake")
    env.kill()  # SIGKILL while Nucleus holds the item but the ledger does not know it
    fake.release()
    env.restart()
    wait_for(
        lambda: env.watch_status("w")["synced"] == 2, 30, what="both items synced after restart"
    )
    env.stop()
    items = fake.items("ds")
    assert {k: v["image"]["digest"] for k, v in items.items()} == digests
    assert max(v["version"] for v in items.values()) >= 2  # re-sent as an update, not a copy
    assert len(fake.dataset_ids("ds")) == 1
    assert synced_lines(env, "/x.png", "w") and synced_lines(env, "/y.png", "w")


def registered_watch(emulator: Any, bucket: str) -> dict[str, Any]:
    return {
        "name": "w",
        "source": emulator.url(bucket, "cams"),
        "source_options": emulator.source_options,
        "transfer": "register",
        "dataset": "ds",
    }


def test_azure_objects_are_registered_by_their_https_url(
    env: Env,
    nucleus: tuple[FakeNucleus, str],
    azure_emulator: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nucleus's Azure integration reads https://<account>.blob.core.windows.net/
    <container>/<key>: that URL is the image's, no bytes move, and the sync step's group
    of bucket objects is one import job."""
    fake, url = nucleus
    for k, v in azure_emulator.env.items():
        monkeypatch.setenv(k, v)
    container = azure_emulator.create_bucket("nuc")
    for name in ("x.jpg", "y #1.jpg"):
        path = env.root / "src" / name
        image(path, (5, 5, 5))
        azure_emulator.put(container, f"cams/{name}", path.read_bytes())
    env.write_config([registered_watch(azure_emulator, container)], backend=backend(url))
    proc = env.cli("sync")
    assert proc.returncode == 0, proc.stderr
    account = azure_emulator.source_options["account"]
    base = f"https://{account}.blob.core.windows.net/{container}/cams"
    items = fake.items("ds")
    assert {k: v["image_url"] for k, v in items.items()} == {
        "/x.jpg": f"{base}/x.jpg",
        "/y #1.jpg": f"{base}/y%20%231.jpg",
    }
    assert fake.appends() == []  # no bytes moved
    assert len(fake.requests("POST", "/append")) == 1  # both in one import job


def test_objects_nucleus_cannot_fetch_fail_with_a_reason(
    env: Env,
    nucleus: tuple[FakeNucleus, str],
    s3_emulator: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An S3-compatible store on a plain-http endpoint (the emulator here): its s3:// URL
    would name a bucket on AWS and it has no https URL, so each item fails saying so,
    and nothing reaches Nucleus."""
    fake, url = nucleus
    for k, v in s3_emulator.env.items():
        monkeypatch.setenv(k, v)
    bucket = s3_emulator.create_bucket("nuc")
    path = env.root / "src" / "x.jpg"
    image(path, (5, 5, 5))
    s3_emulator.put(bucket, "cams/x.jpg", path.read_bytes())
    env.write_config([registered_watch(s3_emulator, bucket)], backend=backend(url))
    proc = env.cli("sync")
    assert proc.returncode == 1, proc.stderr
    reason = failures(env, "w")["/x.jpg"]
    assert "no https URL" in reason and "transfer: copy" in reason, reason
    assert fake.items("ds") == {}
    assert fake.requests("POST", "/append") == []
