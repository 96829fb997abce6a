"""What users rely on (docs/design.md, "Behaviour that users rely on"), through the real CLI:
folder layout, include/exclude, settling, updates, touches, metadata, deletions, one-pass
sync, retry and shutdown.

Checks that something did NOT happen are made deterministic by waiting for a later,
positive sign that the daemon went past the moment in question (a log line for the
very file, a sentinel file synced after it, no pending items left).
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import (
    INGESTD,
    REPO,
    Env,
    log_lines,
    mode_bits_popen,
    sha256_digest,
    synced_lines,
)
from tests.support.wait import wait_for


def write(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def file_digest(item: dict[str, Any]) -> str:
    return item["slots"][0]["files"][0]["digest"]


def settled(env: Env, watch: str = "w") -> dict[str, Any] | None:
    """The watch's status once nothing is pending any more (None before)."""
    st = env.watch_status(watch)
    return st if st["pending"] == 0 else None


# --- 1. folders --------------------------------------------------------------------------


def test_preserve_folders_mirrors_sub_folders(env: Env) -> None:
    drop = env.drop()
    env.write_config(
        [
            {
                "name": "w",
                "source": str(drop),
                "dataset": "ds",
                "path": "/in",
                "preserve_folders": True,
            }
        ]
    )
    env.start()
    files = {
        "top.dat": b"top",
        "a/same.dat": b"a-same",
        "b/same.dat": b"b-same",
        "a/b/c/deep.dat": b"deep",
    }
    for rel, data in files.items():
        write(drop / rel, data)
    expected = {f"/in/{rel}": data for rel, data in files.items()}
    items = wait_for(
        lambda: (i := env.items_by_key()) and set(i) == set(expected) and i,
        what=f"items {sorted(expected)}",
    )
    for key, data in expected.items():
        item = items[key]
        assert item["path"] == key.rsplit("/", 1)[0]
        assert item["name"] == key.rsplit("/", 1)[1]
        assert file_digest(item) == sha256_digest(data)
        assert item["version"] == 1
    assert items["/in/a/b/c/deep.dat"]["path"] == "/in/a/b/c"
    assert items["/in/top.dat"]["path"] == "/in"
    assert env.stop() == 0


def test_flat_layout_same_name_second_file_fails_first_intact(env: Env) -> None:
    drop = env.drop()
    env.write_config(
        [
            {
                "name": "w",
                "source": str(drop),
                "dataset": "ds",
                "path": "/flat",
                "preserve_folders": False,
            }
        ]
    )
    env.start()
    first = write(drop / "a" / "same.dat", b"first, from folder a")
    write(drop / "x" / "y" / "other.dat", b"other")
    wait_for(lambda: "/flat/same.dat" in env.items_by_key(), what="the first same.dat")
    # Only now the second one, so which file came first is not a race.
    write(drop / "b" / "same.dat", b"second, from folder b -- must not replace the first")

    def failed() -> dict[str, Any] | None:
        st = env.watch_status()
        return st if st["failed"] == 1 else None

    st = wait_for(failed, what="the second same.dat to fail")
    assert st["synced"] == 2 and st["pending"] == 0
    errors = [e for e in st["last_errors"] if e["item"] == "/flat/same.dat"]
    assert len(errors) == 1, st["last_errors"]
    reason = errors[0]["error"]
    assert "a/same.dat" in reason and "b/same.dat" in reason, reason

    items = env.items_by_key()
    assert set(items) == {"/flat/same.dat", "/flat/other.dat"}
    for item in items.values():
        assert item["path"] == "/flat"
    same = items["/flat/same.dat"]
    assert file_digest(same) == sha256_digest(first)
    assert same["version"] == 1, "the first item was overwritten by the second file"
    assert len(synced_lines(env, "/flat/same.dat")) == 1
    failures = log_lines(env, "item failed", watch="w")
    assert any("b/same.dat" in str(e.get("reason")) for e in failures), failures
    assert env.stop() == 0


# --- 2. which files are taken ------------------------------------------------------------


