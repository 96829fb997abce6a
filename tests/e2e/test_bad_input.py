"""Bad input never stops the other items, and each failure is visible in
`ingestd status --json` with a reason (docs/design.md, "Behaviour that users rely on")."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from tests.support.daemon import Env, log_lines, mode_bits_popen, sha256_digest, synced_lines
from tests.support.wait import wait_for


def write(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def watch_where(env: Env, watch: str, **want: int) -> dict[str, Any] | None:
    """The watch's status once its counts equal `want` (None before)."""
    st = env.watch_status(watch)
    return st if all(st[k] == v for k, v in want.items()) else None


def test_unreadable_file_fails_with_a_reason_others_sync(env: Env, tmp_path: Path) -> None:
    drop = env.drop()
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds"}])
    env.start(**mode_bits_popen(tmp_path))
    staged = drop / "sub" / ".unreadable.dat"  # hidden until renamed, so never read early
    write(staged, b"secret")
    staged.chmod(0)
    staged.rename(drop / "sub" / "unreadable.dat")
    goods = {f"good{n}.dat": f"good {n}".encode() for n in range(5)}
    for name, data in goods.items():
        write(drop / name, data)

    st = wait_for(
        lambda: watch_where(env, "w", synced=5, failed=1, pending=0),
        what="5 synced and the unreadable file failed",
    )
    [err] = st["last_errors"]
    assert err["item"] == "/sub/unreadable.dat"
    assert "unreadable.dat" in err["error"] and "permission denied" in err["error"], err
    items = env.items_by_key()
    assert set(items) == {f"/{n}" for n in goods}
    for name, data in goods.items():
        assert items[f"/{name}"]["slots"][0]["files"][0]["digest"] == sha256_digest(data)
    assert log_lines(env, "item failed", item="/sub/unreadable.dat")
    # The daemon carries on: a file dropped afterwards still syncs.
    write(drop / "later.dat", b"later")
    wait_for(lambda: "/later.dat" in env.items_by_key(), what="/later.dat")
    assert env.daemon is not None and env.daemon.poll() is None
    assert env.stop() == 0


def test_files_deleted_right_after_creation(env: Env) -> None:
    drop = env.drop()
    for n in range(300):  # present when the daemon starts: its first scan lists them
        write(drop / "pre" / f"p{n:03d}.dat", f"pre {n}".encode())
    # on_delete: delete makes the end state exact whatever the timing: a file that got
    # synced before it vanished is removed from the dataset again.
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds", "on_delete": "delete"}])
    env.start()
    # Race the first scan: files vanish between being listed and being read.
    for n in range(0, 300, 3):
        (drop / "pre" / f"p{n:03d}.dat").unlink()
    # Race the watcher: created, then deleted before (or while) it settles.
    for n in range(200):
        path = drop / "live" / f"l{n:03d}.dat"
        write(path, f"live {n}".encode())
        if n % 4 == 0:
            path.unlink()
    write(drop / "zz_sentinel.dat", b"last")
    present = {"/" + str(p.relative_to(drop)) for p in drop.rglob("*.dat")}
    assert len(present) == 300 - 100 + 200 - 50 + 1
    wait_for(lambda: set(env.items_by_key()) == present, timeout=60, what=f"{len(present)} items")
    st = wait_for(lambda: watch_where(env, "w", pending=0), timeout=60, what="nothing pending")
    assert (st["synced"], st["failed"], st["problem"]) == (len(present), 0, None), st
    items = env.items_by_key()
    for key in present:
        data = (drop / key.lstrip("/")).read_bytes()
        assert items[key]["slots"][0]["files"][0]["digest"] == sha256_digest(data), key
    assert env.daemon is not None and env.daemon.poll() is None
    assert not log_lines(env, "sync step crashed")
    assert env.stop() == 0


NAMES = [
    "with space.dat",
    "Ünïcødé 日本.dat",
    "hash#tag.dat",
    "new\nline.dat",
    "100% done?.dat",
]


