"""A local folder polled (sources/local_poll.py, sources/local.py): how the mode is
chosen and told, which folders a polled pass skips and when it must not, names that are
not UTF-8, and files that are not regular files."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from ingestd.config import Watch
from ingestd.core.errors import PermanentError
from ingestd.core.model import Entry
from ingestd.core.rawnames import to_os
from ingestd.core.regular import NotRegularFile, open_regular
from ingestd.pipeline.hashing import hash_checked
from ingestd.sources import open_source
from ingestd.sources.local import DEEP_RESCANS, LocalFolderSource
from ingestd.sources.local_poll import DirMemory, WatchMode, choose_mode
from ingestd.sources.mounts import Mount


class Known:
    """The ledger's entries as a KnownReader: what the pass compares with."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, int]] = {}

    def in_dir(self, parent: str) -> dict[str, tuple[int, int]]:
        return {rel: st for rel, st in self.entries.items() if rel.rpartition("/")[0] == parent}

    def dirs(self, under: str) -> set[str]:
        return {rel.rpartition("/")[0] for rel in self.entries}


class TakesAll:
    def accepts(self, relpath: str) -> bool:
        return True

    def prunes_dir(self, reldir: str) -> bool:
        return False


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watch(root: Path, **kw: Any) -> Watch:
    return Watch.model_validate({"name": "w", "source": str(root), "dataset": "d", **kw})


# --- the mode and its reason ------------------------------------------------------------


NFS = Mount("/mnt/scans", "nfs4", "server:/export")


def test_auto_polls_a_network_mount_and_says_why(tmp_path: Path) -> None:
    mode = choose_mode(watch(tmp_path), lambda _: NFS)
    assert mode.poll
    assert mode.reason == (
        "polled every 5s: /mnt/scans is a network or FUSE mount (nfs4); inotify does not "
        "see writes made by other machines"
    )
    mode = choose_mode(watch(tmp_path), lambda _: None)
    assert mode == WatchMode(False, "inotify events; full rescan every 10m")


def test_watch_mode_forces_either_way(tmp_path: Path) -> None:
    mode = choose_mode(watch(tmp_path, watch_mode="poll", poll_interval="2s"), lambda _: None)
    assert mode == WatchMode(True, "polled every 2s: watch_mode: poll")
    mode = choose_mode(watch(tmp_path, watch_mode="events"), lambda _: NFS)
    assert not mode.poll and "watch_mode: events" in mode.reason and "nfs4" in mode.reason


def test_open_source_features_follow_the_mode(tmp_path: Path) -> None:
    polled = open_source(watch(tmp_path, watch_mode="poll"))
    assert (polled.features.events, polled.features.local_paths) == (False, True)
    assert polled.features.mode_reason == "polled every 5s: watch_mode: poll"
    events = open_source(watch(tmp_path, watch_mode="events"))
    assert events.features.events and events.features.mode_reason.startswith("inotify events")
    bucket = open_source(
        Watch.model_validate({"name": "b", "source": "s3://my-bucket/p", "dataset": "d"})
    )
    assert bucket.features.mode_reason == "bucket prefixes have no events: polled every 1m"


# --- DirMemory: which folders a pass may skip ---------------------------------------------


def test_a_folder_is_skipped_only_after_two_listings_at_one_mtime() -> None:
    clock = Clock()
    m = DirMemory(600, clock)
    for expect_skip in (False, False, True, True):
        m.begin()
        kept = m.unchanged("a", 5)
        assert (kept is not None) is expect_skip
        if kept is None:
            m.listed("a", 5, ["a/b"], 3)
        else:
            assert (kept.subdirs, kept.files) == (("a/b",), 3)
        m.end(complete=True)
        clock.now += 5


def test_a_changed_mtime_a_busy_folder_and_a_full_pass_list_again() -> None:
    clock = Clock()
    m = DirMemory(600, clock)
    for _ in range(2):
        m.begin()
        assert m.unchanged("a", 5) is None
        m.listed("a", 5, [], 1)
        m.end(complete=True)
    m.begin()
    assert m.unchanged("a", 6) is None  # a name was added or removed
    m.listed("a", 6, [], 2)
    m.busy("a")  # ... and the listing found a new file, still settling
    m.end(complete=True)
    m.begin()
    assert m.unchanged("a", 6) is None  # busy: listed again although the mtime held
    m.listed("a", 6, [], 2)
    m.end(complete=True)
    m.begin()
    assert m.unchanged("a", 6) is not None
    m.end(complete=True)
    clock.now += 600
    m.begin()
    assert m.full and m.unchanged("a", 6) is None  # the full pass: in-place rewrites
    m.listed("a", 6, [], 2)
    m.end(complete=True)
    m.begin(force_full=True)
    assert m.unchanged("a", 6) is None


