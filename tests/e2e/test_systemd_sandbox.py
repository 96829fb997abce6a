"""The daemon works inside the sandbox that systemd/ingestd.service asks for.

Without systemd as PID 1 here, tests/support/syscall_sandbox.py builds the same confinement
from the unit file: its SystemCallFilter= allow list (expanded by `systemd-analyze
syscall-filter`, failing calls get EPERM as SystemCallErrorNumber= says),
MemoryDenyWriteExecute= (systemd's own seccomp rules), RestrictAddressFamilies=,
CapabilityBoundingSet= empty, ProtectSystem=strict with only the state folder writable,
and ProcSubset=pid. Then the daemon runs in it and does real work that pulls in every
native library it has: inotify on the drop folder, an oversize PNG downscaled (Pillow),
a video sampled to frames (OpenCV, numpy), a DICOM file de-identified (pydicom), the
control endpoint on loopback (aiohttp), thumbnails of all three, a reload, a clean stop.

Not emulated: User= (the test runs as uid 0 with no capabilities), PrivateTmp,
PrivateDevices and the other namespace options, which change what the daemon sees
but not which code paths it can run.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pydicom
from PIL import Image

from tests.support.daemon import REPO, Env, blob_path
from tests.support.need import need
from tests.support.syscall_sandbox import (
    CANNOT_SANDBOX,
    allowed_syscalls,
    find_systemd_analyze,
    read_unit,
)
from tests.support.wait import wait_for

UNIT = REPO / "systemd" / "ingestd.service"
DICOM_FILE = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


def sandbox_prefix(tmp: Path, writable: Path) -> list[str]:
    """The wrapper command that confines what follows it as the unit would."""
    analyze, why = find_systemd_analyze()
    need(analyze is not None, why)
    assert analyze is not None
    unit = read_unit(UNIT)
    allow = tmp / "allowed-syscalls.txt"
    allow.write_text("\n".join(sorted(allowed_syscalls(analyze, unit["SystemCallFilter"]))))
    assert unit["SystemCallErrorNumber"] == ["EPERM"]  # what the wrapper's filter returns
    assert unit["ProtectSystem"] == ["strict"] and unit["ProcSubset"] == ["pid"]
    assert unit["CapabilityBoundingSet"] == [""]
    families = ",".join(" ".join(unit["RestrictAddressFamilies"]).split())
    prefix = [sys.executable, "-m", "tests.support.syscall_sandbox"]
    prefix += ["--read-only-except", str(writable), "--proc-subset-pid", "--no-caps"]
    if unit.get("MemoryDenyWriteExecute") == ["yes"]:
        prefix.append("--mdwe")
    prefix += ["--families", families, "--allow", str(allow), "--"]
    return prefix


PROBE = """
import mmap, os, socket, sys
def outcome(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return type(e).__name__ + ":" + str(e.errno)
print(outcome(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)))
print(outcome(lambda: os.setpriority(os.PRIO_PROCESS, 0, 5)))  # @resources
print(outcome(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)))
print(outcome(lambda: open(sys.argv[1] + "/repo-write", "w")))
print(outcome(lambda: open(sys.argv[2] + "/state-write", "w")))
print(outcome(lambda: open("/proc/meminfo").read()))
print(outcome(lambda: socket.socket().bind(("127.0.0.1", 0))))
"""


def test_the_sandbox_is_in_force(tmp_path: Path) -> None:
    """The confinement the next test relies on really applies (so its passing means
    something): each rule refuses what it should, and allows what the daemon needs."""
    state = tmp_path / "state"
    state.mkdir()
    prefix = sandbox_prefix(tmp_path, tmp_path)
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", PROBE, str(REPO), str(state)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    need(proc.returncode != CANNOT_SANDBOX, proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "PermissionError:1",  # MemoryDenyWriteExecute
        "PermissionError:1",  # SystemCallFilter=~@resources, SystemCallErrorNumber=EPERM
        "OSError:97",  # RestrictAddressFamilies: EAFNOSUPPORT
        "OSError:30",  # ProtectSystem=strict: EROFS
        "ok",  # the state folder is writable
        "FileNotFoundError:2",  # ProcSubset=pid
        "ok",  # AF_INET on loopback, for the control endpoint
    ], proc.stderr
    assert not (REPO / "repo-write").exists()


def png_bytes(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(out, format="PNG")
    return out.getvalue()


def write_video(path: Path, frames: int = 20, fps: int = 10) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (64, 48))
    assert writer.isOpened(), "this OpenCV build cannot write mp4v"
    for i in range(frames):
        frame = np.zeros((48, 64, 3), np.uint8)
        frame[:, : 3 * i] = 255
        writer.write(frame)
    writer.release()


def get(base: str, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(base + path, timeout=30) as r:
        return r.status, r.read()


def test_the_daemon_works_in_the_units_sandbox(env: Env, tmp_path: Path) -> None:
    drop = env.drop()
    prefix = sandbox_prefix(tmp_path, env.root)
    # Only env.root is writable inside: state, store and drop folder all live there;
    # under systemd they are /var/lib/ingestd and a group-readable drop folder.
    env.write_config(
        [
            {
                "name": "w",
                "source": str(drop),
                "dataset": "ds",
                "images": {"max_dimension": 64, "oversize": "downscale"},
                "video": {"mode": "frames", "fps": 2},
                "dicom": {"deidentify": True},
            }
        ]
    )
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=60)
    need(probe.returncode != CANNOT_SANDBOX, probe.stderr.strip())
    env.start(prefix=prefix)
    assert env.daemon is not None
    # The wrapper exec'd into the daemon: this pid is the daemon, and it is confined.
    status = Path(f"/proc/{env.daemon.pid}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert "ingestd.cli" in Path(f"/proc/{env.daemon.pid}/cmdline").read_text()
    assert fields["Seccomp"].strip() == "2" and fields["NoNewPrivs"].strip() == "1"
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
    assert Path(f"/proc/{env.daemon.pid}/ns/mnt").readlink() != Path("/proc/self/ns/mnt").readlink()

    # Dropped after the start: inotify must see them.
    (drop / "big.png").write_bytes(png_bytes((256, 128)))
    write_video(tmp_path / "clip.mp4")
    shutil.copy(tmp_path / "clip.mp4", drop / "clip.mp4")
    shutil.copy(DICOM_FILE, drop / "scan.dcm")

    items = wait_for(
        lambda: (lambda i: i if {"/big.png", "/clip.mp4", "/scan.dcm"} <= i.keys() else None)(
            env.items_by_key()
        ),
        90,
        what="the image, video and DICOM items",
    )
    [image_file] = items["/big.png"]["slots"][0]["files"]
    with Image.open(blob_path(env, image_file["digest"])) as im:
        assert max(im.size) == 64  # downscaled in the sandbox
    video_slot = items["/clip.mp4"]["slots"][0]
    assert video_slot["type"] == "frames" and len(video_slot["files"]) >= 2
    [dicom_file] = items["/scan.dcm"]["slots"][0]["files"]
    ds = pydicom.dcmread(blob_path(env, dicom_file["digest"]))
    original = pydicom.dcmread(DICOM_FILE)
    assert ds.StudyInstanceUID != original.StudyInstanceUID  # de-identified

    # The control endpoint (aiohttp on loopback) and thumbnails of all three kinds.
    addr = wait_for(
        lambda: (
            (env.state / "control.addr").exists()
            and (env.state / "control.addr").read_text().strip()
        ),
        what="state_dir/control.addr",
    )
    base = addr.rstrip("/") + "/"  # the daemon writes a URL: http://127.0.0.1:PORT
    assert get(base, "healthz")[0] == 200
    listed = json.loads(get(base, "api/items?limit=50")[1])
    listed = listed["items"] if isinstance(listed, dict) else listed
    thumbs = {i["key"]: i["thumbnail"] for i in listed if i.get("thumbnail")}
    assert {"/big.png", "/clip.mp4", "/scan.dcm"} <= thumbs.keys(), listed
    for key in ("/big.png", "/clip.mp4", "/scan.dcm"):
        status, body = get(base, thumbs[key])
        assert status == 200 and body[:3] == b"\xff\xd8\xff", f"{key}: not a JPEG"

    # A reload and a clean stop, still confined.
    env.daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: "config reloaded" in env.log(), what="the reload")
    assert env.stop() == 0
    assert "Operation not permitted" not in env.log(), env.log()[-3000:]
