"""Polling a local folder: when (a network or FUSE mount, or `watch_mode: poll`), how
often, and which folders a pass may skip.

A polled folder has no events (Features.events False), so the runner lists it every
`poll_interval` and settles files the way it settles bucket objects (ListedSettling:
old enough, or listed unchanged by a later pass). Listing a big share every few seconds
costs a readdir and a stat per file, so a pass stats each folder first and skips the
listing of one that cannot have changed (DirMemory).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ingestd.config import Watch
from ingestd.sources.mounts import Mount, remote_mount


@dataclass(frozen=True, slots=True)
class WatchMode:
    """How a local folder is watched, and why, in words for status and the log."""

    poll: bool
    reason: str


def _every(seconds: float) -> str:
    return f"{seconds:g}s" if seconds < 60 or seconds % 60 else f"{seconds / 60:g}m"


def choose_mode(
    watch: Watch, find_mount: Callable[[str], Mount | None] = remote_mount
) -> WatchMode:
    """`watch_mode` as the user set it, or for `auto`: poll a network or FUSE mount
    (inotify does not see what other machines write), events anywhere else."""
    folder = watch.source
    polled = f"polled every {_every(watch.poll_interval)}"
    events = f"inotify events; full rescan every {_every(watch.rescan)}"
    if watch.watch_mode == "poll":
        return WatchMode(True, f"{polled}: watch_mode: poll")
    mount = find_mount(folder)
    if watch.watch_mode == "events":
        if mount is not None:
            return WatchMode(
                False,
                f"{events}: watch_mode: events, although {mount.mount_point} is a "
                f"network or FUSE mount ({mount.fs_type}); changes made by other "
                "machines are seen only at rescans",
            )
        return WatchMode(False, f"{events}: watch_mode: events")
    if mount is not None:
        return WatchMode(
            True,
            f"{polled}: {mount.mount_point} is a network or FUSE mount ({mount.fs_type}); "
            "inotify does not see writes made by other machines",
        )
    return WatchMode(False, events)


@dataclass(slots=True)
class _Dir:
    mtime_ns: int
    stable: bool  # listed twice at this mtime: any change since shows in the mtime
    busy: bool  # the last listing found new, changed or gone files: list it again
    subdirs: tuple[str, ...]
    files: int  # files the watch takes, as last listed


class DirMemory:
    """What each folder looked like when a polled pass last listed it, to skip listing
    folders that cannot have changed.

    A folder's mtime changes when a name in it is created, removed or renamed, not when
    a file in it is rewritten in place. So a folder is listed again when its mtime
    changed, when its last listing found anything new, changed or gone (a file still
    settling must be listed again, and a deletion must be seen until it is applied), and
    at a full pass every `full_every` seconds, which is where an in-place rewrite in an
    unchanged folder is found. A folder is skipped only after two listings saw the same
    mtime: on a file system with coarse timestamps, a name created in the same tick as
    the first listing leaves the mtime as it was.

    Used by one pass at a time (the runner's pass loop); the walk thread owns it then.
    """

    def __init__(self, full_every: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.full_every = full_every
        self._clock = clock
        self._dirs: dict[str, _Dir] = {}
        self._seen: set[str] = set()
        self._last_full: float | None = None
        self.full = True  # the pass in progress lists every folder

    def begin(self, *, force_full: bool = False) -> None:
        now = self._clock()
        self.full = (
            force_full or self._last_full is None or now - self._last_full >= self.full_every
        )
        if self.full:
            self._last_full = now
        self._seen = set()

    def unchanged(self, reldir: str, mtime_ns: int) -> _Dir | None:
        """The memory of `reldir` when this pass may skip listing it, else None."""
        self._seen.add(reldir)
        d = self._dirs.get(reldir)
        if self.full or d is None or d.busy or not d.stable or d.mtime_ns != mtime_ns:
            return None
        return d

    def listed(self, reldir: str, mtime_ns: int, subdirs: list[str], files: int) -> None:
        prev = self._dirs.get(reldir)
        stable = prev is not None and prev.mtime_ns == mtime_ns
        self._dirs[reldir] = _Dir(mtime_ns, stable, False, tuple(subdirs), files)

    def busy(self, reldir: str) -> None:
        """The listing of `reldir` found something to do: list it again next pass."""
        d = self._dirs.get(reldir)
        if d is not None:
            d.busy = True

    def forget(self, reldir: str) -> None:
        self._dirs.pop(reldir, None)

    def end(self, *, complete: bool) -> None:
        """Drop folders this pass did not meet (gone, or now excluded). After a pass
        that failed part-way nothing is known for sure: start again from a full pass."""
        if not complete:
            self._dirs.clear()
            self._last_full = None
            return
        for gone in self._dirs.keys() - self._seen:
            del self._dirs[gone]

    def __len__(self) -> int:
        return len(self._dirs)
