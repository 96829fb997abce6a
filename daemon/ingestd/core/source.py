"""The one interface every watch source implements: a local folder, a bucket prefix, or
the in-memory double the tests use (sources/).

Narrow on purpose, in the manner of httpx's transports and rclone's backends: a small
required surface that the watch runner, the planner and the sync step use whatever the
source is, plus optional `Features` that a caller tests for once, never by type:

- required: `changes` (one listing pass compared with what the ledger knows), `files`
  (the planner's blocking reads: sidecars, headers, a folder's listing), `stat`, `open`
  (a version-pinned byte stream), `read_range`, `download`, `close`;
- `Features.events`: `start`/`stop`/`alive` deliver change hints (inotify), so the runner
  settles hinted files and rescans on a timer; a source without events is polled;
- `Features.local_paths`: `path_of` gives a file on this machine that the sync step may
  hash and hand to a sink by path (no stream, group puts);
- `Features.urls`: `url_of` gives the URL a platform can register without the bytes
  moving (`transfer: register`).

Sources are opened by `sources.open_source(watch)`; the runtime hands each runner and
each sync side its own. Paths are relative to the watch root and use '/'.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from ingestd.core.model import Entry, SlotType

if TYPE_CHECKING:
    from ingestd.media.dicom import DicomHeader
    from ingestd.plan.metadata import Sidecar
    from ingestd.sources.queues.feed import QueueFeed

ErrorKind = Literal[
    "credentials", "denied", "missing_bucket", "missing", "unreachable", "not_found", "other"
]

# What `SourceFiles.stat` says about a path that exists but is not a regular file (a
# folder, or a key prefix in a bucket).
NOT_A_FILE = "not-a-file"

# (size, mtime_ns) of a regular file; None: gone or not a regular file
Stat = tuple[int, int] | None

# (kind, relpath, is_dir) where kind is created | closed | gone | moved_in
EventSink = Callable[[str, str, bool], None]


class SourceError(Exception):
    """A named, actionable failure of a source. `kind` drives status and retry:
    everything but `not_found` is retried with backoff; `missing` is a watch root that
    is not there (an unmounted disk), which must never read as "everything deleted"."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class SourceChanged(Exception):
    """The file or object is not the version asked for, or is gone."""


@dataclass(frozen=True, slots=True)
class Features:
    """What a source can do beyond the required surface. Filled once, when the source
    is made; callers read these, never the source's type."""

    events: bool = False
    local_paths: bool = False
    urls: bool = False
    # A bucket whose event notifications arrive through a queue: `hint_feed()` gives
    # durable hints (sources/queues), and listings become the slow repair path.
    queue: bool = False
    # Why the source is watched the way it is (events or polling), in words for status
    # and the start-up log, e.g. "nfs4 mount at /mnt/scans: polled every 5s".
    mode_reason: str = ""


@dataclass(slots=True)
class Changes:
    """One batch of a listing pass compared with the ledger's entries."""

    changed: list[Entry] = field(default_factory=list)  # new or changed, accepted
    gone: list[str] = field(default_factory=list)  # known, no longer listed
    listed: int = 0  # accepted files in the batch
    errors: list[str] = field(default_factory=list)  # unreadable paths (not gone)
    # Sources that list in ascending key order: the batch's last key, so that a group
    # folder the listing is past can be planned as a whole. None when not ordered.
    last_key: str | None = None


class PathTest(Protocol):
    """Which paths a watch takes: files it accepts, folders it never enters."""

    def accepts(self, relpath: str) -> bool: ...

    def prunes_dir(self, reldir: str) -> bool: ...


class KnownReader(Protocol):
    """Blocking reads of the ledger's entries, for a listing that runs in a thread."""

    def in_dir(self, parent: str) -> dict[str, tuple[int, int]]:
        """relpath → (size, mtime_ns) of the entries directly in folder `parent`."""
        ...

    def dirs(self, under: str) -> set[str]:
        """The folders holding entries at or below `under` ('' for all)."""
        ...