def test_odd_names_become_items_with_exactly_those_names(env: Env) -> None:
    drop = env.drop()
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds", "path": "/odd"}])
    env.start()
    for name in NAMES:
        write(drop / "sub dir #1" / name, name.encode())
    expected = {f"/odd/sub dir #1/{name}" for name in NAMES}
    items = wait_for(
        lambda: (i := env.items_by_key()) and set(i) == expected and i,
        what=f"items {sorted(expected)}",
    )
    for name in NAMES:
        item = items[f"/odd/sub dir #1/{name}"]
        assert item["name"] == name
        assert item["path"] == "/odd/sub dir #1"
        f = item["slots"][0]["files"][0]
        assert f["name"] == name
        assert f["digest"] == sha256_digest(name.encode())
    st = wait_for(lambda: watch_where(env, "w", pending=0), what="nothing pending")
    assert (st["synced"], st["failed"]) == (len(NAMES), 0)
    # A one-pass sync (fresh scan, names read back from the ledger) changes nothing.
    assert env.stop() == 0
    proc = env.cli("sync", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert '"synced"' not in proc.stderr, proc.stderr
    assert all(i["version"] == 1 for i in env.items())
    for name in NAMES:
        assert len(synced_lines(env, f"/odd/sub dir #1/{name}")) == 1


def _loop_tree(folder: Path) -> None:
    write(folder / "a.dat", b"a " + folder.name.encode())
    write(folder / "sub" / "b.dat", b"b " + folder.name.encode())
    os.symlink(".", folder / "loop")  # loop -> the folder itself
    os.symlink("self.dat", folder / "self.dat")  # a link to itself (ELOOP)


def _assert_loop_watch_works(env: Env, folder: Path, name: str, timeout: float = 30) -> None:
    """Files sync once each under their real paths, also one created while it runs;
    what lies behind the loop is the same files, never items of their own."""
    expected = {"/a.dat", "/sub/b.dat"}
    wait_for(lambda: expected <= set(env.items_by_key(name)), timeout, what=f"items in {name}")
    write(folder / "sub" / "c.dat", b"c " + folder.name.encode())
    expected.add("/sub/c.dat")
    wait_for(lambda: expected <= set(env.items_by_key(name)), timeout, what=f"c.dat in {name}")
    st = wait_for(lambda: watch_where(env, name, pending=0), timeout, what=f"{name} settled")
    assert set(env.items_by_key(name)) == expected
    assert st["synced"] == len(expected), st
    # self.dat cannot be read; if the watch tracks it at all, it says why.
    for e in st["last_errors"]:
        assert "self.dat" in e["item"] and "symbolic links" in e["error"], e


def _assert_stops_promptly(env: Env) -> None:
    assert env.daemon is not None and env.daemon.poll() is None, "the daemon died"
    try:
        rc = env.stop(timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError("the daemon did not stop within 10 s of SIGTERM") from None
    assert rc == 0


def test_symlink_loop_not_followed(env: Env) -> None:
    plain = env.drop("plain")
    _loop_tree(plain)
    env.write_config([{"name": "plain", "source": str(plain), "dataset": "plain"}])
    env.start()
    _assert_loop_watch_works(env, plain, "plain")
    _assert_stops_promptly(env)


def test_symlink_loop_followed(env: Env) -> None:
    plain, follow = env.drop("plain"), env.drop("follow")
    _loop_tree(plain)
    _loop_tree(follow)
    env.write_config(
        [
            {"name": "plain", "source": str(plain), "dataset": "plain"},
            {"name": "follow", "source": str(follow), "dataset": "follow", "follow_symlinks": True},
        ]
    )
    env.start()
    _assert_loop_watch_works(env, plain, "plain")
    _assert_loop_watch_works(env, follow, "follow", timeout=10)
    _assert_stops_promptly(env)


def test_two_symlink_loops_followed(env: Env) -> None:
    plain, follow = env.drop("plain"), env.drop("follow")
    _loop_tree(plain)
    _loop_tree(follow)
    # A second loop: `loop` and `sub/up` both lead back to the root, so the paths
    # through them grow exponentially with depth (up to the kernel's 40 links).
    os.symlink("..", follow / "sub" / "up")
    env.write_config(
        [
            {"name": "plain", "source": str(plain), "dataset": "plain"},
            {"name": "follow", "source": str(follow), "dataset": "follow", "follow_symlinks": True},
        ]
    )
    env.start()
    try:
        _assert_loop_watch_works(env, plain, "plain", timeout=10)
        _assert_loop_watch_works(env, follow, "follow", timeout=10)
    finally:
        _assert_stops_promptly(env)


def _sidecar_watch(env: Env, drop: Path) -> None:
    """One watch "w" on `drop` whose items take their metadata from `<name>.json`."""
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


def test_bad_sidecar_fails_only_its_item(env: Env) -> None:
    drop = env.drop()
    _sidecar_watch(env, drop)
    env.start()
    write(drop / "bad.dat.json", b'{"label": "cat",,}')
    write(drop / "bad.dat", b"bad")
    write(drop / "good.dat.json", b'{"label": "dog"}')
    write(drop / "good.dat", b"good")
    write(drop / "plain.dat", b"plain")
    st = wait_for(
        lambda: watch_where(env, "w", synced=2, failed=1, pending=0),
        what="bad.dat to fail and the others to sync",
    )
    [err] = st["last_errors"]
    assert err["item"] == "/bad.dat"
    assert "bad.dat.json" in err["error"] and "JSON" in err["error"], err
    items = env.items_by_key()
    assert set(items) == {"/good.dat", "/plain.dat"}
    assert items["/good.dat"]["metadata"] == {"label": "dog"}

    # Fixing the sidecar in place is just a change: the item syncs.
    write(drop / "bad.dat.json", b'{"label": "cat"}')
    item = wait_for(lambda: env.items_by_key().get("/bad.dat"), what="/bad.dat after the fix")
    assert item["metadata"] == {"label": "cat"}
    st = wait_for(lambda: watch_where(env, "w", synced=3, pending=0), what="3 synced")
    assert (st["failed"], st["last_errors"]) == (0, [])
    assert env.stop() == 0


def test_a_fifo_sidecar_fails_its_item_and_blocks_nothing(env: Env) -> None:
    """A FIFO where a sidecar is expected used to hold the planning thread forever (the
    watch planned nothing more, and SIGTERM never exited): it is opened without
    blocking, is not read, and fails only its item with the reason."""
    drop = env.drop()
    _sidecar_watch(env, drop)
    os.mkfifo(drop / "piped.dat.json")
    write(drop / "piped.dat", b"piped")
    env.start()
    write(drop / "after.dat", b"planned after the FIFO")
    st = wait_for(
        lambda: watch_where(env, "w", synced=1, failed=1, pending=0),
        what="piped.dat to fail and after.dat to sync",
    )
    [err] = st["last_errors"]
    assert err["item"] == "/piped.dat"
    assert "piped.dat.json" in err["error"] and "not a regular file" in err["error"], err
    assert set(env.items_by_key()) == {"/after.dat"}
    _assert_stops_promptly(env)


def test_a_sidecar_name_too_long_for_the_file_system_means_no_sidecar(env: Env) -> None:
    """A 255-byte file name plus ".json" cannot exist: the item has no sidecar, and it
    syncs (it used to fail with "File name too long")."""
    drop = env.drop()
    _sidecar_watch(env, drop)
    env.start()
    name = "n" * 251 + ".dat"  # 255 bytes: the longest name ext4 and tmpfs hold
    write(drop / name, b"long name")
    wait_for(lambda: watch_where(env, "w", synced=1, pending=0), what="the long name to sync")
    item = env.items_by_key()[f"/{name}"]
    assert item["metadata"] == {}
    assert env.stop() == 0


def _write_raw(path: bytes, data: bytes) -> None:
    """A file by a bytes path: a name that is not UTF-8 cannot be written via a str."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_names_that_are_not_utf8_sync_and_stay_synced(env: Env) -> None:
    """A file and a folder whose names are not UTF-8 used to become nothing (the ledger
    refused the name) or fail every pass; they sync as %XX names, a restart sends
    nothing again, and deleting one is noticed."""
    drop = env.drop()
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds", "on_delete": "delete"}])
    raw = os.fsencode(drop)
    os.mkdir(raw + b"/d\xff")
    _write_raw(raw + b"/caf\xe9.dat", b"cafe")
    _write_raw(raw + b"/d\xff/x.dat", b"inside")
    write(drop / "plain.dat", b"plain")
    env.start()
    write(drop / "later.dat", b"later")  # through the watcher, beside the odd names
    _write_raw(raw + b"/d\xff/y\xfe.dat", b"y")
    expected = {"/caf%E9.dat", "/d%FF/x.dat", "/d%FF/y%FE.dat", "/plain.dat", "/later.dat"}
    wait_for(lambda: set(env.items_by_key()) == expected, what=f"items {sorted(expected)}")
    st = wait_for(lambda: watch_where(env, "w", synced=5, pending=0), what="5 synced")
    assert (st["failed"], st["problem"], st["last_errors"]) == (0, None, []), st
    items = env.items_by_key()
    assert items["/caf%E9.dat"]["name"] == "caf%E9.dat"
    assert items["/d%FF/x.dat"]["path"] == "/d%FF"
    assert items["/caf%E9.dat"]["slots"][0]["files"][0]["digest"] == sha256_digest(b"cafe")
    assert items["/d%FF/x.dat"]["slots"][0]["files"][0]["digest"] == sha256_digest(b"inside")
    digests = {k: v["slots"][0]["files"][0]["digest"] for k, v in items.items()}
    puts = {k: len(synced_lines(env, k)) for k in expected}
    assert set(puts.values()) == {1}, puts

    # A restart lists the names again and finds them in the ledger: nothing is re-sent.
    assert env.stop() == 0
    env.restart()
    st = wait_for(
        lambda: (w := env.watch_status("w")).get("last_rescan") and w,
        what="the restarted daemon's first full pass",
    )
    assert (st["synced"], st["pending"], st["failed"]) == (5, 0, 0), st
    after = env.items_by_key()
    assert {k: v["slots"][0]["files"][0]["digest"] for k, v in after.items()} == digests
    assert all(v["version"] == 1 for v in after.values())

    # Deleting the odd file is seen, and with on_delete: delete the item goes too.
    os.unlink(raw + b"/caf\xe9.dat")
    wait_for(
        lambda: "/caf%E9.dat" not in env.items_by_key(),
        what="/caf%E9.dat deleted from the dataset",
    )
    assert {k: len(synced_lines(env, k)) for k in expected} == puts
    assert env.stop() == 0


def test_fifos_fail_as_items_and_block_nothing(env: Env) -> None:
    """A FIFO named like an image or a plain file was opened for reading (hashing,
    sniffing) and blocked that worker, and SIGTERM, until something wrote to it. Each
    now fails as its item with the reason; the other files sync; the daemon stops."""
    drop = env.drop()
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds"}])
    os.mkfifo(drop / "x.jpg")  # present at the first pass
    write(drop / "a.dat", b"a")
    env.start()
    os.mkfifo(drop / "y.dat")  # seen by the watcher
    write(drop / "b.dat", b"b")
    st = wait_for(
        lambda: watch_where(env, "w", synced=2, failed=2, pending=0),
        what="the FIFOs to fail and a.dat, b.dat to sync",
    )
    errors = {e["item"]: e["error"] for e in st["last_errors"]}
    assert set(errors) == {"/x.jpg", "/y.dat"}, errors
    for item, error in errors.items():
        assert item.lstrip("/") in error, error
        assert "not a regular file" in error and "replace it with a file or remove it" in error
    assert set(env.items_by_key()) == {"/a.dat", "/b.dat"}
    _assert_stops_promptly(env)
