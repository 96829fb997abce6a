"""Notices edits of the config file while the daemon runs.

Editors rarely write a file in place: vim and many others write a new file and rename
it over the old one, and Kubernetes swaps a `..data` symlink. So the folder holding the
file is watched (not the file's inode), an event naming the file is a hint, and the
file's content decides: a reload is asked for only when the bytes differ from what was
last loaded, and only once the writes have been quiet for a moment.

Only events that can change the content are subscribed: created, moved, deleted and
closed-after-write. watchdog >= 4 also reports opens and closes without a write; those
came from our own reads too, so each read hinted the next one (the config was opened
several times a second, forever, after one edit or a `cat`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import structlog
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

log = structlog.get_logger("ingestd.config")

QUIET = 0.3  # seconds without events before the file is read

# Every write ends with a close-after-write, so FileModifiedEvent adds nothing but
# attribute changes (it also subscribes IN_ATTRIB: a chmod or touch). The Dir* kinds
# cover a ConfigMap's timestamped folders and `..data` when it is a real folder.
EVENT_FILTER = [
    FileCreatedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]


def content_digest(path: Path) -> str | None:
    content = read_content(path)
    return None if content is None else digest_of(content)


def read_content(path: Path) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def digest_of(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


class _Hint(FileSystemEventHandler):
    def __init__(self, names: set[str], deliver: Callable[[], None]) -> None:
        self.names = names
        self.deliver = deliver

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = [event.src_path, getattr(event, "dest_path", "") or ""]
        if any(os.path.basename(os.fsdecode(p)) in self.names for p in paths if p):
            self.deliver()


class ConfigWatcher:
    """Calls `on_change(content)` (on the event loop) when the config file's content
    changed, with the bytes it read, so that the reload reads the file no second time."""

    def __init__(self, path: Path, on_change: Callable[[bytes], None], loaded: str | None) -> None:
        self.path = Path(path).absolute()
        self.on_change = on_change
        self.loaded = loaded  # the digest of the bytes the running config came from
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._hint = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def mark_loaded(self, digest: str | None) -> None:
        """The content the daemon last read (applied or refused): not a change."""
        self.loaded = digest

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        names = {self.path.name}
        if self.path.is_symlink():
            # A symlinked config (e.g. a ConfigMap) changes by swapping link targets.
            names |= {"..data", Path(os.readlink(self.path)).parts[0]}

        def deliver() -> None:
            loop.call_soon_threadsafe(self._hint.set)

        observer = Observer()
        observer.schedule(
            _Hint(names, deliver),
            str(self.path.parent),
            recursive=False,
            event_filter=EVENT_FILTER,
        )
        try:
            await asyncio.to_thread(observer.start)
        except OSError as e:
            log.warning(
                "cannot watch the config file for edits; reload with SIGHUP or `ingestd reload`",
                path=str(self.path),
                error=str(e),
            )
            return
        self._observer = observer
        # One look now: the file may have been edited between its load and this watch
        # (no event will come for that edit).
        self._hint.set()
        self._task = asyncio.create_task(self._loop(), name="config-watch")

    async def _loop(self) -> None:
        while True:
            await self._hint.wait()
            # Let a burst of writes (truncate, write, rename) finish first.
            while True:
                self._hint.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hint.wait(), QUIET)
                    continue
                break
            content = await asyncio.to_thread(read_content, self.path)
            if content is not None and digest_of(content) != self.loaded:
                self.on_change(content)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._observer is not None:
            self._observer.stop()
            await asyncio.to_thread(self._observer.join, 2)
            self._observer = None