def test_include_exclude_and_temp_names(env: Env) -> None:
    picky, anything = env.drop("picky"), env.drop("anything")
    env.write_config(
        [
            {
                "name": "picky",
                "source": str(picky),
                "dataset": "picky",
                "include": ["*.dat", "docs/**/*.txt"],
                "exclude": ["cache", "raw/**/*.dat", "*_thumb.dat"],
            },
            # No patterns at all: every file is taken, except temp and hidden names.
            {"name": "anything", "source": str(anything), "dataset": "anything"},
        ]
    )
    env.start()
    taken = [
        "a.dat",
        "sub/b.dat",
        "cachefile.dat",  # `cache` names a folder or file called exactly that
        "sub/raw/g.dat",  # `raw/**` is anchored at the watch root
        "docs/n1.txt",  # `**` also matches no folder at all
        "docs/x/y/n2.txt",
    ]
    dropped = [
        "c.raw",  # not included
        "notes.txt",  # .txt only under docs/
        "other/docs/n3.txt",  # docs/ is anchored at the root
        "sub/b_thumb.dat",  # excluded by name at any depth
        "cache/c.dat",  # excluded folder, at the root...
        "sub/cache/d.dat",  # ...and deeper
        "raw/e.dat",
        "raw/2024/05/f.dat",
        ".hidden.dat",  # temp and hidden names, even though *.dat includes them
        "sub/.h.dat",
        "~$x.dat",
    ]
    for rel in taken + dropped:
        write(picky / rel, rel.encode())
    taken_any = ["ok.docx", "x.tmpl", "deep/er/file"]
    dropped_any = [
        ".hidden",
        "x.tmp",
        "x.part",
        "~$x.docx",
        "x.crdownload",
        "sub/y.tmp",
        ".cfg/inside.dat",  # inside a hidden folder
    ]
    for rel in taken_any + dropped_any:
        write(anything / rel, rel.encode())
    # Written last: once these are items, every file above has been judged.
    write(picky / "zz_last.dat", b"sentinel")
    write(anything / "zz_last", b"sentinel")
    expected_picky = {"/" + r for r in [*taken, "zz_last.dat"]}
    expected_any = {"/" + r for r in [*taken_any, "zz_last"]}
    wait_for(
        lambda: expected_picky <= set(env.items_by_key("picky")),
        what=f"picky items {sorted(expected_picky)}",
    )
    wait_for(
        lambda: expected_any <= set(env.items_by_key("anything")),
        what=f"anything items {sorted(expected_any)}",
    )
    assert set(env.items_by_key("picky")) == expected_picky
    assert set(env.items_by_key("anything")) == expected_any
    # Ignored files are not even tracked as failed or pending items.
    for name, expected in (("picky", expected_picky), ("anything", expected_any)):
        st = wait_for(lambda n=name: settled(env, n), what=f"{name} to settle")
        assert (st["synced"], st["failed"]) == (len(expected), 0), st
    assert env.stop() == 0


# --- 3-5. settling, updates, touches -----------------------------------------------------


def test_slowly_written_file_is_uploaded_once_complete(env: Env) -> None:
    drop = env.drop()
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds", "settle": "1s"}])
    env.start()
    chunks = [os.urandom(64 * 1024) for _ in range(10)]
    gaps = []
    with open(drop / "slow.dat", "wb") as fh:
        last = time.monotonic()
        for chunk in chunks:
            fh.write(chunk)
            fh.flush()
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            time.sleep(0.3)  # the writer's pace: this is the scenario, not a wait
    if max(gaps) >= 0.9:
        pytest.skip(f"the writer itself stalled for {max(gaps):.2f}s, close to settle (1s)")
    content = b"".join(chunks)
    item = wait_for(lambda: env.items_by_key().get("/slow.dat"), what="/slow.dat")
    wait_for(lambda: settled(env), what="nothing pending")
    item = env.items_by_key()["/slow.dat"]
    f = item["slots"][0]["files"][0]
    assert f["digest"] == sha256_digest(content)
    assert f["size"] == len(content)
    assert item["version"] == 1, "a partial version was uploaded before the complete one"
    assert len(synced_lines(env, "/slow.dat")) == 1
    assert env.stop() == 0


