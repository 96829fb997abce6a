"""Run a command under the seccomp rules the systemd unit asks for, without systemd.

    python -m tests.support.syscall_sandbox [--allow FILE] [--mdwe] -- COMMAND...

--allow FILE: only the syscalls named in FILE (one per line) are allowed; any other fails
    with EPERM, as SystemCallFilter= with SystemCallErrorNumber=EPERM does.
--mdwe: MemoryDenyWriteExecute=yes, built the way systemd 252 builds it: mmap with both
    PROT_WRITE and PROT_EXEC, and mprotect/pkey_mprotect adding PROT_EXEC, and shmat with
    SHM_EXEC fail with EPERM.

The filters are loaded through libseccomp (which systemd itself links, so it is there
wherever systemd-analyze is) and survive exec, so COMMAND runs confined from its first
instruction, like ExecStart= does.

--families AF_UNIX,AF_INET,...: RestrictAddressFamilies=; socket() with any other family
    fails with EAFNOSUPPORT.
--read-only-except PATH[:PATH...]: ProtectSystem=strict with ReadWritePaths=PATH...: in a
    private mount namespace every mount but /dev, /proc, /sys and the PATHs is read-only.
--proc-subset-pid: ProcSubset=pid and ProtectProc=invisible: a /proc of processes only.
--no-caps: CapabilityBoundingSet= (empty): even uid 0 has no capability after exec.

Mount changes stay inside the command's own mount namespace.

The module also reads unit files and expands their SystemCallFilter= lines (with
`systemd-analyze syscall-filter`), for the tests that check the units.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

CANNOT_SANDBOX = 77  # exit status: this machine cannot build the sandbox (tests `need` it)
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_GT = 6
SCMP_CMP_MASKED_EQ = 7
SHM_EXEC = 0o100000
NR_SCMP_ERROR = -1


def scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = (
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ArgCmp),
    )
    lib.seccomp_load.restype = ctypes.c_int
    lib.seccomp_load.argtypes = (ctypes.c_void_p,)
    lib.seccomp_release.argtypes = (ctypes.c_void_p,)
    return lib


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")


def load_allow_list(lib: ctypes.CDLL, names: list[str]) -> None:
    ctx = lib.seccomp_init(scmp_act_errno(errno.EPERM))
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        for name in names:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr == NR_SCMP_ERROR:
                continue  # a name this libseccomp does not know; systemd skips those too
            rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 0, None)
            # -EDOM/-EOPNOTSUPP: a syscall that does not exist on this architecture.
            if rc not in (0, -errno.EDOM, -errno.EOPNOTSUPP):
                _check(rc, f"allow {name}")
        _check(lib.seccomp_load(ctx), "seccomp_load (allow list)")
    finally:
        lib.seccomp_release(ctx)


def load_mdwe(lib: ctypes.CDLL) -> None:
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    wx = mmap.PROT_WRITE | mmap.PROT_EXEC
    rules = [
        ("mmap", wx, wx),
        ("mprotect", mmap.PROT_EXEC, mmap.PROT_EXEC),
        ("pkey_mprotect", mmap.PROT_EXEC, mmap.PROT_EXEC),
        ("shmat", SHM_EXEC, SHM_EXEC),
    ]
    try:
        for name, mask, value in rules:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr == NR_SCMP_ERROR:
                continue
            cmp = (ArgCmp * 1)(ArgCmp(2, SCMP_CMP_MASKED_EQ, mask, value))
            _check(
                lib.seccomp_rule_add_array(ctx, scmp_act_errno(errno.EPERM), nr, 1, cmp),
                f"deny {name}",
            )
        _check(lib.seccomp_load(ctx), "seccomp_load (MemoryDenyWriteExecute)")
    finally:
        lib.seccomp_release(ctx)


def load_address_families(lib: ctypes.CDLL, families: list[str]) -> None:
    allowed = {int(getattr(socket, name)) for name in families}
    nr = lib.seccomp_syscall_resolve_name(b"socket")
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        deny = scmp_act_errno(errno.EAFNOSUPPORT)
        for family in range(max(allowed) + 1):
            if family not in allowed:
                cmp = (ArgCmp * 1)(ArgCmp(0, SCMP_CMP_EQ, family, 0))
                _check(lib.seccomp_rule_add_array(ctx, deny, nr, 1, cmp), f"deny family {family}")
        cmp = (ArgCmp * 1)(ArgCmp(0, SCMP_CMP_GT, max(allowed), 0))
        _check(lib.seccomp_rule_add_array(ctx, deny, nr, 1, cmp), "deny higher families")
        _check(lib.seccomp_load(ctx), "seccomp_load (RestrictAddressFamilies)")
    finally:
        lib.seccomp_release(ctx)


CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME = 16384, 1 << 18, 1 << 21
PR_CAPBSET_DROP, CAP_SETPCAP = 24, 8
# statvfs f_flag bits that a bind remount must repeat (same values as the MS_ ones).
KEEP_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME | MS_RELATIME

_libc = ctypes.CDLL(None, use_errno=True)


def _sys(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _enc(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    rc = _libc.mount(_enc(source), _enc(target), _enc(fstype), ctypes.c_ulong(flags), _enc(data))
    _sys(rc, f"mount {target}")


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh]
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), p) for p in points]


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def private_mounts() -> None:
    """A mount namespace of our own, private: nothing done in it reaches the host."""
    _sys(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)


def protect_system_strict(writable: list[str]) -> None:
    writable = [os.path.realpath(p) for p in writable]
    for path in writable:
        _mount(path, path, None, MS_BIND | MS_REC, None)
    for point in _mount_points():
        if _under(point, ["/dev", "/proc", "/sys", *writable]):
            continue
        try:
            flags = os.statvfs(point).f_flag & KEEP_FLAGS
        except OSError:
            continue  # hidden under another mount: not reachable anyway
        # MS_BIND: change this mount point only, never the file system underneath.
        _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None)


def proc_subset_pid() -> None:
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    _mount("proc", "/proc", "proc", flags, "hidepid=invisible,subset=pid")


def drop_all_capabilities() -> None:
    # CAP_SETPCAP is what allows dropping: it goes last. Numbers past the kernel's last
    # capability fail with EINVAL (/proc/sys/kernel/cap_last_cap may be hidden by now).
    for cap in [c for c in range(64) if c != CAP_SETPCAP] + [CAP_SETPCAP]:
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL:
                raise OSError(err, f"drop capability {cap}: {os.strerror(err)}")


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    opts, cmd = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    if not cmd:
        print("no command after --", file=sys.stderr)
        return 2
    # systemd's order: namespaces and mounts, then capabilities, then seccomp filters.
    try:
        if "--read-only-except" in opts or "--proc-subset-pid" in opts:
            private_mounts()
        if "--read-only-except" in opts:
            protect_system_strict(opts[opts.index("--read-only-except") + 1].split(":"))
        if "--proc-subset-pid" in opts:
            proc_subset_pid()
        if "--no-caps" in opts:
            drop_all_capabilities()
        lib = _lib()
    except OSError as e:
        print(f"cannot build the sandbox: {e}", file=sys.stderr)
        return CANNOT_SANDBOX
    # systemd loads the allow list last too: it may not allow seccomp() itself.
    if "--mdwe" in opts:
        load_mdwe(lib)
    if "--families" in opts:
        load_address_families(lib, opts[opts.index("--families") + 1].split(","))
    if "--allow" in opts:
        with open(opts[opts.index("--allow") + 1]) as fh:
            load_allow_list(lib, [line.strip() for line in fh if line.strip()])
    os.execvp(cmd[0], cmd)
    return 127  # not reached: execvp raises or replaces the process


# -- reading the units ---------------------------------------------------------------------


def read_unit(path: Path) -> dict[str, list[str]]:
    """`Key` → its values in file order ([Section] headers dropped: the keys of our
    service units do not repeat across sections)."""
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        out.setdefault(key, []).append(value)
    return out


def find_systemd_analyze() -> tuple[str | None, str]:
    """The path of systemd-analyze (Debian's `systemd` package, which `.ci/run`
    installs); else (None, why)."""
    found = shutil.which("systemd-analyze")
    if found:
        return found, ""
    return None, "systemd-analyze is missing (Debian package systemd; `bash .ci/run` installs it)"


def systemd_version(analyze: str) -> int:
    out = subprocess.run([analyze, "--version"], capture_output=True, text=True, timeout=60)
    m = re.match(r"systemd (\d+)", out.stdout)
    return int(m.group(1)) if m else 0


def syscall_groups(analyze: str) -> dict[str, list[str]]:
    """@group → its members (syscalls and nested @groups), from systemd-analyze."""
    out = subprocess.run(
        [analyze, "syscall-filter", "--no-pager"], capture_output=True, text=True, timeout=60
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if not line[0].isspace():
            current = groups.setdefault(item, [])
        elif current is not None:
            current.append(item)
    return groups


def allowed_syscalls(analyze: str, filters: list[str]) -> set[str]:
    """The allow list that SystemCallFilter= lines describe: the first line without `~`
    starts it, later lines add to it, `~` lines take away."""
    groups = syscall_groups(analyze)

    def expand(name: str) -> set[str]:
        if not name.startswith("@"):
            return {name}
        return set().union(*(expand(m) for m in groups[name]))

    allowed: set[str] = set()
    assert filters and not filters[0].startswith("~"), "expected an allow list first"
    for line in filters:
        deny = line.startswith("~")
        names = set().union(*(expand(n) for n in line.removeprefix("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
