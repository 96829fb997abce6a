"""A local folder as a Source (core.source): a watchdog (inotify) observer for hints, a
scandir walk for truth, and plain os reads for the planner and the sync step.

Events are only hints ("look here again"); the walk compares what is on disk with the
ledger's entries. The observer is installed before the first walk so nothing created
during the walk is missed, and subscribes only to created/closed/moved/deleted: with
every event kind subscribed, bursts overflow the kernel queue (docs/design.md, measured).

This module is the boundary of file names (core/rawnames.py): every relpath it hands
out is in text form (bytes that are not UTF-8 escaped, so the ledger can hold them) and
every path it opens goes back through `to_os`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISBLK, S_ISCHR, S_ISDIR, S_ISFIFO, S_ISREG, S_ISSOCK
from typing import TYPE_CHECKING, Literal

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from ingestd.core.model import Entry, SlotType
from ingestd.core.rawnames import shown, to_os, to_text
from ingestd.core.regular import NotRegularFile, open_regular, open_regular_file
from ingestd.core.source import (
    NOT_A_FILE,
    Changes,
    EventSink,
    Features,
    Known,
    KnownReader,
    PathTest,
    SourceChanged,
    SourceError,
    Stat,
)
from ingestd.media.detect import type_of_prefix
from ingestd.plan.metadata import MAX_SIDECAR_BYTES, Sidecar, parse_sidecar
from ingestd.sources.local_poll import DirMemory, WatchMode

if TYPE_CHECKING:
    from ingestd.media.dicom import DicomHeader

CHUNK = 1 << 20
# With events, every DEEP_RESCANS-th timer rescan lists every folder (at the default
# `rescan: 10m`, hourly: Syncthing's full rescan interval with its watcher on). At a
# million files a full pass is ~7 s of CPU: every 10 min that was 1.15 % of a core for
# an idle daemon; a pass of unchanged folders costs 0.025x that (bench/rescan.py).
DEEP_RESCANS = 6
# Chunks of changed files (1,000 each) the walk thread may be ahead of the pass by: it
# lists far faster than files are settled and planned, and a first pass of a million
# files must not wait in memory (issue 16).
HANDOVER = 4


def _is_file(mode: int) -> bool:
    """What the watch lists as a file: regular files, and FIFOs, sockets and devices,
    which are never read (core.regular) but fail their item with the reason, so they
    are seen in status rather than silently left out. Not folders, nor symbolic links
    that are not followed."""
    return S_ISREG(mode) or S_ISFIFO(mode) or S_ISSOCK(mode) or S_ISCHR(mode) or S_ISBLK(mode)


_EVENT_FILTER = [
    FileCreatedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
    # The kernel's queue overflowed: events were lost, once per watch (after watchdog
    # rebuilt its watches), so a rescan must repair what they would have said.
    EventsLostEvent,
]


class _Handler(FileSystemEventHandler):
    def __init__(self, root: str, deliver: EventSink, on_lost: Callable[[], None]) -> None:
        self._root = root
        self._deliver = deliver
        self._on_lost = on_lost

    def _rel(self, path: str | bytes) -> str | None:
        p = os.fsdecode(path)
        if p == self._root:
            return None
        if not p.startswith(self._root + os.sep):
            return None
        return to_text(p[len(self._root) + 1 :].replace(os.sep, "/"))

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Runs on watchdog's thread: translate and hand off, nothing more.
        kind = event.event_type
        is_dir = event.is_directory
        if kind == "events_lost":
            self._on_lost()
            return
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


class _WalkStopped(Exception):
    """The pass stopped taking a walk's chunks (it failed or was cancelled)."""


@dataclass(slots=True)
class ScanResult:
    changed: int = 0
    gone: list[str] = field(default_factory=list)
    files: int = 0
    errors: list[str] = field(default_factory=list)
    root_missing: bool = False


def _list_dir(
    reldir: str, absdir: str, takes: PathTest, follow: bool, result: ScanResult
) -> tuple[list[tuple[str, int, int]], list[str]]:
    """One folder's files the watch takes, and its sub-folders to walk. Names are in
    core.rawnames' text form. FIFOs, sockets and devices are listed too, so that each
    fails as an item with the reason instead of being silently left out. An entry that
    cannot be stat'ed goes to `result.errors`; the others are listed."""
    files: list[tuple[str, int, int]] = []
    subdirs: list[str] = []
    accepts = takes.accepts
    prefix = f"{reldir}/" if reldir else ""
    with os.scandir(absdir) as it:
        for de in it:
            rel = prefix + to_text(de.name)
            try:
                if de.is_dir(follow_symlinks=follow):
                    if not takes.prunes_dir(rel):
                        subdirs.append(rel)
                    continue
                if not accepts(rel):
                    continue
                s = de.stat(follow_symlinks=follow)
            except FileNotFoundError:
                continue  # vanished between listing and stat
            except (OSError, ValueError):
                # e.g. a symlink loop when following links: report, go on
                result.errors.append(rel)
                continue
            if _is_file(s.st_mode):
                files.append((rel, s.st_size, s.st_mtime_ns))
    return files, subdirs