def test_changed_file_updates_the_same_item(env: Env) -> None:
    drop = env.drop()
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds", "path": "/p"}])
    env.start()
    v1 = write(drop / "sub" / "a.dat", b"version one")
    item = wait_for(lambda: env.items_by_key().get("/p/sub/a.dat"), what="/p/sub/a.dat")
    assert item["version"] == 1 and file_digest(item) == sha256_digest(v1)
    v2 = write(drop / "sub" / "a.dat", b"version two, longer than one")
    item = wait_for(
        lambda: (i := env.items_by_key().get("/p/sub/a.dat")) and i["version"] == 2 and i,
        what="version 2 of /p/sub/a.dat",
    )
    assert file_digest(item) == sha256_digest(v2)
    assert item["slots"][0]["files"][0]["size"] == len(v2)
    assert list(env.items_by_key()) == ["/p/sub/a.dat"]
    wait_for(lambda: settled(env), what="nothing pending")
    assert [e["version"] for e in synced_lines(env, "/p/sub/a.dat")] == [1, 2]
    assert env.watch_status()["synced"] == 1
    assert env.stop() == 0


def test_touch_without_change_uploads_nothing(env: Env) -> None:
    drop = env.drop()
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds"}])
    env.start()
    write(drop / "t1.dat", b"touched by touch(1)")
    write(drop / "t2.dat", b"opened for writing and closed unchanged")
    wait_for(lambda: {"/t1.dat", "/t2.dat"} <= set(env.items_by_key()), what="both items")
    wait_for(lambda: settled(env), what="nothing pending")
    later = time.time() + 5

    def rechecked(key: str) -> None:
        # The daemon reports that it looked at the touched file and found nothing to send.
        wait_for(
            lambda: log_lines(env, "unchanged content, nothing sent", item=key),
            what=f"the daemon to re-check {key}",
        )

    # t2: a writer that opens, changes nothing but the mtime, and closes (close-write).
    os.utime(drop / "t2.dat", (later, later))
    with open(drop / "t2.dat", "ab"):
        pass
    rechecked("/t2.dat")
    # t1: a bare mtime change, as touch(1) makes: inotify reports only IN_ATTRIB, which
    # the daemon does not subscribe to, so a rescan finds it.
    os.utime(drop / "t1.dat", (later, later))
    assert env.daemon is not None
    env.daemon.send_signal(signal.SIGUSR1)  # what `ingestd retry` sends: rescan now
    rechecked("/t1.dat")
    write(drop / "after.dat", b"sentinel")
    wait_for(lambda: "/after.dat" in env.items_by_key(), what="the sentinel item")
    wait_for(lambda: settled(env), what="nothing pending")
    items = env.items_by_key()
    for key in ("/t1.dat", "/t2.dat"):
        assert items[key]["version"] == 1, key
        assert len(synced_lines(env, key)) == 1, synced_lines(env, key)
    assert env.watch_status()["synced"] == 3
    assert env.stop() == 0


# --- 6-7. metadata -----------------------------------------------------------------------


