"""Which file system holds a watch's folder, and whether inotify can see its changes.

inotify reports what passes through this machine's kernel. On a network file system
(NFS, SMB, CephFS, ...) or a FUSE file system (sshfs, bindfs, rclone mount, ...) files
that another machine, the server or the FUSE daemon's backing store writes raise no
event here, so such folders are polled (sources/local_poll.py) unless the watch says
otherwise (`watch_mode`).

The mount table is /proc/self/mountinfo (proc(5)): per line `id parent major:minor
root mount_point options [optional fields...] - fs_type source super_options`, with
space, tab, newline and backslash in paths written as \\040, \\011, \\012, \\134.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Mount", "is_remote", "mount_of", "parse_mountinfo", "read_mounts", "remote_mount"]

MOUNTINFO = "/proc/self/mountinfo"

# File systems whose contents change without this kernel seeing it. Cluster file systems
# on shared disks (gfs2, ocfs2, gpfs) belong here too: other nodes write to them.
# virtiofs, 9p, vboxsf and vmhgfs share a host's folder with a VM: what the host
# writes raises no event in the guest.
REMOTE_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "afs",
        "ceph",
        "glusterfs",
        "lustre",
        "davfs",
        "ncpfs",
        "gfs2",
        "ocfs2",
        "gpfs",
        "beegfs",
        "virtiofs",
        "vboxsf",
        "vmhgfs",
        "fuse",  # bindfs and others that do not name themselves (fuse, not fuse.bindfs)
    }
)
# fuseblk is ntfs-3g or exfat on a local disk: written through this kernel, events work.
LOCAL_FUSE = frozenset({"fuseblk"})

_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class Mount:
    mount_point: str  # as os calls take it (undecodable bytes as surrogates)
    fs_type: str  # e.g. ext4, nfs4, fuse.sshfs
    source: str  # e.g. /dev/vda, server:/export, //nas/share


def _unescape(field: bytes) -> str:
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def parse_mountinfo(data: bytes | str) -> list[Mount]:
    """Every well-formed line of a mountinfo table, in table order (later mounts on the
    same point hide earlier ones). Malformed lines are skipped, not fatal: the answer
    only picks between two ways of watching."""
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    mounts = []
    for line in raw.splitlines():
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)  # optional fields end at a lone "-"
            mount_point, fs_type, source = fields[4], fields[sep + 1], fields[sep + 2]
        except (ValueError, IndexError):
            continue
        mounts.append(Mount(_unescape(mount_point), _unescape(fs_type), _unescape(source)))
    return mounts


def read_mounts(path: str = MOUNTINFO) -> list[Mount]:
    """This process's mount table ([] where there is none to read: not Linux)."""
    try:
        with open(path, "rb") as fh:
            return parse_mountinfo(fh.read())
    except OSError:
        return []


def mount_of(path: str, mounts: Iterable[Mount]) -> Mount | None:
    """The mount holding `path` (resolved: a symlink into a share is on the share): the
    longest mount point that is the path or one of its parents; the latest on a tie."""
    real = os.path.realpath(path)
    best: Mount | None = None
    for m in mounts:
        mp = m.mount_point
        inside = real == mp or real.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) >= len(best.mount_point)):
            best = m
    return best


def is_remote(fs_type: str) -> bool:
    """True when changes to this file system can bypass this machine's kernel."""
    if fs_type in LOCAL_FUSE:
        return False
    return fs_type in REMOTE_TYPES or fs_type.startswith("fuse.")


def remote_mount(path: str, mounts: Iterable[Mount] | None = None) -> Mount | None:
    """The network or FUSE mount holding `path`, or None when it is on a local one (or
    the table cannot be read)."""
    m = mount_of(path, read_mounts() if mounts is None else mounts)
    return m if m is not None and is_remote(m.fs_type) else None
