"""Local folders: a watchdog (inotify) observer for hints, and a scandir walk for truth.

Events are only hints ("look here again"); the walk compares what is on disk with the
ledger's entries. The observer is installed before the first walk so nothing created
during the walk is missed, and subscribes only to created/closed/moved/deleted: with
every event kind subscribed, bursts overflow the kernel queue (DESIGN.md, measured).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from ingestd.core.filters import PathFilter
from ingestd.core.model import Entry

# (kind, relpath, is_dir) where kind is created | closed | gone | moved_in | dir
EventSink = Callable[[str, str, bool], None]
KnownInDir = Callable[[str], dict[str, tuple[int, int]]]
KnownDirs = Callable[[str], set[str]]

_EVENT_FILTER = [
    FileCreatedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]


class _OverflowListener(logging.Handler):
    """watchdog reports an inotify queue overflow only through its logger; listen there."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.callbacks: set[Callable[[], None]] = set()
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            with self._lock:
                callbacks = list(self.callbacks)
            for cb in callbacks:
                cb()


_overflow = _OverflowListener()
for _name in ("watchdog.observers.inotify_c", "watchdog.observers.inotify"):
    logging.getLogger(_name).addHandler(_overflow)


class _Handler(FileSystemEventHandler):
    def __init__(self, root: str, deliver: EventSink) -> None:
        self._root = root
        self._deliver = deliver

    def _rel(self, path: str | bytes) -> str | None:
        p = os.fsdecode(path)
        if p == self._root:
            return None
        if not p.startswith(self._root + os.sep):
            return None
        return p[len(self._root) + 1 :].replace(os.sep, "/")

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Runs on watchdog's thread: translate and hand off, nothing more.
        kind = event.event_type
        is_dir = event.is_directory
        if kind == "moved":
            src, dst = self._rel(event.src_path), self._rel(event.dest_path)
            if src is not None:
                self._deliver("gone", src, is_dir)
            if dst is not None:
                self._deliver("moved_in", dst, is_dir)
            return
        rel = self._rel(event.src_path)
        if rel is None:
            return
        if kind == "created":
            self._deliver("created", rel, is_dir)
        elif kind == "closed":
            self._deliver("closed", rel, is_dir)
        elif kind == "deleted":
            self._deliver("gone", rel, is_dir)


@dataclass(slots=True)
class ScanResult:
    changed: int = 0
    gone: list[str] = field(default_factory=list)
    files: int = 0
    errors: list[str] = field(default_factory=list)
    root_missing: bool = False


class LocalSource:
    def __init__(
        self, root: Path, path_filter: PathFilter, *, follow_symlinks: bool = False
    ) -> None:
        self.root = str(root)
        self.filter = path_filter
        self.follow_symlinks = follow_symlinks
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._overflow_cb: Callable[[], None] | None = None

    # -- events ---------------------------------------------------------------------------

    def start(self, deliver: EventSink, on_overflow: Callable[[], None]) -> None:
        observer = Observer()
        observer.schedule(
            _Handler(self.root, deliver),
            self.root,
            recursive=True,
            event_filter=_EVENT_FILTER,
            # Never follow links in the watcher: a link loop makes watchdog register the
            # tree again and again (wrong paths, an endless walk). Folders reached through
            # links are covered by the walks, which detect loops.
            follow_symlink=False,
        )
        observer.daemon = True
        observer.start()
        self._observer = observer
        self._overflow_cb = on_overflow
        with _overflow._lock:
            _overflow.callbacks.add(on_overflow)

    def alive(self) -> bool:
        return self._observer is not None and self._observer.is_alive()

    def stop(self) -> None:
        if self._overflow_cb is not None:
            with _overflow._lock:
                _overflow.callbacks.discard(self._overflow_cb)
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    # -- walking --------------------------------------------------------------------------

    def scan(
        self,
        subdir: str,
        known_in_dir: KnownInDir,
        known_dirs: KnownDirs,
        emit_changed: Callable[[list[Entry]], None],
        *,
        emit_all: bool = False,
    ) -> ScanResult:
        """Walk `subdir` (relative; '' for the whole watch) and compare with the ledger's
        entries one directory at a time, so memory follows the largest directory, not
        the tree. Changed and new files go to `emit_changed` in chunks (every file with
        `emit_all`, to plan them all again); gone files are returned together so a
        deletion guard can judge the whole pass."""
        result = ScanResult()
        if not os.path.isdir(self.root):
            result.root_missing = True
            return result
        visited: set[str] = set()
        chunk: list[Entry] = []
        for reldir, files in self._walk(subdir, result):
            visited.add(reldir)
            known = known_in_dir(reldir)
            for bad in result.errors:
                known.pop(bad, None)  # unreadable is not gone
            result.files += len(files)
            # The hot loop of a rescan: tuples only, an Entry just for what changed.
            for rel, size, mtime_ns in files:
                if known.pop(rel, None) != (size, mtime_ns) or emit_all:
                    chunk.append(Entry(rel, size, mtime_ns))
            if known:
                result.gone.extend(known)
            if len(chunk) >= 1000:
                result.changed += len(chunk)
                emit_changed(chunk)
                chunk = []
        if chunk:
            result.changed += len(chunk)
            emit_changed(chunk)
        for reldir in known_dirs(subdir) - visited:
            if any(reldir == e or reldir.startswith(e + "/") for e in result.errors):
                continue  # unreadable folders are not deletions
            result.gone.extend(known_in_dir(reldir))
        return result

    def _walk(
        self, subdir: str, result: ScanResult
    ) -> Iterator[tuple[str, list[tuple[str, int, int]]]]:
        """Per folder: (reldir, [(relpath, size, mtime_ns)]) of the files the watch takes."""
        seen_dirs: set[tuple[int, int]] = set()
        stack = [subdir]
        while stack:
            reldir = stack.pop()
            absdir = os.path.join(self.root, reldir) if reldir else self.root
            files: list[tuple[str, int, int]] = []
            follow = self.follow_symlinks
            accepts = self.filter.accepts
            prefix = f"{reldir}/" if reldir else ""
            try:
                if self.follow_symlinks:
                    st = os.stat(absdir)
                    ident = (st.st_dev, st.st_ino)
                    if ident in seen_dirs:
                        continue  # a symlink loop, or the same folder reached twice
                    seen_dirs.add(ident)
                with os.scandir(absdir) as it:
                    for de in it:
                        rel = prefix + de.name
                        try:
                            if de.is_dir(follow_symlinks=follow):
                                if not self.filter.prunes_dir(rel):
                                    stack.append(rel)
                                continue
                            if not accepts(rel):
                                continue
                            s = de.stat(follow_symlinks=follow)
                        except OSError as e:
                            if isinstance(e, FileNotFoundError):
                                continue  # vanished between listing and stat
                            # e.g. a symlink loop when following links: report, go on
                            result.errors.append(rel)
                            continue
                        if S_ISREG(s.st_mode):
                            files.append((rel, s.st_size, s.st_mtime_ns))
            except FileNotFoundError:
                if reldir == subdir and not subdir:
                    result.root_missing = True
                continue
            except NotADirectoryError:
                continue
            except OSError:
                result.errors.append(reldir)
                continue
            yield reldir, files
