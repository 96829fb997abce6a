"""Live reload with the daemon running as a subprocess: edits of the config file, SIGHUP
and `ingestd reload` apply a diff by watch name; a bad edit is refused and shown in
`status` while the old config keeps running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.daemon import INGESTD, REPO, Env, log_lines, synced_lines
from tests.support.wait import wait_for


def _edit(env: Env, change: Callable[[dict[str, Any]], None], *, rename: bool = True) -> None:
    """Rewrite the config the way editors do: a new file renamed over the old one."""
    data = yaml.safe_load(env.config_path.read_text())
    change(data)
    text = yaml.safe_dump(data, sort_keys=False)
    if rename:
        tmp = env.config_path.with_name(".ingestd.yaml.swp")
        tmp.write_text(text)
        os.replace(tmp, env.config_path)
    else:
        env.config_path.write_text(text)


def _reloads(env: Env) -> list[dict[str, Any]]:
    return log_lines(env, "config reloaded")


def _trigger(env: Env, how: str) -> None:
    if how == "sighup":
        assert env.daemon is not None
        env.daemon.send_signal(signal.SIGHUP)
    elif how == "cli":
        out = env.cli("reload")
        assert out.returncode in (0, 2), out.stderr
        assert "asked ingestd" in out.stdout


def _keys(env: Env, dataset: str) -> set[str]:
    """The dataset's item keys, read through a config of its own: `items` needs a valid
    config, and the file the daemon watches may hold a refused edit."""
    data = yaml.safe_load(env.config_path.read_text())
    query = env.root / "query.yaml"
    query.write_text(yaml.safe_dump({"backend": data["backend"], "state_dir": str(env.root)}))
    out = subprocess.run(
        [*INGESTD, "items", dataset, "--json", "-c", str(query)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    return {i["key"] for i in json.loads(out.stdout)}


@pytest.mark.parametrize("how", ["file", "sighup", "cli"])
def test_reload_adds_removes_and_changes_watches(env: Env, how: str) -> None:
    a, b = env.drop("a"), env.drop("b")
    env.write_config(
        [{"name": "a", "source": str(a), "dataset": "da", "include": ["*.dat"]}],
        watch_config=how == "file",
    )
    (a / "one.dat").write_bytes(b"one")
    proc = env.start()
    wait_for(lambda: _keys(env, "da") == {"/one.dat"}, what="a's first file")

    # add a watch: its files sync without a restart
    (b / "bee.dat").write_bytes(b"bee")
    _edit(
        env,
        lambda d: d["watches"].append(
            {"name": "b", "source": str(b), "dataset": "db", "settle": "0.5s"}
        ),
    )
    _trigger(env, how)
    wait_for(lambda: _keys(env, "db") == {"/bee.dat"}, what="the added watch to sync")
    assert proc.poll() is None and proc.pid == env.daemon.pid  # type: ignore[union-attr]
    (added,) = [r for r in _reloads(env) if r.get("added")]
    assert added["added"] == ["b"] and "changed" not in added
    if how != "file":
        assert log_lines(env, "reload requested", reason="SIGHUP")
        assert not log_lines(env, "reload requested", reason="config file edited")

    # change a's include pattern: .txt files now count; b keeps running without a rescan
    scans_of_b = len(log_lines(env, "scan done", watch="b", subdir="/"))
    _edit(env, lambda d: d["watches"][0].update(include=["*.dat", "*.txt"]))
    _trigger(env, how)
    wait_for(lambda: any(r.get("changed") == ["a"] for r in _reloads(env)), what="a to restart")
    (a / "two.txt").write_bytes(b"two")
    wait_for(lambda: "/two.txt" in _keys(env, "da"), what="the new include pattern to apply")
    (b / "bee2.dat").write_bytes(b"bee2")
    wait_for(lambda: "/bee2.dat" in _keys(env, "db"), what="b to keep syncing")
    assert len(log_lines(env, "scan done", watch="b", subdir="/")) == scans_of_b
    assert len(synced_lines(env, "/one.dat", watch="a")) == 1  # the restart re-sent nothing

    # remove b: it stops; its ledger rows stay, so adding it back re-sends nothing
    _edit(env, lambda d: d["watches"].pop())
    _trigger(env, how)
    wait_for(lambda: any(r.get("removed") == ["b"] for r in _reloads(env)), what="b removed")
    (b / "late.dat").write_bytes(b"late")
    (a / "three.dat").write_bytes(b"three")
    wait_for(lambda: "/three.dat" in _keys(env, "da"), what="a to keep syncing")
    assert "/late.dat" not in _keys(env, "db")
    _edit(
        env,
        lambda d: d["watches"].append(
            {"name": "b", "source": str(b), "dataset": "db", "settle": "0.5s"}
        ),
    )
    _trigger(env, how)
    wait_for(lambda: "/late.dat" in _keys(env, "db"), what="b back, catching up")
    assert len(synced_lines(env, "/bee.dat", watch="b")) == 1
    assert proc.poll() is None


@pytest.mark.parametrize("how", ["file", "sighup", "cli"])
def test_bad_edit_is_refused_and_old_config_keeps_running(env: Env, how: str) -> None:
    a = env.drop("a")
    env.write_config(
        [{"name": "a", "source": str(a), "dataset": "da", "include": ["*.dat"]}],
        watch_config=how == "file",
    )
    proc = env.start()
    (a / "one.dat").write_bytes(b"one")
    wait_for(lambda: _keys(env, "da") == {"/one.dat"}, what="the first file")

    # a typo in a key and a bad duration: refused, each problem named by its field
    def bad(d: dict[str, Any]) -> None:
        d["watches"][0]["include"] = ["*.txt"]
        d["watches"][0]["setle"] = "2s"
        d["watches"][0]["rescan"] = "soon"

    _edit(env, bad, rename=how != "file")
    _trigger(env, how)
    rejected = wait_for(
        lambda: env.status()["config"]["rejected"], what="status to show the refused edit"
    )
    fields = {r["field"] for r in rejected}
    assert fields == {"watches[0].setle", "watches[0].rescan"}, rejected
    assert log_lines(env, "config edit refused; the previous config stays in effect")
    assert proc.poll() is None
    # the old behaviour is intact: .dat files still sync, .txt files are still ignored
    (a / "two.dat").write_bytes(b"two")
    (a / "skip.txt").write_bytes(b"skip")
    wait_for(lambda: "/two.dat" in _keys(env, "da"), what="the old config to keep syncing")
    assert "/skip.txt" not in _keys(env, "da")

    # fix it: applies, the rejection clears, the new include pattern works
    def fixed(d: dict[str, Any]) -> None:
        d["watches"][0].pop("setle")
        d["watches"][0]["rescan"] = "10m"

    _edit(env, fixed)
    _trigger(env, how)
    wait_for(lambda: not env.status()["config"]["rejected"], what="the rejection to clear")
    (a / "three.txt").write_bytes(b"three")
    wait_for(lambda: "/three.txt" in _keys(env, "da"), what="the fixed config to apply")
    assert proc.poll() is None


def test_reload_changes_workers_and_backend_without_losing_work(env: Env) -> None:
    a = env.drop("a")
    env.write_config([{"name": "a", "source": str(a), "dataset": "da"}])
    proc = env.start()
    for i in range(20):
        (a / f"f{i:02}.dat").write_bytes(b"x" * 1000 + bytes([i]))
    wait_for(lambda: len(_keys(env, "da")) == 20, what="the first files")
    # point the backend at another store: every item is sent to it, none is lost
    second = env.root / "store2"
    _edit(
        env,
        lambda d: d.update(workers=2, backend={"kind": "local", "path": str(second)}),
    )
    wait_for(lambda: any(r.get("backend") for r in _reloads(env)), what="the backend reload")
    wait_for(lambda: len(_keys(env, "da")) == 20, what="items re-sent to the new backend")
    (a / "late.dat").write_bytes(b"late")
    wait_for(lambda: "/late.dat" in _keys(env, "da"), what="new files to go to the new backend")
    assert proc.poll() is None
    assert wait_for(lambda: env.watch_status("a")["pending"] == 0, what="nothing pending")


def test_reload_without_a_daemon_says_so(env: Env, tmp_path: Path) -> None:
    env.write_config([])
    out = env.cli("reload")
    assert out.returncode == 1 and "no ingestd is running" in out.stderr


def _png(path: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    Image.new("RGB", size, (30, 60, 90)).save(path, format="PNG")


def test_an_edit_of_item_settings_applies_to_items_already_synced(env: Env) -> None:
    drop = env.drop()
    env.write_config(
        [
            {
                "name": "w",
                "source": str(drop),
                "dataset": "ds",
                "metadata": {"static": {"site": "north"}},
                "images": {"max_dimension": 5000, "oversize": "reject"},
            }
        ]
    )
    _png(drop / "small.png", (100, 50))
    _png(drop / "wide.png", (400, 100))
    (drop / "notes.dat").write_bytes(b"not an image")
    env.start()
    wait_for(lambda: len(env.items_by_key()) == 3, what="three items")
    assert env.items_by_key()["/small.png"]["metadata"] == {"site": "north"}

    # Static metadata: every item is planned again and updated in place (same key).
    _edit(env, lambda d: d["watches"][0]["metadata"]["static"].update(site="south"))
    wait_for(
        lambda: all(i["metadata"] == {"site": "south"} for i in env.items_by_key().values()),
        what="the new static metadata on the items already synced",
    )
    items = env.items_by_key()
    assert set(items) == {"/small.png", "/wide.png", "/notes.dat"}
    assert all(i["version"] == 2 for i in items.values())
    wait_for(lambda: log_lines(env, "every file planned with the new item settings"))

    # Media settings: a smaller limit with `reject` fails the wide image, and sends
    # nothing again for the ones whose result did not change.
    synced_before = {k: len(synced_lines(env, k)) for k in items}
    _edit(env, lambda d: d["watches"][0]["images"].update(max_dimension=200))
    wait_for(lambda: env.watch_status()["failed"] == 1, what="the wide image to fail")
    (err,) = env.watch_status()["last_errors"]
    assert err["item"] == "/wide.png" and "400" in err["error"]
    # Back to a limit it fits, downscaling: the failed item goes through again.
    _edit(env, lambda d: d["watches"][0]["images"].update(max_dimension=300, oversize="downscale"))
    wait_for(lambda: env.watch_status()["failed"] == 0, what="the wide image to pass again")
    wait_for(lambda: env.watch_status()["pending"] == 0, what="nothing left to do")
    # The small image fits either limit and the other file is no image: neither was
    # sent again; the wide one was, downscaled.
    assert len(synced_lines(env, "/small.png")) == synced_before["/small.png"]
    assert len(synced_lines(env, "/notes.dat")) == synced_before["/notes.dat"]
    wide = env.items_by_key()["/wide.png"]
    assert (
        wide["version"] == 3
        and wide["slots"][0]["files"][0]["size"]
        != items["/wide.png"]["slots"][0]["files"][0]["size"]
    )
    assert env.stop() == 0

    # An edit while the daemon is down applies at the next start, and `sync --dry-run`
    # shows it first.
    _edit(env, lambda d: d["watches"][0]["metadata"]["static"].update(site="east"))
    dry = env.cli("sync", "--dry-run", check=True).stdout.split("\n")
    assert {line for line in dry if line} == {
        "update  ds /small.png",
        "update  ds /wide.png",
        "update  ds /notes.dat",
    }
    env.restart()
    wait_for(
        lambda: all(i["metadata"] == {"site": "east"} for i in env.items_by_key().values()),
        what="the edit made while the daemon was down",
    )


@pytest.mark.parametrize("on_delete", ["keep", "delete"])
def test_an_edit_that_moves_items_follows_on_delete(env: Env, on_delete: str) -> None:
    drop = env.drop()
    env.write_config(
        [{"name": "w", "source": str(drop), "dataset": "ds", "path": "/in", "on_delete": on_delete}]
    )
    (drop / "sub").mkdir()
    (drop / "a.dat").write_bytes(b"a")
    (drop / "sub" / "b.dat").write_bytes(b"b")
    env.start()
    first = {"/in/a.dat", "/in/sub/b.dat"}
    wait_for(lambda: set(env.items_by_key("ds")) == first, what="the first items")

    _edit(env, lambda d: d["watches"][0].update(path="/moved"))
    moved = {"/moved/a.dat", "/moved/sub/b.dat"}
    if on_delete == "delete":
        wait_for(lambda: set(env.items_by_key("ds")) == moved, what="the items moved")
    else:
        wait_for(lambda: set(env.items_by_key("ds")) == first | moved, what="copies at /moved")
    wait_for(lambda: env.watch_status()["pending"] == 0, what="nothing left to do")
    assert env.watch_status()["synced"] == 2

    _edit(env, lambda d: d["watches"][0].update(dataset="ds2"))
    wait_for(lambda: set(env.items_by_key("ds2")) == moved, what="the items in the new dataset")
    wait_for(lambda: env.watch_status()["pending"] == 0, what="nothing left to do")
    left = set(env.items_by_key("ds"))
    assert left == (set() if on_delete == "delete" else first | moved)
    assert env.stop() == 0
