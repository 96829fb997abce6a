"""Process plumbing: the pid file (one daemon per state dir) and signal handling."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
from collections.abc import Callable
from pathlib import Path

PID_FILE = "ingestd.pid"


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None) -> None:
        super().__init__(pid)
        self.pid = pid


class PidLock:
    """An flock'd pid file. The lock, not the file's presence, says a daemon runs, so a
    pid file left by a SIGKILL never blocks the next start."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / PID_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(running_pid(self.path.parent)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def running_pid(state_dir: Path) -> int | None:
    """The pid of the daemon holding the lock on state_dir, or None when none runs."""
    path = Path(state_dir) / PID_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def install_signals(
    loop: asyncio.AbstractEventLoop,
    on_stop: Callable[[], None],
    on_rescan: Callable[[], None],
) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    # SIGUSR1: `ingestd retry` asks the running daemon to look at its folders again now.
    loop.add_signal_handler(signal.SIGUSR1, on_rescan)
