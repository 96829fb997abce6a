"""One daemon at 1 M files (issue 16, point 0): first sync, no-op sync, idle CPU, RSS.

N files (default 1,000,000) of 72 bytes in 1,000 folders, local store backend. Per run,
on a fresh state and store over the same tree:

1. the first `ingestd sync`: files/s and peak RSS (the child's VmHWM, polled, and
   ru_maxrss of the child when it exits);
2. a no-op `ingestd sync` right after: its seconds, against an `os.scandir` walk with a
   `stat` of every file of the same tree in the same run (the ratio);
3. `ingestd run` on the synced ledger: once its start-up pass is done (`status`
   shows a last rescan), its CPU over `--idle` seconds (default 60) from /proc/<pid>/stat
   utime+stime, as a share of one core; its VmRSS then.

Figures are medians of `--runs` (default 3). The tree is made once (it takes minutes at
1 M) and kept under the workspace until the script ends.

    nice -n 10 .venv/bin/python bench/million.py [--files N] [--runs N] [--idle S]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import (
    ENV,
    INGESTD,
    REPO,
    Workspace,
    machine_md,
    median,
    proc_status,
    spread,
    status,
    table,
    wait_until,
    write_config,
)

SIZE = 72
FOLDERS = 1_000
TICK = os.sysconf("SC_CLK_TCK")


def make_tree(root: Path, files: int) -> None:
    """`files` distinct 72-byte files spread evenly over 1,000 folders."""
    per_dir = max(1, -(-files // FOLDERS))
    pad = os.urandom(SIZE).hex()
    for i in range(files):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        body = f"{i:012d}:{pad}".encode()[:SIZE]
        with open(d / f"f{i:07d}.bin", "wb") as fh:
            fh.write(body)


def scandir_walk(root: Path) -> int:
    """The baseline of a no-op sync: every folder listed, every file stat'ed."""
    n = 0
    stack = [str(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                else:
                    os.stat(e.path)
                    n += 1
    return n


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def timed_sync(cfg: Path, log: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one `ingestd sync`; it must exit 0."""
    t = time.perf_counter()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [*INGESTD, "sync", "-c", str(cfg)], stdout=fh, stderr=fh, env=ENV, cwd=REPO
        )
        peak = 0
        while proc.poll() is None:
            # VmHWM is gone once the child is reaped: sample it while it runs, and
            # take the kernel's own peak of the reaped child (ru_maxrss) too.
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                peak = max(peak, proc_status(proc.pid).get("VmHWM", 0))
            time.sleep(0.25)
    secs = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"ingestd sync exited {proc.returncode}; see {log}")
    return secs, peak / 1024


def passed(cfg: Path) -> bool:
    """The running daemon's start-up pass is over (its status has a last rescan)."""
    try:
        watches = status(cfg)["watches"]
    except (subprocess.SubprocessError, ValueError, KeyError):
        return False
    return bool(watches) and all(w.get("last_rescan") for w in watches)


def idle_cpu(cfg: Path, log: Path, idle: float) -> tuple[float, float, float, float]:
    """(share of a core, VmRSS MiB, seconds to the start-up pass's end, CPU seconds
    until then) of `ingestd run` watching the synced tree with nothing changing."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [*INGESTD, "run", "-c", str(cfg)], stdout=fh, stderr=fh, env=ENV, cwd=REPO
        )
    try:
        t = time.perf_counter()
        wait_until(lambda: passed(cfg) or proc.poll() is not None, 3600, 1.0, "the start-up pass")
        if proc.poll() is not None:
            raise SystemExit(f"ingestd run exited {proc.returncode}; see {log}")
        start_secs = time.perf_counter() - t
        start_cpu = cpu_seconds(proc.pid)
        time.sleep(5)  # the pass's own tail (deletion judgement, the first status tick)
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(idle)
        c1, t1 = cpu_seconds(proc.pid), time.monotonic()
        rss = proc_status(proc.pid)["VmRSS"] / 1024
        return (c1 - c0) / (t1 - t0), rss, start_secs, start_cpu
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def one_run(ws: Workspace, src: Path, files: int, idle: float) -> dict[str, float]:
    run = ws.fresh("run")
    state, store, log = run / "state", run / "store", run / "ingestd.log"
    cfg = write_config(
        run / "ingestd.yaml", state=state, store=store, source=src, settle="0s", level="info"
    )
    # The control endpoint on a socket of this run: 127.0.0.1:8751 may be another's.
    data = yaml.safe_load(cfg.read_text())
    data["status"] = {"listen": f"unix:{run / 'control.sock'}"}
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    first, peak = timed_sync(cfg, log)
    noop, noop_peak = timed_sync(cfg, log)
    t = time.perf_counter()
    walked = scandir_walk(src)
    walk = time.perf_counter() - t
    assert walked == files, (walked, files)
    cpu, rss, start, start_cpu = idle_cpu(cfg, log, idle)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "first sync: s": first,
        "first sync: files/s": files / first,
        "first sync: peak RSS MiB (VmHWM)": peak,
        "no-op sync: s": noop,
        "no-op sync: peak RSS MiB": noop_peak,
        "scandir+stat walk: s": walk,
        "no-op sync / walk": noop / walk,
        "run: start-up pass s": start,
        "run: CPU s to the pass's end (start + pass)": start_cpu,
        # The full pass runs again every `rescan` (10 min by default): its share.
        "run: that CPU / 600 s, % of a core": start_cpu / 600 * 100,
        "run idle: % of a core": cpu * 100,
        "run idle: VmRSS MiB": rss,
        "_children_maxrss": children,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--idle", type=float, default=60.0)
    args = ap.parse_args()
    res: dict[str, list[float]] = {}
    with Workspace("million") as ws:
        src = ws.fresh("src")
        t = time.perf_counter()
        make_tree(src, args.files)
        print(f"made {args.files:,} files in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        for i in range(args.runs):
            r = one_run(ws, src, args.files, args.idle)
            print(f"run {i + 1}: {r}", file=sys.stderr, flush=True)
            for k, v in r.items():
                res.setdefault(k, []).append(v)
    rows = [
        (k, f"{median(v):,.2f}" if median(v) < 100 else f"{median(v):,.0f}", spread(v))
        for k, v in res.items()
        if not k.startswith("_")
    ]
    cmd = " ".join(["nice -n 10 .venv/bin/python bench/million.py", *sys.argv[1:]])
    print(f"`{cmd}`: {args.files:,} files of {SIZE} bytes in {FOLDERS:,} folders, local store,")
    print(f"settle 0s, medians of {args.runs} (spread min–max)\n")
    print(machine_md() + "\n")
    print(table(["measure", "median", "spread"], rows))


if __name__ == "__main__":
    main()
