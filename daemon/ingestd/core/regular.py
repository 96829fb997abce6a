"""Opening a watched file: regular files only, and never blocking.

A plain open() of a FIFO waits until something writes to it, so one FIFO in a drop
folder held a planning thread or a sync worker, and with it SIGTERM, forever. Every read
of a watched file (planner, sync step, media) opens through here: with O_NONBLOCK, so
the open of a FIFO returns at once, then fstat on the descriptor, so what is checked is
what was opened even if the name was swapped. Regular files then get O_NONBLOCK cleared:
it means nothing for them on Linux, but a library handed the descriptor must not meet
EAGAIN if it ever did. Devices are refused on a stat before they are opened at all (an
open can rewind a tape).

Here in core/ because the sync step and media/ open files too, and they must not
import sources/.
"""

from __future__ import annotations

import errno
import fcntl
import os
from stat import S_ISDIR, S_ISLNK, S_ISREG
from typing import BinaryIO

from ingestd.core.errors import MediaError
from ingestd.core.rawnames import shown

__all__ = ["NotRegularFile", "check_regular", "open_regular", "open_regular_file"]

NOT_REGULAR_FIX = (
    "is not a regular file (a FIFO, socket or device); replace it with a file or remove it"
)


class NotRegularFile(MediaError):
    """The path names a FIFO, socket or device: it fails its item (with this reason)
    until it is replaced or removed. A MediaError, so the planner fails a group over it
    as over any unreadable member, and the sync step fails the item for good."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{shown(path)} {NOT_REGULAR_FIX}")
        self.path = path


def _refuse(path: str, mode: int) -> None:
    if S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if S_ISLNK(mode):  # not followed: what the O_NOFOLLOW open would say
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
    if not S_ISREG(mode):
        raise NotRegularFile(path)


def check_regular(path: str, *, follow_symlinks: bool = True) -> None:
    """Raise NotRegularFile (IsADirectoryError, OSError) unless `path` is a regular file
    now: for libraries that insist on opening by name, right before they do."""
    _refuse(path, os.stat(path, follow_symlinks=follow_symlinks).st_mode)


def open_regular(path: str, *, follow_symlinks: bool = True) -> int:
    """A read-only descriptor (close-on-exec) on `path`, provided it is a regular file.
    Without `follow_symlinks` a symbolic link fails with ELOOP. Raises NotRegularFile
    for a FIFO, socket or device, IsADirectoryError for a folder, and the OSError of
    the open otherwise."""
    check_regular(path, follow_symlinks=follow_symlinks)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        _refuse(path, os.fstat(fd).st_mode)  # the name may have been swapped since
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular_file(path: str, *, follow_symlinks: bool = True) -> BinaryIO:
    """open_regular as a buffered binary file object (closing it closes the descriptor)."""
    return os.fdopen(open_regular(path, follow_symlinks=follow_symlinks), "rb")