class LocalFolderSource:
    """A folder on this machine: local paths, no URLs; events (inotify), or polled
    when `mode` says so (a network or FUSE mount: sources/local_poll.py). Both remember
    folders between passes to skip listing unchanged ones (DirMemory). A polled source
    lists everything every `rescan` seconds, where an in-place rewrite in an unchanged
    folder is found. With events, inotify reports such rewrites (close-after-write), so
    a timer rescan may skip too and lists everything every DEEP_RESCANS rescans; after
    lost events (an overflow) or a (re)started observer the next pass lists everything."""

    def __init__(
        self,
        root: Path | str,
        *,
        follow_symlinks: bool = False,
        mode: WatchMode | None = None,
        rescan: float = 600.0,
    ) -> None:
        self.root = str(root)
        self.where = self.root
        self.follow_symlinks = follow_symlinks
        self.files = LocalFiles(self.root, follow_symlinks)
        polled = mode is not None and mode.poll
        self.features = Features(
            events=not polled,
            local_paths=True,
            urls=False,
            mode_reason=mode.reason if mode is not None else "",
        )
        self._memory = DirMemory(rescan if polled else rescan * DEEP_RESCANS)
        self._full_next = False  # events were lost: the next pass lists every folder
        self._on_overflow: Callable[[], None] | None = None
        self._observer: Observer | None = None  # type: ignore[valid-type]

    def path_of(self, relpath: str) -> str:
        return os.path.join(self.root, to_os(relpath)) if relpath else self.root

    def url_of(self, relpath: str) -> str:
        raise NotImplementedError("a local folder has no URLs (Features.urls is False)")

    def https_url_of(self, relpath: str) -> str | None:
        raise NotImplementedError("a local folder has no URLs (Features.urls is False)")

    # -- events ---------------------------------------------------------------------------

    def start(self, deliver: EventSink, on_overflow: Callable[[], None]) -> None:
        # Whatever happened while no observer ran was not reported.
        self._full_next = True
        self._on_overflow = on_overflow
        observer = Observer()
        observer.schedule(
            _Handler(self.root, deliver, self._events_lost),
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

    def _events_lost(self) -> None:
        """On watchdog's thread: the kernel dropped events; the next pass lists all."""
        self._full_next = True
        if self._on_overflow is not None:
            self._on_overflow()

    def alive(self) -> bool:
        return self._observer is not None and self._observer.is_alive()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    # -- walking --------------------------------------------------------------------------

    async def changes(
        self, subdir: str, known: Known, takes: PathTest, *, everything: bool = False
    ) -> AsyncIterator[Changes]:
        """The walk runs in a thread and hands its batches over as it goes; gone files
        come in the last batch, so a deletion guard judges the whole pass."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Changes | ScanResult | BaseException] = asyncio.Queue()
        slots = threading.Semaphore(HANDOVER)
        stopped = threading.Event()

        def put(item: Changes | ScanResult | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def put_chunk(chunk: list[Entry]) -> None:
            # The walk waits for the pass to take a chunk (or to give up on the walk).
            while not slots.acquire(timeout=0.5):
                if stopped.is_set():
                    raise _WalkStopped
            put(Changes(changed=chunk))

        def walk() -> None:
            try:
                with known.reader() as reader:
                    result = self.scan(subdir, reader, takes, put_chunk, emit_all=everything)
                put(result)
            except BaseException as e:
                put(e)

        worker = asyncio.ensure_future(asyncio.to_thread(walk))
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, ScanResult):
                    if item.root_missing:
                        raise SourceError(
                            "missing",
                            f"source folder {self.root} is missing (unmounted disk? deleted?)",
                        )
                    # The walk counts every file it takes, changed or not, once, at its end.
                    yield Changes(gone=item.gone, listed=item.files, errors=item.errors)
                    return
                yield item
                slots.release()  # the pass has taken this chunk in
        finally:
            stopped.set()
            await worker

    def scan(
        self,
        subdir: str,
        known: KnownReader,
        takes: PathTest,
        emit_changed: Callable[[list[Entry]], None],
        *,
        emit_all: bool = False,
    ) -> ScanResult:
        """Walk `subdir` (relative; '' for the whole watch) and compare with the ledger's
        entries one directory at a time, so memory follows the largest directory, not
        the tree. Changed and new files go to `emit_changed` in chunks (every file with
        `emit_all`, to plan them all again); gone files are returned together so a
        deletion guard can judge the whole pass. A polled source skips folders its
        DirMemory says cannot have changed (whole-watch passes only)."""
        result = ScanResult()
        if not os.path.isdir(self.root):
            result.root_missing = True
            return result
        memory = self._memory if not subdir else None
        if memory is not None:
            full, self._full_next = emit_all or self._full_next, False
            memory.begin(force_full=full)
        visited: set[str] = set()
        chunk: list[Entry] = []
        for reldir, files in self._walk(subdir, takes, result, memory):
            visited.add(reldir)
            if files is None:  # skipped: unchanged since a listing that matched the ledger
                continue
            known_here = known.in_dir(reldir)
            for bad in result.errors:
                known_here.pop(bad, None)  # unreadable is not gone
            before = len(chunk)
            # The hot loop of a rescan: tuples only, an Entry just for what changed.
            for rel, size, mtime_ns in files:
                if known_here.pop(rel, None) != (size, mtime_ns) or emit_all:
                    chunk.append(Entry(rel, size, mtime_ns))
            if known_here:
                result.gone.extend(known_here)
            if memory is not None and (known_here or len(chunk) > before):
                memory.busy(reldir)
            if len(chunk) >= 1000:
                result.changed += len(chunk)
                emit_changed(chunk)
                chunk = []
        if chunk:
            result.changed += len(chunk)
            emit_changed(chunk)
        for reldir in known.dirs(subdir) - visited:
            if any(reldir == e or reldir.startswith(e + "/") for e in result.errors):
                continue  # unreadable folders are not deletions
            result.gone.extend(known.in_dir(reldir))
        if memory is not None:
            memory.end(complete=not result.root_missing)
        return result

    def _walk(
        self, subdir: str, takes: PathTest, result: ScanResult, memory: DirMemory | None
    ) -> Iterator[tuple[str, list[tuple[str, int, int]] | None]]:
        """Per folder: (reldir, [(relpath, size, mtime_ns)]) of the files the watch takes,
        or (reldir, None) for a folder `memory` lets this pass skip (its files are
        counted here). A folder or entry that cannot be read is in `result.errors`; the
        rest of the walk goes on."""
        seen_dirs: set[tuple[int, int]] = set()
        stack = [subdir]
        while stack:
            reldir = stack.pop()
            absdir = self.path_of(reldir)
            mtime_ns = 0
            try:
                if self.follow_symlinks or memory is not None:
                    st = os.stat(absdir)
                    mtime_ns = st.st_mtime_ns
                    if self.follow_symlinks:
                        ident = (st.st_dev, st.st_ino)
                        if ident in seen_dirs:
                            continue  # a symlink loop, or the same folder reached twice
                        seen_dirs.add(ident)
                    if memory is not None and (kept := memory.unchanged(reldir, mtime_ns)):
                        result.files += kept.files
                        stack.extend(kept.subdirs)
                        yield reldir, None
                        continue
                errors = len(result.errors)
                files, subdirs = _list_dir(reldir, absdir, takes, self.follow_symlinks, result)
            except FileNotFoundError:
                if reldir == subdir and not subdir:
                    result.root_missing = True
                continue
            except NotADirectoryError:
                continue
            except OSError:
                result.errors.append(reldir)
                if memory is not None:
                    memory.forget(reldir)
                continue
            stack.extend(subdirs)
            result.files += len(files)
            if memory is not None:
                memory.listed(reldir, mtime_ns, subdirs, len(files))
                if len(result.errors) > errors:
                    memory.busy(reldir)  # an unreadable entry: look again next pass
            yield reldir, files

    # -- reads for the sync step ----------------------------------------------------------

    def stat_many(self, relpaths: Sequence[str]) -> list[Stat]:
        out: list[Stat] = []
        for rel in relpaths:
            try:
                s = os.stat(self.path_of(rel), follow_symlinks=self.follow_symlinks)
            except (FileNotFoundError, NotADirectoryError):
                out.append(None)
                continue
            except OSError:
                # Unreadable metadata (EACCES on a parent, ELOOP): treat as present and
                # unchanged-less so the sync step reports the real reason.
                out.append((-1, -1))
                continue
            out.append((s.st_size, s.st_mtime_ns) if _is_file(s.st_mode) else None)
        return out

    async def stat(self, relpath: str) -> Entry | None:
        st = await asyncio.to_thread(self.files.stat, relpath)
        return st if isinstance(st, Entry) else None

    def _open_version(self, entry: Entry) -> int:
        """A descriptor on exactly the version `entry` describes (regular files only,
        core.regular: a FIFO fails the item instead of blocking the open)."""
        path = self.path_of(entry.relpath)
        try:
            fd = open_regular(path, follow_symlinks=self.follow_symlinks)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise SourceChanged(f"{shown(path)} vanished") from None
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
            os.close(fd)
            raise SourceChanged(f"{shown(path)} is no longer the version listed")
        return fd

    async def open(self, entry: Entry, *, chunk: int = CHUNK) -> AsyncIterator[bytes]:
        fd = await asyncio.to_thread(self._open_version, entry)
        try:
            while data := await asyncio.to_thread(os.read, fd, chunk):
                yield data
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
                raise SourceChanged(f"{self.where}/{entry.relpath} changed while it was read")
        finally:
            os.close(fd)

    async def read_range(self, relpath: str, start: int, end: int) -> bytes:
        def read() -> bytes:
            path = self.path_of(relpath)
            with open_regular_file(path, follow_symlinks=self.follow_symlinks) as fh:
                fh.seek(start)
                return fh.read(max(0, end - start))

        return await asyncio.to_thread(read)

    async def download(self, entry: Entry, dest: str) -> None:
        def copy() -> None:
            fd = self._open_version(entry)
            os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
            with os.fdopen(fd, "rb") as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)

        await asyncio.to_thread(copy)

    async def close(self) -> None:
        self.stop()


class LocalFiles:
    """The planner's reads (core.source.SourceFiles) on a local folder: plain os calls."""

    def __init__(self, root: str, follow_symlinks: bool) -> None:
        self.root = root
        self.follow_symlinks = follow_symlinks

    def _path(self, relpath: str) -> str:
        return os.path.join(self.root, to_os(relpath)) if relpath else self.root

    def read_sidecar(self, relpath: str) -> tuple[Sidecar, Entry] | None:
        sidecar = read_sidecar(self.root, relpath)
        if sidecar is None:
            return None
        return sidecar, Entry(relpath, sidecar.size, sidecar.mtime_ns)

    def sniff(self, relpath: str) -> SlotType | None:
        # media.detect.sniff opens by name and would block on a FIFO: read the prefix
        # from a regular-only descriptor. Unreadable is unknown; the sync step says why.
        try:
            with open_regular_file(self._path(relpath), follow_symlinks=self.follow_symlinks) as fh:
                head = fh.read(132)
        except (OSError, NotRegularFile):
            return None
        return type_of_prefix(head)

    def image_size(self, relpath: str) -> tuple[int, int]:
        from ingestd.media.images import image_size

        return image_size(self._path(relpath))  # opens regular files only

    def dicom_header(self, relpath: str, keywords: Sequence[str]) -> DicomHeader:
        from ingestd.media.dicom import read_header

        return read_header(self._path(relpath), keywords)  # opens regular files only

    def names(self, parent: str, start: str) -> set[str] | None:
        try:
            names = os.listdir(self._path(parent))
        except OSError:
            return None
        return {t for t in map(to_text, names) if t.startswith(start)}

    def stat(self, relpath: str) -> Entry | Literal["not-a-file"] | None:
        try:
            st = os.stat(self._path(relpath), follow_symlinks=self.follow_symlinks)
        except OSError:
            return None
        if _is_file(st.st_mode):  # a FIFO too: it fails as its item, with the reason
            return Entry(relpath, st.st_size, st.st_mtime_ns)
        return NOT_A_FILE

    def list_files(self, reldir: str) -> list[Entry]:
        out = []
        try:
            with os.scandir(self._path(reldir)) as it:
                for de in it:
                    try:
                        st = de.stat(follow_symlinks=self.follow_symlinks)
                    except OSError:
                        continue
                    if not _is_file(st.st_mode):
                        continue
                    name = to_text(de.name)
                    rel = f"{reldir}/{name}" if reldir else name
                    out.append(Entry(rel, st.st_size, st.st_mtime_ns))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return out


def read_sidecar(root: str, relpath: str) -> Sidecar | None:
    """Stat and parse a sidecar file; None when there is none.

    Opened without blocking and read only when it is a regular file: a FIFO of that
    name would otherwise hold the planning thread (and with it the watch, and a
    SIGTERM) until something wrote to it. A name too long for the file system (a
    255-byte file name plus ".json") cannot be a sidecar: there is none."""
    path = os.path.join(root, to_os(relpath))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return None
        return Sidecar(relpath, 0, 0, None, f"cannot be read: {e.strerror}")
    try:
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if S_ISDIR(st.st_mode):
                return None
            if not S_ISREG(st.st_mode):
                return Sidecar(
                    relpath,
                    0,
                    st.st_mtime_ns,
                    None,
                    "is not a regular file (a FIFO, socket or device); replace it with "
                    "a JSON file or remove it",
                )
            if st.st_size > MAX_SIDECAR_BYTES:
                return Sidecar(relpath, st.st_size, st.st_mtime_ns, None, "larger than 1 MiB")
            raw = fh.read(MAX_SIDECAR_BYTES + 1)
    except OSError as e:
        return Sidecar(relpath, 0, 0, None, f"cannot be read: {e.strerror}")
    return parse_sidecar(relpath, st.st_size, st.st_mtime_ns, raw)
