"""Shared helpers for the benchmarks: fresh folders, file trees, configs, statistics,
the machine description and markdown tables. Not a benchmark itself."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

# INGESTD_BENCH_REPO: measure another checkout (e.g. `git archive <rev> | tar -x -C dir`)
# with these scripts, to compare revisions on the same machine.
REPO = Path(os.environ.get("INGESTD_BENCH_REPO") or Path(__file__).resolve().parents[1])
PYTHON = sys.executable
INGESTD = [PYTHON, "-m", "ingestd.cli"]
# The package lives in REPO/daemon (import name ingestd).
ENV = {**os.environ, "PYTHONPATH": str(REPO / "daemon")}
if str(REPO / "daemon") not in sys.path:
    sys.path.insert(0, str(REPO / "daemon"))


# --- folders -------------------------------------------------------------------------


class Workspace:
    """A bench's scratch area. Every run gets new folders (`fresh`); nothing is deleted
    until the benchmark ends, because creating files right after deleting many is up to
    10x slower here for a while (docs/design.md) and would skew the next run."""

    def __init__(self, name: str, base: str | None = None) -> None:
        base = base or os.environ.get("INGESTD_BENCH_DIR") or tempfile.gettempdir()
        Path(base).mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix=f"ingestd-bench-{name}-", dir=base))
        self._n = 0

    def fresh(self, label: str) -> Path:
        self._n += 1
        p = self.root / f"{self._n:03d}-{label}"
        p.mkdir(parents=True)
        return p

    def cleanup(self) -> None:
        if os.environ.get("INGESTD_BENCH_KEEP"):
            print(f"(kept {self.root})", file=sys.stderr)
            return
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def make_tree(root: Path, files: int, size: int, per_dir: int = 100, seed: int = 0) -> int:
    """`files` files of `size` bytes (distinct content) in folders of `per_dir`; returns
    the bytes written. Content is random-ish but cheap: a unique header plus a shared
    random block, so every file hashes differently."""
    block = os.urandom(max(size, 1))
    total = 0
    for i in range(files):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        header = f"{seed}:{i}\n".encode()
        body = (header + block)[:size] if size >= len(header) else header
        with open(d / f"f{i:06d}.bin", "wb") as fh:
            fh.write(body)
        total += len(body)
    return total


def drop_caches() -> bool:
    """Flush dirty pages and drop the page, dentry and inode caches (root only)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def write_config(
    path: Path,
    *,
    state: Path,
    store: Path,
    source: Path,
    settle: str,
    workers: int | None = None,
    level: str = "info",
) -> Path:
    data: dict[str, Any] = {
        "state_dir": str(state),
        "log": {"level": level, "format": "json"},
        "backend": {"kind": "local", "path": str(store)},
        "watches": [{"name": "w", "source": str(source), "dataset": "ds", "settle": settle}],
    }
    if workers is not None:
        data["workers"] = workers
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def status(config: Path) -> dict[str, Any]:
    out = subprocess.run(
        [*INGESTD, "status", "--json", "-c", str(config)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout)


def wait_until(cond: Any, timeout: float, interval: float = 0.2, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) and friends from /proc/<pid>/status."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key.startswith("Vm") or key.startswith("Rss"):
                out[key] = int(rest.split()[0])
    return out


# --- statistics ----------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """min–max, the honest spread for a handful of runs."""
    return f"{min(xs):,.0f}–{max(xs):,.0f}" if max(xs) >= 100 else f"{min(xs):.3g}–{max(xs):.3g}"


def percentile(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


# --- reporting -----------------------------------------------------------------------


def run_cmd(cmd: Sequence[str]) -> str:
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    base = os.environ.get("INGESTD_BENCH_DIR") or tempfile.gettempdir()
    commit = run_cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = run_cmd(["git", "-C", str(REPO), "status", "--porcelain", "daemon"])
    return {
        "nproc": run_cmd(["nproc"]),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "bench dir": f"{base} ({run_cmd(['findmnt', '-no', 'FSTYPE', '-T', base])})",
        "commit": commit + (" + uncommitted changes under daemon/" if dirty else ""),
        "load average (1/5/15 min)": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "cpu pressure before the run (PSI some avg60/avg300)": pressure("cpu"),
        "io pressure before the run (PSI some avg60/avg300)": pressure("io"),
    }


def pressure(kind: str) -> str:
    """Share of time some task waited for the CPU or I/O (other processes' load)."""
    try:
        first = Path(f"/proc/pressure/{kind}").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return "?"
    fields = dict(f.split("=") for f in first[1:])
    return f"{fields['avg60']}% / {fields['avg300']}%"


def machine_md() -> str:
    m = machine()
    return "\n".join(f"- {k}: {v}" for k, v in m.items())


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def runs_arg(default: int) -> int:
    """`--runs N` from the command line (the only option the scripts take)."""
    args = sys.argv[1:]
    if "--runs" in args:
        return int(args[args.index("--runs") + 1])
    return default