def test_sidecar_path_pattern_and_static_metadata(env: Env) -> None:
    drop = env.drop()
    env.write_config(
        [
            {
                "name": "w",
                "source": str(drop),
                "dataset": "ds",
                "metadata": {
                    "static": {"site": "lab", "rig": 7},
                    "path_pattern": "{camera}/{date}/*",
                    "sidecar": "{name}.json",
                },
            }
        ]
    )
    env.start()
    shot = drop / "cam1" / "2024-05-01" / "a.dat"
    sidecar = shot.with_name("a.dat.json")
    write(sidecar, json.dumps({"exposure": 1.5, "label": "cat", "tags": ["x"]}).encode())
    write(shot, b"image bytes")
    write(drop / "loose.dat", b"no pattern match, no sidecar")
    key = "/cam1/2024-05-01/a.dat"
    item = wait_for(lambda: env.items_by_key().get(key), what=key)
    assert item["metadata"] == {
        "site": "lab",
        "rig": 7,
        "camera": "cam1",
        "date": "2024-05-01",
        "exposure": 1.5,
        "label": "cat",
        "tags": ["x"],
    }
    assert item["version"] == 1
    loose = wait_for(lambda: env.items_by_key().get("/loose.dat"), what="/loose.dat")
    assert loose["metadata"] == {"site": "lab", "rig": 7}
    # The sidecar is metadata, never an item of its own.
    assert set(env.items_by_key()) == {key, "/loose.dat"}

    # Editing the sidecar updates the item; keys it no longer has are dropped.
    write(sidecar, json.dumps({"label": "dog"}).encode())
    item = wait_for(
        lambda: (i := env.items_by_key().get(key)) and i["version"] == 2 and i,
        what=f"version 2 of {key}",
    )
    assert item["metadata"] == {
        "site": "lab",
        "rig": 7,
        "camera": "cam1",
        "date": "2024-05-01",
        "label": "dog",
    }
    assert file_digest(item) == sha256_digest(b"image bytes")

    # Deleting the sidecar takes its metadata away (the rest stays).
    sidecar.unlink()
    item = wait_for(
        lambda: (i := env.items_by_key().get(key)) and i["version"] == 3 and i,
        what=f"version 3 of {key}",
    )
    assert item["metadata"] == {"site": "lab", "rig": 7, "camera": "cam1", "date": "2024-05-01"}
    wait_for(lambda: settled(env), what="nothing pending")
    assert env.items_by_key()[key]["version"] == 3
    assert [e["version"] for e in synced_lines(env, key)] == [1, 2, 3]
    st = env.watch_status()
    assert (st["synced"], st["failed"]) == (2, 0)
    assert env.stop() == 0


def test_metadata_type_conflict_fails_only_the_later_item(env: Env) -> None:
    drop = env.drop()
    env.write_config(
        [
            {
                "name": "w",
                "source": str(drop),
                "dataset": "ds",
                "metadata": {"sidecar": "{name}.json"},
            }
        ]
    )
    env.start()
    write(drop / "a.dat.json", b'{"exposure": 1}')
    write(drop / "a.dat", b"a")
    a = wait_for(lambda: env.items_by_key().get("/a.dat"), what="/a.dat")
    assert a["metadata"] == {"exposure": 1}
    write(drop / "b.dat.json", b'{"exposure": "high"}')
    write(drop / "b.dat", b"b")
    write(drop / "c.dat.json", b'{"exposure": 2}')
    write(drop / "c.dat", b"c")

    def b_failed() -> dict[str, Any] | None:
        st = env.watch_status()
        return st if st["failed"] == 1 and st["synced"] == 2 and st["pending"] == 0 else None

    st = wait_for(b_failed, what="b to fail and c to sync")
    [err] = [e for e in st["last_errors"] if e["item"] == "/b.dat"]
    assert "exposure" in err["error"], err
    assert "/a.dat" in err["error"] or "/c.dat" in err["error"], err
    items = env.items_by_key()
    assert set(items) == {"/a.dat", "/c.dat"}
    assert items["/a.dat"]["version"] == 1 and items["/a.dat"]["metadata"] == {"exposure": 1}
    assert items["/c.dat"]["metadata"] == {"exposure": 2}
    assert not synced_lines(env, "/b.dat")
    assert env.stop() == 0


# --- 8. deletions ------------------------------------------------------------------------


