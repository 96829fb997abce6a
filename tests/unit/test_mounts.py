"""sources/mounts.py: the mount holding a folder, and whether inotify sees its changes,
from recorded /proc/self/mountinfo lines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from ingestd.sources.mounts import is_remote, mount_of, parse_mountinfo, read_mounts, remote_mount

TABLE = b"""\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
36 27 0:45 / /mnt/scans rw,relatime shared:30 - nfs4 server:/export rw,vers=4.2,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,clientaddr=10.0.0.5,local_lock=none,addr=10.0.0.2
37 27 0:46 / /mnt/nas\\040share rw,relatime shared:31 master:2 - cifs //nas/share rw,vers=3.1.1,cache=strict,username=scan,uid=0,noforceuid,gid=0,noforcegid,addr=10.0.0.3,file_mode=0755,dir_mode=0755,soft,nounix,serverino,mapposix,rsize=4194304,wsize=4194304,bsize=1048576,echo_interval=60,actimeo=1
38 27 0:47 / /srv/data rw,relatime - xfs /dev/sdb1 rw,attr2,inode64
39 38 0:48 / /srv/data/remote rw,nosuid,nodev,relatime - fuse.sshfs user@host:/data rw,user_id=0,group_id=0
40 27 0:49 / /mnt/bound rw,nosuid,nodev,relatime - fuse /tmp/a rw,user_id=0,group_id=0,default_permissions
41 27 0:50 / /mnt/usb rw,relatime - fuseblk /dev/sdc1 rw,user_id=0,group_id=0
42 27 0:51 / /mnt/tab\\011and\\134back rw - tmpfs tmpfs rw
broken line without separator
"""


def test_parse_fields_and_escapes() -> None:
    mounts = parse_mountinfo(TABLE)
    assert len(mounts) == 8  # the broken line is skipped
    by_point = {m.mount_point: m for m in mounts}
    nfs = by_point["/mnt/scans"]
    assert (nfs.fs_type, nfs.source) == ("nfs4", "server:/export")
    cifs = by_point["/mnt/nas share"]
    assert (cifs.fs_type, cifs.source) == ("cifs", "//nas/share")
    assert by_point["/mnt/tab\tand\\back"].fs_type == "tmpfs"
    assert by_point["/"].fs_type == "ext4"


@pytest.mark.parametrize(
    ("path", "fs_type", "remote"),
    [
        ("/mnt/scans", "nfs4", True),
        ("/mnt/scans/2024/05", "nfs4", True),
        ("/mnt/nas share/in", "cifs", True),
        ("/mnt/scansX", "ext4", False),  # a prefix of the name is not a parent
        ("/srv/data/x", "xfs", False),
        ("/srv/data/remote/y", "fuse.sshfs", True),  # the longest mount point wins
        ("/mnt/bound/sub", "fuse", True),  # bindfs says only "fuse"
        ("/mnt/usb", "fuseblk", False),  # ntfs-3g on a local disk
        ("/home/u", "ext4", False),
    ],
)
def test_mount_of_and_classification(path: str, fs_type: str, remote: bool) -> None:
    mounts = parse_mountinfo(TABLE)
    m = mount_of(path, mounts)
    assert m is not None and m.fs_type == fs_type
    assert is_remote(m.fs_type) is remote
    assert (remote_mount(path, mounts) is not None) is remote


def test_a_later_mount_on_the_same_point_hides_the_earlier() -> None:
    table = TABLE + b"50 36 0:60 / /mnt/scans rw - ext4 /dev/sdd rw\n"
    m = mount_of("/mnt/scans/a", parse_mountinfo(table))
    assert m is not None and m.fs_type == "ext4"


@pytest.mark.parametrize(
    "fs_type", ["nfs", "smb3", "9p", "ceph", "glusterfs", "lustre", "virtiofs", "fuse.rclone"]
)
def test_remote_types(fs_type: str) -> None:
    assert is_remote(fs_type)


@pytest.mark.parametrize("fs_type", ["ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "fuseblk"])
def test_local_types(fs_type: str) -> None:
    assert not is_remote(fs_type)


def test_a_symlink_into_a_share_is_on_the_share(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    link = tmp_path / "link"
    os.symlink(share, link)
    table = f"1 0 0:1 / / rw - ext4 /dev/vda rw\n2 1 0:2 / {share} rw - nfs s:/e rw\n"
    m = mount_of(str(link / "sub"), parse_mountinfo(table.encode()))
    assert m is not None and m.fs_type == "nfs"


def test_this_machines_table_holds_the_root() -> None:
    mounts = read_mounts()
    if not mounts:
        pytest.skip("no /proc/self/mountinfo on this system")
    assert mount_of("/", mounts) is not None
    assert read_mounts("/nonexistent/mountinfo") == []