def test_folders_not_met_are_forgotten_and_a_failed_pass_starts_over() -> None:
    m = DirMemory(600, Clock())
    for _ in range(2):
        m.begin()
        for d in ("", "a"):
            assert m.unchanged(d, 1) is None
            m.listed(d, 1, [], 0)
        m.end(complete=True)
    m.begin()
    assert m.unchanged("", 1) is not None
    m.end(complete=True)  # "a" was not met: gone
    assert len(m) == 1
    m.begin()
    m.end(complete=False)
    m.begin()
    assert m.full and len(m) == 0


# --- a polled pass on a real folder --------------------------------------------------------


class Pass:
    """Scans of a polled LocalFolderSource; records the folders each one listed."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch, *, polled: bool = True) -> None:
        self.src = LocalFolderSource(root, mode=WatchMode(polled, "test"), rescan=600)
        self.clock = Clock()
        assert self.src._memory is not None
        self.src._memory._clock = self.clock
        self.known = Known()
        self.listed: list[str] = []
        real = os.scandir

        def scandir(path: Any) -> Any:
            if isinstance(path, str):  # the walk's; watchdog's own (bytes) are not counted
                self.listed.append(os.path.relpath(path, root))
            return real(path)

        monkeypatch.setattr("ingestd.sources.local.os.scandir", scandir)

    def run(self) -> tuple[list[str], list[str]]:
        """(changed relpaths, gone relpaths); the ledger then records what it saw."""
        self.listed = []
        changed: list[Entry] = []
        result = self.src.scan("", self.known, TakesAll(), changed.extend)
        for e in changed:
            self.known.entries[e.relpath] = (e.size, e.mtime_ns)
        for rel in result.gone:
            del self.known.entries[rel]
        self.clock.now += 5
        return sorted(e.relpath for e in changed), sorted(result.gone)


def test_a_polled_pass_skips_unchanged_folders_and_finds_what_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "1.dat").write_bytes(b"1")
    (tmp_path / "b" / "2.dat").write_bytes(b"2")
    p = Pass(tmp_path, monkeypatch)
    assert p.run() == (["a/1.dat", "b/2.dat"], [])
    assert sorted(p.listed) == [".", "a", "b"]
    assert p.run() == ([], [])  # listed again: the first listing set the mtime memory
    assert p.run() == ([], [])
    assert p.listed == []  # nothing can have changed: nothing listed

    (tmp_path / "b" / "3.dat").write_bytes(b"3")
    assert p.run() == (["b/3.dat"], [])
    assert p.listed == ["b"]
    (tmp_path / "a" / "1.dat").unlink()
    assert p.run() == ([], ["a/1.dat"])
    assert "a" in p.listed

    # Rewritten in place, same size: the folder's mtime holds, so only a full pass sees it.
    for _ in range(3):
        p.run()
    assert p.run() == ([], []) and p.listed == []
    f = tmp_path / "b" / "2.dat"
    f.write_bytes(b"X")
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert p.run() == ([], [])
    p.clock.now += 600
    assert p.run() == (["b/2.dat"], [])
    assert sorted(p.listed) == [".", "a", "b"]


def test_a_new_folder_below_a_skipped_one_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a" / "deep").mkdir(parents=True)
    p = Pass(tmp_path, monkeypatch)
    for _ in range(3):
        p.run()
    assert p.listed == []
    (tmp_path / "a" / "deep" / "new").mkdir()
    (tmp_path / "a" / "deep" / "new" / "x.dat").write_bytes(b"x")
    assert p.run() == (["a/deep/new/x.dat"], [])
    assert sorted(p.listed) == ["a/deep", "a/deep/new"]


def test_with_events_a_timer_rescan_skips_unchanged_folders_until_events_are_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """inotify reports in-place rewrites, so a timer rescan of an events watch lists
    only folders whose mtime moved, every folder each DEEP_RESCANS rescans, and every
    folder after events were lost or while no observer ran."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.dat").write_bytes(b"1")
    p = Pass(tmp_path, monkeypatch, polled=False)
    assert p.src.features.events
    assert p.run() == (["a/1.dat"], [])
    p.run()
    assert p.run() == ([], []) and p.listed == []
    (tmp_path / "a" / "2.dat").write_bytes(b"2")
    assert p.run() == (["a/2.dat"], []) and p.listed == ["a"]

    lost: list[str] = []
    p.src.start(lambda *_: None, lambda: lost.append("overflow"))
    try:
        assert sorted(p.run()[0]) == [] and sorted(p.listed) == [".", "a"]  # observer new
        p.run()
        assert p.run() == ([], []) and p.listed == []
        p.src._events_lost()  # what the observer's handler calls on EventsLostEvent
        assert lost == ["overflow"]
        p.run()
        assert sorted(p.listed) == [".", "a"]  # events were lost: everything listed
    finally:
        p.src.stop()
    p.run()
    assert p.run() == ([], []) and p.listed == []
    p.clock.now += 600 * DEEP_RESCANS
    p.run()
    assert sorted(p.listed) == [".", "a"]  # the deep rescan


