"""The dashboard in a real headless browser: Debian's chromium driven by Playwright's
library (no browser download), against `ingestd run` and `ingestd serve` running as
subprocesses on real folders and a real store.

The browser is /usr/bin/chromium (Debian's `chromium` package, which `.ci/run` installs).
Without it the tests skip, and fail under CI=true (`need`), where a skipped browser
test would hide a broken dashboard.

A screenshot of the daemon's dashboard is written to the test's tmp folder, and to
docs/dashboard.png when INGESTD_SCREENSHOT=1.
"""

from __future__ import annotations

import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from ingestd.media.thumbs import render
from PIL import Image

from tests.support.daemon import REPO, Env, log_lines, synced_lines
from tests.support.need import need
from tests.support.serve import Server
from tests.support.wait import wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000
MR700 = Path(pydicom.__file__).parent / "data/test_files/dicomdirtests/98892003/MR700"


@pytest.fixture(scope="session")
def chromium() -> str:
    need(
        os.path.exists(CHROMIUM),
        f"the dashboard test needs Debian's chromium at {CHROMIUM} (`bash .ci/run` installs it)",
    )
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    # Playwright's sync API keeps an event loop running in this thread while it is
    # open: close it with this module, or every later asyncio test fails to start.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def control_url(env: Env) -> str:
    addr = env.state / "control.addr"
    wait_for(addr.exists, 30, what=f"the daemon to write {addr}")
    return addr.read_text().strip()