def test_on_delete_keep_and_delete(env: Env) -> None:
    keep, delete = env.drop("keep"), env.drop("delete")
    env.write_config(
        [
            {"name": "keep", "source": str(keep), "dataset": "dk", "on_delete": "keep"},
            {"name": "delete", "source": str(delete), "dataset": "dd", "on_delete": "delete"},
        ]
    )
    env.start()
    for folder in (keep, delete):
        for n in range(3):
            write(folder / f"f{n}.dat", f"{folder.name} {n}".encode())
    wanted = {f"/f{n}.dat" for n in range(3)}
    for ds in ("dk", "dd"):
        wait_for(lambda d=ds: set(env.items_by_key(d)) == wanted, what=f"3 items in {ds}")
    (keep / "f0.dat").unlink()
    (delete / "f0.dat").unlink()
    # on_delete: delete: the item leaves the dataset.
    wait_for(
        lambda: set(env.items_by_key("dd")) == wanted - {"/f0.dat"},
        what="/f0.dat to leave dataset dd",
    )
    # on_delete: keep: the daemon forgets the file (the ledger no longer counts it) ...
    wait_for(lambda: env.watch_status("keep")["synced"] == 2, what="keep to forget f0.dat")
    assert log_lines(env, "source files gone", watch="keep")
    # ... but the item stays in the dataset, untouched.
    kept = env.items_by_key("dk")
    assert set(kept) == wanted
    assert kept["/f0.dat"]["version"] == 1
    assert file_digest(kept["/f0.dat"]) == sha256_digest(b"keep 0")
    assert env.watch_status("delete")["synced"] == 2
    assert env.stop() == 0


def _ten_synced(env: Env, drop: Path) -> None:
    env.write_config(
        [
            {
                "name": "w",
                "source": str(drop),
                "dataset": "ds",
                "on_delete": "delete",
                "max_delete": "50%",
            }
        ]
    )
    env.start()
    for n in range(10):
        write(drop / f"f{n}.dat", f"file {n}".encode())
    wait_for(lambda: len(env.items_by_key()) == 10, what="10 items")
    wait_for(lambda: (s := settled(env)) and s["synced"] == 10, what="10 synced")


def _assert_refused(env: Env) -> None:
    def problem() -> str | None:
        return env.watch_status()["problem"]

    text = wait_for(problem, what="the watch to report a refused mass deletion")
    assert "max_delete" in text and "refused" in text, text
    assert "8 of 10" in text, text
    assert log_lines(env, "mass deletion refused", watch="w")


def test_max_delete_guard_after_restart(env: Env) -> None:
    drop = env.drop()
    _ten_synced(env, drop)
    assert env.stop() == 0
    for n in range(8):
        (drop / f"f{n}.dat").unlink()
    env.restart()
    _assert_refused(env)
    # The watch keeps working for everything else.
    write(drop / "new.dat", b"new")
    wait_for(lambda: "/new.dat" in env.items_by_key(), what="/new.dat")
    wait_for(lambda: settled(env), what="nothing pending")
    items = env.items_by_key()
    assert {f"/f{n}.dat" for n in range(10)} <= set(items)
    assert len(items) == 11
    assert not log_lines(env, "deleted from the dataset (on_delete: delete)")
    assert env.watch_status()["synced"] == 11
    assert env.stop() == 0


def test_max_delete_guard_while_running(env: Env) -> None:
    drop = env.drop()
    _ten_synced(env, drop)
    away = env.drop("away")
    for n in range(8):
        (drop / f"f{n}.dat").rename(away / f"f{n}.dat")
    _assert_refused(env)
    write(drop / "new.dat", b"new")
    wait_for(lambda: "/new.dat" in env.items_by_key(), what="/new.dat")
    wait_for(lambda: settled(env), what="nothing pending")
    assert len(env.items_by_key()) == 11
    assert not log_lines(env, "deleted from the dataset (on_delete: delete)")
    assert env.stop() == 0


# --- 9. one pass -------------------------------------------------------------------------


