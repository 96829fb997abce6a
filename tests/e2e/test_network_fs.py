"""Folders on network and FUSE file systems are polled (issue 14, point 8).

inotify sees only what passes through this machine's kernel: a file another machine
writes to an NFS or SMB share raises no event here. A bindfs mount stands in for the
share: files written into its backing folder A, not through the mount point B, are
what another machine's writes look like from here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Env, log_lines, sha256_digest
from tests.support.need import need
from tests.support.wait import wait_for


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def share(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(backing folder A, mount point B) with `bindfs A B` mounted."""
    need(shutil.which("bindfs"), "bindfs is not installed (Debian package bindfs)")
    need(os.path.exists("/dev/fuse"), "no /dev/fuse: FUSE mounts are not possible here")
    need(os.geteuid() == 0, "mounting bindfs needs root here")
    backing, mount = tmp_path / "backing", tmp_path / "mount"
    backing.mkdir()
    mount.mkdir()
    proc = subprocess.run(
        ["bindfs", str(backing), str(mount)], capture_output=True, text=True, timeout=30
    )
    need(proc.returncode == 0, f"bindfs could not mount: {proc.stderr.strip()}")
    try:
        yield backing, mount
    finally:
        for cmd in (["fusermount", "-u", str(mount)], ["umount", "-l", str(mount)]):
            if subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0:
                break


def _live(env: Env, what: str) -> dict[str, object]:
    """The watch's status once the running daemon's live part is in it."""
    return wait_for(lambda: (w := env.watch_status("w")).get("mode") and w, what=what)


def test_files_written_behind_a_fuse_mount_sync(env: Env, share: tuple[Path, Path]) -> None:
    backing, mount = share
    write(backing / "before.dat", b"before")
    env.write_config(
        [
            {
                "name": "w",
                "source": str(mount),
                "dataset": "ds",
                "poll_interval": "1s",
                "settle": "1s",
                "on_delete": "delete",
            }
        ]
    )
    env.start()
    st = _live(env, "the watch's mode in status")
    assert st["mode"] == "poll", st
    reason = str(st["mode_reason"])
    assert reason.startswith("polled every 1s") and "(fuse)" in reason and str(mount) in reason
    # The start-up log says the same, for whoever reads the journal instead.
    assert log_lines(env, "watch mode", watch="w", mode="poll", reason=reason)

    # As another machine writes to a share: into the backing folder, past this mount.
    write(backing / "a.dat", b"a")
    write(backing / "sub" / "deep" / "b.dat", b"b")
    expected = {"/before.dat", "/a.dat", "/sub/deep/b.dat"}
    items = wait_for(
        lambda: (i := env.items_by_key()) and set(i) == expected and i,
        timeout=60,
        what=f"items {sorted(expected)}",
    )
    assert items["/sub/deep/b.dat"]["slots"][0]["files"][0]["digest"] == sha256_digest(b"b")

    # A file added to a folder a pass already knows, and a deletion, are seen too.
    write(backing / "sub" / "deep" / "c.dat", b"c")
    (backing / "a.dat").unlink()
    expected = {"/before.dat", "/sub/deep/b.dat", "/sub/deep/c.dat"}
    wait_for(lambda: set(env.items_by_key()) == expected, timeout=60, what=f"{sorted(expected)}")
    st = wait_for(
        lambda: (w := env.watch_status("w"))["pending"] == 0 and w, what="nothing pending"
    )
    assert (st["synced"], st["failed"], st["problem"]) == (3, 0, None), st
    assert env.stop() == 0


def test_watch_mode_events_on_a_fuse_mount_does_not_poll(
    env: Env, share: tuple[Path, Path]
) -> None:
    backing, mount = share
    env.write_config(
        [
            {
                "name": "w",
                "source": str(mount),
                "dataset": "ds",
                "watch_mode": "events",
                "poll_interval": "1s",
                "settle": "0.5s",
            }
        ]
    )
    env.start()
    st = _live(env, "the watch's mode in status")
    assert st["mode"] == "events", st
    assert "watch_mode: events" in str(st["mode_reason"]), st
    # Behind the mount: no event, and no poll (the next rescan is 10 minutes away).
    write(backing / "behind.dat", b"behind")
    # Through the mount: an inotify event, so it syncs; the pass loop never listed.
    write(mount / "through.dat", b"through")
    wait_for(lambda: "/through.dat" in env.items_by_key(), what="/through.dat via events")
    wait_for(lambda: env.watch_status("w")["pending"] == 0, what="nothing pending")
    assert set(env.items_by_key()) == {"/through.dat"}
    assert env.stop() == 0


def test_watch_mode_poll_on_a_local_folder_polls(env: Env) -> None:
    drop = env.drop()
    env.write_config(
        [
            {
                "name": "w",
                "source": str(drop),
                "dataset": "ds",
                "watch_mode": "poll",
                "poll_interval": "1s",
                "settle": "1s",
            }
        ]
    )
    env.start()
    st = _live(env, "the watch's mode in status")
    assert (st["mode"], st["mode_reason"]) == ("poll", "polled every 1s: watch_mode: poll"), st
    write(drop / "x" / "a.dat", b"a")
    write(drop / "b.dat", b"b")
    wait_for(
        lambda: set(env.items_by_key()) == {"/x/a.dat", "/b.dat"},
        timeout=60,
        what="both files via polling",
    )
    assert env.stop() == 0