def photo(path: Path, hue: int, size: tuple[int, int] = (640, 480)) -> None:
    """A picture with some structure (a thumbnail of a flat colour proves little)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack(
        [(xx * 255 // w + hue) % 256, yy * 255 // h, np.full_like(xx, (hue * 3) % 256)], -1
    ).astype(np.uint8)
    Image.fromarray(a).save(path, quality=90)


def video(path: Path, frames: int = 30, fps: float = 10.0) -> None:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (320, 240))
    for i in range(frames):
        f = np.zeros((240, 320, 3), np.uint8)
        cv2.circle(f, (20 + i * 9, 120), 30, (40, 200, 255), -1)
        w.write(f)
    w.release()


def synced_shown(page: Any, watch: str) -> int:
    text = page.locator(f'[data-watch="{watch}"] [data-field="synced"]').inner_text()
    return int(text) if text.isdigit() else -1


def thumbnail_loaded(page: Any, tile_selector: str) -> bool:
    return bool(
        page.evaluate(
            """(sel) => { const img = document.querySelector(sel + " .thumb img");
                          return !!img && img.complete && img.naturalWidth > 0; }""",
            tile_selector,
        )
    )


def test_daemon_dashboard(env: Env, page: Any, tmp_path: Path) -> None:
    drop = env.drop()
    scans = env.drop("scans")
    env.write_config(
        [
            {"name": "photos", "source": str(drop), "dataset": "ds"},
            {"name": "scans", "source": str(scans), "dataset": "mr", "group": {"mode": "series"}},
        ]
    )
    photo(drop / "beach.jpg", 10)
    photo(drop / "forest.jpg", 90)
    shutil.copytree(MR700, scans / "MR700")  # a 7-slice MR series
    env.start()
    base = control_url(env)

    page.goto(base + "/")
    page.wait_for_selector('[data-watch="photos"]')
    wait_for(lambda: synced_shown(page, "photos") == 2, 60, what="the page to show 2 synced")

    # Counts change on the page, without a reload, while files are dropped.
    seen = {2}
    video(drop / "clip.mp4")
    for i in range(4):
        photo(drop / f"new{i}.jpg", 30 * i + 5)
    wait_for(
        lambda: seen.add(synced_shown(page, "photos")) or 7 in seen,
        60,
        interval=0.05,
        what="the page to count 7 synced",
    )
    assert min(seen) == 2 and max(seen) == 7
    assert page.locator('[data-watch="photos"] [data-field="rate"]').inner_text() != "0"

    # A corrupt image (a JPEG header, then zeros): its reason on the page is the ledger's.
    photo(tmp_path / "good.jpg", 200)
    good = (tmp_path / "good.jpg").read_bytes()
    broken = drop / "broken.jpg"
    broken.write_bytes(good[:4] + bytes(len(good) - 4))
    row = page.locator('tr[data-item="broken.jpg"]')
    row.wait_for()
    reason = row.locator("td.reason").inner_text()
    (error,) = env.watch_status("photos")["last_errors"]
    assert error["item"] == "/broken.jpg" and reason == error["error"]
    assert "broken.jpg" in reason
    assert page.locator('[data-watch="photos"] [data-field="failed"]').inner_text() == "1"

    # Retry re-queues it: the daemon tries the file again (still broken, it fails again).
    failures = len(log_lines(env, "item failed", item="/broken.jpg"))
    assert failures >= 1
    row.locator('button[data-action="retry-item"]').click()
    wait_for(
        lambda: log_lines(env, "retry requested on the control endpoint", item="broken.jpg"),
        30,
        what="the retry request to reach the daemon",
    )
    wait_for(
        lambda: len(log_lines(env, "item failed", item="/broken.jpg")) > failures,
        60,
        what="broken.jpg to be tried again after Retry",
    )
    (line,) = log_lines(env, "retry requested on the control endpoint", item="broken.jpg")
    assert line["queued"] == 1 and line["watch"] == "photos"

    # Thumbnails: an image, the video and the DICOM series load in the page.
    wait_for(
        lambda: thumbnail_loaded(page, '.tile[data-item="beach.jpg"]'),
        60,
        what="beach.jpg's thumbnail to load",
    )
    wait_for(
        lambda: thumbnail_loaded(page, '.tile[data-item="clip.mp4"]'),
        60,
        what="clip.mp4's thumbnail to load",
    )
    width = page.evaluate(
        """() => document.querySelector('.tile[data-item="beach.jpg"] .thumb img').naturalWidth"""
    )
    assert width == 256
    wait_for(
        lambda: thumbnail_loaded(page, '.tile[data-item="MR700"]'),
        60,
        what="the MR series' thumbnail to load",
    )
    # The series shows its middle slice by InstanceNumber (4 of 1..7), whatever the names.
    src = page.evaluate(
        """() => document.querySelector('.tile[data-item="MR700"] .thumb img').src"""
    )
    with urllib.request.urlopen(src, timeout=10) as r:
        shown = r.read()
    middle = next(p for p in MR700.iterdir() if pydicom.dcmread(p).InstanceNumber == 4)
    assert shown == render("dicom", str(middle))
    page.locator('tr[data-item="broken.jpg"]').wait_for()  # failed again after the retry

    # The picture for docs/: flows, a failed item with its reason, thumbnails.
    shot = page.screenshot(full_page=True)
    (tmp_path / "dashboard.png").write_bytes(shot)
    if os.environ.get("INGESTD_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        (REPO / "docs" / "dashboard.png").write_bytes(shot)

    # Now repaired the way `rsync -t` or a restore from backup would: same size, same
    # mtime, so the watch sees nothing to do and the item stays failed. The watch's
    # "Retry failed" sends it again, and this time it syncs.
    before = broken.stat()
    broken.write_bytes(good)
    os.utime(broken, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert env.watch_status("photos")["failed"] == 1
    page.locator('[data-watch="photos"] button[data-action="retry-watch"]').click()
    wait_for(
        lambda: (w := env.watch_status("photos"))["synced"] == 8 and w["failed"] == 0,
        60,
        what="the repaired broken.jpg to sync after the watch's Retry",
    )
    assert synced_lines(env, "/broken.jpg", "photos")
    wait_for(lambda: synced_shown(page, "photos") == 8, 30, what="the page to show 8 synced")
    page.locator('tr[data-item="broken.jpg"]').wait_for(state="detached")


def test_serve_dashboard(
    env: Env, page: Any, make_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token = "dashboard-test-token-0123456789"
    server: Server = make_server(token=token)
    monkeypatch.setenv("INGESTD_TEST_TOKEN", token)
    drop = env.drop()
    photo(drop / "one.jpg", 40)
    photo(drop / "two.jpg", 140)
    (drop / "cam").mkdir()
    video(drop / "cam" / "clip.mp4")
    env.write_config(
        [{"name": "w", "source": str(drop), "dataset": "shots", "video": {"mode": "native"}}],
        backend={"kind": "http", "url": server.url, "token_env": "INGESTD_TEST_TOKEN"},
    )
    done = env.cli("sync")
    assert done.returncode == 0, done.stderr

    page.goto(server.url + "/")
    # The server has tokens: the page asks for one before it shows anything.
    page.locator("#token").fill(token)
    page.locator("#token-form button").click()
    page.locator('[data-dataset="shots"]').wait_for()
    assert page.locator('[data-dataset="shots"]').inner_text() == "shots (3)"
    for key in ("/one.jpg", "/two.jpg", "/cam/clip.mp4"):
        page.locator(f'.tile[data-key="{key}"]').wait_for()
    wait_for(
        lambda: (
            thumbnail_loaded(page, '.tile[data-key="/one.jpg"]')
            and thumbnail_loaded(page, '.tile[data-key="/cam/clip.mp4"]')
        ),
        60,
        what="the serve dashboard's thumbnails to load",
    )
    assert len(list((server.store / "thumbs").rglob("*.jpg"))) >= 2
    page.screenshot(path=str(tmp_path / "serve-dashboard.png"), full_page=True)
    assert token not in server.log()