def test_sync_one_pass_and_dry_run(env: Env) -> None:
    drop = env.drop()
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds", "path": "/p"}])
    files = {"a.dat": b"a", "sub/b.dat": b"b", "sub/deeper/c.raw": b"c"}
    for rel, data in files.items():
        write(drop / rel, data)
    keys = {f"/p/{rel}" for rel in files}

    dry = env.cli("sync", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "Traceback" not in dry.stderr
    lines = {line for line in dry.stdout.splitlines() if line.strip()}
    assert lines == {f"create  ds {k}" for k in keys}, dry.stdout
    # A dry run changes nothing: no items, no ledger, nothing counted.
    assert env.items() == []
    assert not (env.state / "ledger.sqlite").exists()
    assert env.watch_status()["synced"] == 0

    done = env.cli("sync", timeout=60)
    assert done.returncode == 0, done.stderr
    items = env.items_by_key()
    assert set(items) == keys
    for rel, data in files.items():
        assert file_digest(items[f"/p/{rel}"]) == sha256_digest(data)
        assert items[f"/p/{rel}"]["version"] == 1
    st = env.status()
    assert st["daemon"]["running"] is False
    w = st["watches"][0]
    assert (w["synced"], w["pending"], w["failed"]) == (3, 0, 0)

    again = env.cli("sync", "--dry-run")
    assert again.returncode == 0 and again.stdout.strip() == "nothing to do", again.stdout
    write(drop / "a.dat", b"a, changed")
    (drop / "sub" / "b.dat").unlink()
    changed = env.cli("sync", "--dry-run")
    assert changed.returncode == 0, changed.stderr
    assert set(changed.stdout.split("\n")) - {""} == {
        "update  ds /p/a.dat",
        "forget  ds /p/sub/b.dat",
    }
    items = env.items_by_key()
    assert items["/p/a.dat"]["version"] == 1 and set(items) == keys

    # A second real pass applies it; the run is idempotent otherwise.
    assert env.cli("sync", timeout=60).returncode == 0
    items = env.items_by_key()
    assert items["/p/a.dat"]["version"] == 2
    assert items["/p/sub/deeper/c.raw"]["version"] == 1


def test_sync_one_pass_exits_1_when_an_item_failed(env: Env) -> None:
    drop = env.drop()
    env.write_config(
        [
            {
                "name": "w",
                "source": str(drop),
                "dataset": "ds",
                "metadata": {"sidecar": "{name}.json"},
            }
        ]
    )
    write(drop / "good.dat", b"good")
    write(drop / "bad.dat", b"bad")
    write(drop / "bad.dat.json", b"{oops")
    proc = env.cli("sync", timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert set(env.items_by_key()) == {"/good.dat"}
    w = env.watch_status()
    assert (w["synced"], w["failed"]) == (1, 1)


# --- 10. retry ---------------------------------------------------------------------------


def test_retry_requeues_a_permanently_failed_item(env: Env, tmp_path: Path) -> None:
    drop = env.drop()
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds"}])
    env.start(**mode_bits_popen(tmp_path))
    hidden = drop / ".locked.dat"  # hidden names are ignored until the rename below
    write(hidden, b"locked content")
    hidden.chmod(0)
    hidden.rename(drop / "locked.dat")
    write(drop / "fine.dat", b"fine")

    def failed() -> dict[str, Any] | None:
        st = env.watch_status()
        return st if (st["failed"], st["synced"], st["pending"]) == (1, 1, 0) else None

    st = wait_for(failed, what="locked.dat to fail and fine.dat to sync")
    [err] = st["last_errors"]
    assert err["item"] == "/locked.dat"
    assert "permission denied" in err["error"].lower(), err
    assert st["synced"] == 1
    assert set(env.items_by_key()) == {"/fine.dat"}

    # Fixing the mode changes neither content nor mtime: only `retry` brings it back.
    (drop / "locked.dat").chmod(0o644)
    proc = env.cli("retry", "w")
    assert proc.returncode == 0, proc.stderr
    assert "queued 1" in proc.stdout, proc.stdout
    item = wait_for(lambda: env.items_by_key().get("/locked.dat"), what="/locked.dat")
    assert file_digest(item) == sha256_digest(b"locked content")
    st = wait_for(lambda: settled(env), what="nothing pending")
    assert (st["synced"], st["failed"], st["last_errors"]) == (2, 0, [])
    assert env.stop() == 0


# --- 11. shutdown ------------------------------------------------------------------------


def _open_by(pid: int, path: Path) -> bool:
    """Whether process `pid` holds `path` open (it is hashing or copying it)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"{fd_dir}/{fd}") == str(path):
                return True
        except OSError:
            continue
    return False


def test_sigterm_when_idle_exits_0_quickly(env: Env) -> None:
    drop = env.drop()
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds"}])
    env.start()
    write(drop / "a.dat", b"a")
    wait_for(lambda: "/a.dat" in env.items_by_key(), what="/a.dat")
    started = time.monotonic()
    assert env.stop(timeout=10) == 0
    assert time.monotonic() - started < 10
    assert log_lines(env, "stopped")
    assert env.status()["daemon"]["running"] is False


def test_sigterm_during_a_large_upload_then_restart_syncs_everything_once(env: Env) -> None:
    drop = env.drop()
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds"}])
    env.start()
    big_data = os.urandom(1 << 20) * 200  # 200 MB of real (non-sparse) bytes
    staging = drop / ".big.bin"  # hidden: ignored until it is complete
    staging.write_bytes(big_data)
    big = drop / "big.bin"
    small = {f"s{n}.dat": f"small {n}".encode() for n in range(20)}
    staging.rename(big)
    for name, data in small.items():
        write(drop / name, data)
    assert env.daemon is not None
    pid = env.daemon.pid
    # Catch the daemon while it reads the big file (hashing or copying it into the store).
    wait_for(lambda: _open_by(pid, big), timeout=60, interval=0.005, what="the big upload")
    started = time.monotonic()
    assert env.stop(timeout=15) == 0
    took = time.monotonic() - started
    assert took < 10, f"SIGTERM took {took:.1f}s"

    env.restart()
    expected = {"/big.bin": big_data} | {f"/{n}": d for n, d in small.items()}
    wait_for(lambda: set(env.items_by_key()) == set(expected), timeout=90, what="every item")
    st = wait_for(lambda: settled(env), timeout=90, what="nothing pending")
    assert (st["synced"], st["failed"]) == (len(expected), 0)
    items = env.items_by_key()
    for key, data in expected.items():
        assert items[key]["version"] == 1, key
        f = items[key]["slots"][0]["files"][0]
        assert (f["digest"], f["size"]) == (sha256_digest(data), len(data)), key
        puts = [e for e in synced_lines(env, key) if e.get("changed")]
        assert len(puts) == 1, (key, synced_lines(env, key))
    assert env.stop() == 0


def test_sigterm_while_hashing_a_file_longer_than_the_grace(env: Env) -> None:
    """SHUTDOWN_GRACE gives in-flight work 6 s and "the whole stop stays under 10 s"
    (daemon/ingestd/runtime/app.py): also when reading the file takes longer than that."""
    drop = env.drop()
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds"}])
    env.start()
    huge = drop / "huge.bin"
    # Sparse: no disk space, but reading (and hashing) 32 GiB of zeros takes minutes.
    with open(drop / ".huge.bin", "wb") as fh:
        fh.truncate(32 << 30)
    (drop / ".huge.bin").rename(huge)
    assert env.daemon is not None
    pid = env.daemon.pid
    try:
        wait_for(lambda: _open_by(pid, huge), interval=0.01, what="the daemon to read huge.bin")
        started = time.monotonic()
        env.daemon.send_signal(signal.SIGTERM)
        try:
            rc = env.daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            raise AssertionError("the daemon did not stop within 10 s of SIGTERM") from None
        assert rc == 0
        assert time.monotonic() - started < 10
    finally:
        env.kill()
        huge.unlink()
        shutil.rmtree(env.store, ignore_errors=True)
    assert "/huge.bin" not in env.items_by_key()


def test_sync_on_a_terminal_shows_a_progress_bar_per_watch(env: Env) -> None:
    cams, scans = env.drop("cams"), env.drop("scans")
    env.write_config(
        [
            {"name": "cams", "source": str(cams), "dataset": "ds", "path": "/cams"},
            {"name": "scans", "source": str(scans), "dataset": "ds", "path": "/scans"},
        ]
    )
    for i in range(5):
        write(cams / f"c{i}.dat", b"c" * 1000)
    for i in range(3):
        write(scans / f"s{i}.dat", b"s" * 1000)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*INGESTD, "sync", "-c", str(env.config_path)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "160"},
    )
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its side
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0, out.decode(errors="replace")
    text = out.decode(errors="replace")
    # The last frame of each watch's bar: its name and its finished count.
    assert "cams" in text and "5/5" in text, text
    assert "scans" in text and "3/3" in text, text
    assert "items/s" in text, text
