"""(d) Peak memory of the daemon with a ledger of 100,000 items.

Each run starts `ingestd run` on a fresh state and store over a tree of 100,000 files
and samples /proc/<pid>/status while it syncs them all (peak = VmHWM at the end of the
initial sync; steady = VmRSS 5 s after it). The daemon is then restarted on the full
ledger: its startup rescan walks and diffs all 100,000 files (peak = VmHWM once the
rescan has logged "scan done"; steady = VmRSS 5 s later). Baseline: the VmHWM of a
bare `python -c "import ingestd.runtime.app"`.

    .venv/bin/python bench/rss.py [--runs N]
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from common import (
    ENV,
    INGESTD,
    PYTHON,
    REPO,
    Workspace,
    machine_md,
    make_tree,
    median,
    proc_status,
    runs_arg,
    spread,
    table,
    wait_until,
    write_config,
)

FILES = 100_000
SIZE = 256
STEADY_WAIT = 5.0


def bare_hwm(code: str) -> int:
    out = subprocess.run(
        [
            PYTHON,
            "-c",
            code + "\nimport re\nprint(re.search(r'VmHWM:\\s+(\\d+)',"
            " open('/proc/self/status').read()).group(1))",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        check=True,
    )
    return int(out.stdout.split()[-1])


def ledger_counts(state: Path) -> dict[str, int]:
    path = state / "ledger.sqlite"
    if not path.exists():
        return {}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return dict(conn.execute("SELECT status, count(*) FROM items GROUP BY status"))
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


class Daemon:
    def __init__(self, cfg: Path, log: Path) -> None:
        self.log = log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(
                [*INGESTD, "run", "-c", str(cfg)], stdout=fh, stderr=fh, env=ENV, cwd=REPO
            )
        self.peak_rss = 0

    def sample(self) -> dict[str, int]:
        st = proc_status(self.proc.pid)
        self.peak_rss = max(self.peak_rss, st.get("VmRSS", 0))
        return st

    def log_has(self, text: str, after: int = 0) -> bool:
        return text.encode() in self.log.read_bytes()[after:]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def one_run(ws: Workspace, src: Path) -> dict[str, float]:
    run = ws.fresh("rss")
    state, store, log = run / "state", run / "store", run / "ingestd.log"

    def cfg(level: str) -> Path:
        return write_config(
            run / "ingestd.yaml", state=state, store=store, source=src, settle="2s", level=level
        )

    # 1. initial sync of the whole tree
    d = Daemon(cfg("info"), log)
    t = time.perf_counter()

    def synced() -> bool:
        d.sample()
        c = ledger_counts(state)
        return c.get("synced", 0) == FILES and not c.get("pending") and not c.get("failed")

    wait_until(synced, 1800, 0.25, f"{FILES} items synced")
    sync_secs = time.perf_counter() - t
    sync_peak = d.sample()["VmHWM"]
    time.sleep(STEADY_WAIT)
    sync_steady = d.sample()["VmRSS"]
    d.stop()

    # 2. restart on the full ledger: the startup rescan diffs 100,000 unchanged files
    size = log.stat().st_size
    d = Daemon(cfg("debug"), log)
    t = time.perf_counter()
    wait_until(lambda: d.sample() and d.log_has('"scan done"', size), 600, 0.1, "rescan")
    rescan_secs = time.perf_counter() - t
    rescan_peak = d.sample()["VmHWM"]
    time.sleep(STEADY_WAIT)
    rescan_steady = d.sample()["VmRSS"]
    d.stop()
    c = ledger_counts(state)
    assert c.get("synced") == FILES and not c.get("pending"), c
    return {
        "initial sync: peak (VmHWM)": sync_peak,
        "after initial sync: steady (VmRSS)": sync_steady,
        "restart + rescan: peak (VmHWM)": rescan_peak,
        "after rescan: steady (VmRSS)": rescan_steady,
        "_sync_secs": sync_secs,
        "_rescan_secs": rescan_secs,
    }


def main(runs: int | None = None) -> str:
    runs = runs or runs_arg(3)
    base = [bare_hwm("import ingestd.runtime.app") for _ in range(5)]
    bare = [bare_hwm("pass") for _ in range(5)]
    res: dict[str, list[float]] = {}
    with Workspace("rss") as ws:
        src = ws.fresh("src")
        t = time.perf_counter()
        make_tree(src, FILES, SIZE)
        print(f"tree: {time.perf_counter() - t:.0f}s", file=sys.stderr)
        for i in range(runs):
            r = one_run(ws, src)
            for k, v in r.items():
                res.setdefault(k, []).append(v)
            print(
                f"run {i + 1}/{runs}: "
                + ", ".join(
                    f"{k} {v / 1024:.1f} MiB" if not k.startswith("_") else f"{k} {v:.0f}s"
                    for k, v in r.items()
                ),
                file=sys.stderr,
            )
    b = median(base)
    rows = [
        [
            'baseline: `python -c "import ingestd.runtime.app"` (VmHWM)',
            f"{b / 1024:.1f}",
            spread([x / 1024 for x in base]),
            "1.00",
            "–",
        ],
        [
            "(bare `python -c pass`, VmHWM)",
            f"{median(bare) / 1024:.1f}",
            spread([x / 1024 for x in bare]),
            f"{median(bare) / b:.2f}",
            "–",
        ],
    ]
    for k, v in res.items():
        if k.startswith("_"):
            continue
        mib = [x / 1024 for x in v]
        rows.append(
            [
                k,
                f"{median(mib):.1f}",
                spread(mib),
                f"{median(v) / b:.2f}",
                f"+{(median(v) - b) / 1024:.1f}",
            ]
        )
    return "\n".join(
        [
            f"### (d) daemon memory with a ledger of {FILES:,} items",
            "",
            f"`.venv/bin/python bench/rss.py --runs {runs}` (runs `python -m ingestd.cli run`,"
            f" settle 2s, default workers, {FILES:,} files of {SIZE} B in folders of 100)",
            "",
            table(
                ["what", "MiB (median)", "MiB (spread)", "× baseline", "MiB over baseline"], rows
            ),
            "",
            f"- {runs} runs, fresh state and store per run (the source tree is shared, read"
            " only). Steady = VmRSS 5 s after the phase ended.",
            f"- The initial sync of {FILES:,} files took {median(res['_sync_secs']):.0f} s"
            f" (median; {FILES / median(res['_sync_secs']):,.0f} files/s with settle 2s); the"
            f' restart until its rescan logged "scan done" took'
            f" {median(res['_rescan_secs']):.1f} s.",
        ]
    )


if __name__ == "__main__":
    md = main()
    print(machine_md())
    print()
    print(md)