class Known(Protocol):
    """What the ledger knows of a watch's files, as a listing pass compares with it."""

    def reader(self) -> AbstractContextManager[KnownReader]:
        """A blocking reader with its own connection, for use in one thread."""
        ...

    async def between(
        self, after: str | None, upto: str | None
    ) -> dict[str, tuple[int, int, str | None]]:
        """relpath → (size, mtime_ns, etag) of entries with after < relpath <= upto."""
        ...


class SourceFiles(Protocol):
    """The planner's access to a watch's files (blocking; called from a planning thread)."""

    def read_sidecar(self, relpath: str) -> tuple[Sidecar, Entry] | None:
        """The parsed sidecar and its entry as the ledger records it; None when absent."""
        ...

    def sniff(self, relpath: str) -> SlotType | None:
        """The type the first bytes announce (None: unknown or unreadable)."""
        ...

    def image_size(self, relpath: str) -> tuple[int, int]:
        """Displayed (width, height) from the header; MediaError when unreadable."""
        ...

    def dicom_header(self, relpath: str, keywords: Sequence[str]) -> DicomHeader:
        """The DICOM header without pixels; MediaError when it is not one."""
        ...

    def names(self, parent: str, start: str) -> set[str] | None:
        """Names (files and folders) directly inside folder `parent` that start with
        `start`; None when the folder cannot be listed."""
        ...

    def stat(self, relpath: str) -> Entry | Literal["not-a-file"] | None:
        """The entry of a regular file, NOT_A_FILE for anything else that exists."""
        ...

    def list_files(self, reldir: str) -> list[Entry]:
        """The regular files directly inside folder `reldir` ([] when it is gone)."""
        ...


@runtime_checkable
class Source(Protocol):
    where: str  # the folder or bucket URL, for messages
    features: Features
    files: SourceFiles

    def changes(
        self,
        subdir: str,
        known: Known,
        takes: PathTest,
        *,
        everything: bool = False,
    ) -> AsyncIterator[Changes]:
        """One listing pass of `subdir` ('' for the whole watch) compared with `known`.
        Files `takes` refuses are as if not there; with `everything`, every accepted
        file counts as changed (to plan them all again). Gone entries of a pass that
        did not finish must not be applied: a failure raises SourceError (kind
        `missing` when the root itself is not there)."""
        ...

    async def stat(self, relpath: str) -> Entry | None:
        """The file's entry now (etag included where the source has them)."""
        ...

    def open(self, entry: Entry, *, chunk: int = 1 << 20) -> AsyncIterator[bytes]:
        """The bytes of exactly the version `entry` describes; raises SourceChanged
        when the file is no longer that version, or when it changes while read."""
        ...

    async def read_range(self, relpath: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the current version (fewer at the end)."""
        ...

    async def download(self, entry: Entry, dest: str) -> None:
        """Write exactly the version `entry` describes to the local file `dest`."""
        ...

    async def close(self) -> None: ...

    # -- Features.local_paths -------------------------------------------------------------

    def path_of(self, relpath: str) -> str:
        """The file's path on this machine."""
        ...

    # -- Features.urls --------------------------------------------------------------------

    def url_of(self, relpath: str) -> str:
        """The URL a platform can register: s3://bucket/prefix/key, gs://…, az://…"""
        ...

    def https_url_of(self, relpath: str) -> str | None:
        """The object's https URL, for platforms that fetch only https (None when it
        has none a platform could fetch)."""
        ...

    # -- Features.queue -------------------------------------------------------------------

    def hint_feed(self) -> QueueFeed:
        """The queue's feed: the runner drives it, recording each batch's hints in the
        ledger before the feed deletes the messages (at-least-once)."""
        ...

    # -- Features.events ------------------------------------------------------------------

    def start(self, deliver: EventSink, on_overflow: Callable[[], None]) -> None:
        """Begin delivering change hints (blocking: installing watches walks the tree)."""
        ...

    def alive(self) -> bool: ...

    def stop(self) -> None: ...

    def stat_many(self, relpaths: Sequence[str]) -> list[Stat]:
        """(size, mtime_ns) of each regular file now (blocking), for settling."""
        ...