# --- names that are not UTF-8 ------------------------------------------------------------


def test_names_that_are_not_utf8_are_listed_in_text_form_and_opened(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path)
    os.mkdir(root + b"/d\xff")
    for name, data in ((b"/caf\xe9.dat", b"cafe"), (b"/d\xff/x.dat", b"x")):
        fd = os.open(root + name, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, data)
        os.close(fd)
    src = LocalFolderSource(tmp_path)
    changed: list[Entry] = []
    result = src.scan("", Known(), TakesAll(), changed.extend)
    rels = sorted(e.relpath for e in changed)
    assert rels == ["caf\U0010fffeE9.dat", "d\U0010fffeFF/x.dat"]
    assert result.errors == []
    for rel in rels:
        rel.encode("utf-8")  # the ledger can store it
        assert os.path.exists(src.path_of(rel))
    assert os.fsencode(src.path_of(rels[0])) == root + b"/caf\xe9.dat"
    assert src.files.names("", "caf") == {rels[0]}
    assert [e.relpath for e in src.files.list_files("d\U0010fffeFF")] == [rels[1]]
    st = src.files.stat(rels[1])
    assert isinstance(st, Entry) and st.size == 1


# --- files that are not regular files ------------------------------------------------------


def _in_thread(fn: Any) -> Any:
    """Run fn with a deadline: a blocking open must fail the test, not hang it."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "blocked on a FIFO"
    return out[0]


def test_a_fifo_is_listed_and_never_blocks_a_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.jpg")
    os.mkfifo(tmp_path / "y.dat")
    src = LocalFolderSource(tmp_path)
    changed: list[Entry] = []
    src.scan("", Known(), TakesAll(), changed.extend)
    assert sorted(e.relpath for e in changed) == ["x.jpg", "y.dat"]  # to fail as items
    assert src.stat_many(["y.dat"])[0] is not None
    assert _in_thread(lambda: src.files.sniff("y.dat")) is None
    err = _in_thread(lambda: src.files.image_size("x.jpg"))
    assert isinstance(err, NotRegularFile)
    assert "y.dat" in str(_in_thread(lambda: open_regular(str(tmp_path / "y.dat"))))
    st = os.stat(tmp_path / "y.dat")
    err = _in_thread(
        lambda: hash_checked(str(tmp_path / "y.dat"), st.st_size, st.st_mtime_ns, False, None)
    )
    assert isinstance(err, PermanentError)
    assert str(err) == (
        f"{tmp_path}/y.dat is not a regular file (a FIFO, socket or device); replace it "
        "with a file or remove it"
    )


def test_open_regular_clears_nonblocking_and_keeps_symlink_rules(tmp_path: Path) -> None:
    import fcntl

    f = tmp_path / "f.dat"
    f.write_bytes(b"data")
    fd = open_regular(str(f))
    try:
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert os.read(fd, 10) == b"data"
    finally:
        os.close(fd)
    os.symlink(f, tmp_path / "link.dat")
    os.close(open_regular(str(tmp_path / "link.dat")))
    with pytest.raises(OSError) as info:
        open_regular(str(tmp_path / "link.dat"), follow_symlinks=False)
    assert info.value.errno == 40  # ELOOP, as an O_NOFOLLOW open says
    with pytest.raises(IsADirectoryError):
        open_regular(str(tmp_path))
    assert to_os("plain") == "plain"
