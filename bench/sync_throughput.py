"""(a) One-pass sync throughput: `ingestd sync` of 10,000 x 10 KB files into the local
store, against `cp -r` of the same tree (and `cp -r` + `sync`, its durable equivalent:
the store fsyncs every blob). Each run makes a fresh tree and fresh destinations.

    .venv/bin/python bench/sync_throughput.py [--runs N]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from common import (
    ENV,
    INGESTD,
    REPO,
    Workspace,
    machine_md,
    make_tree,
    median,
    runs_arg,
    spread,
    table,
    write_config,
)

FILES = 10_000
SIZE = 10 * 1024
TARGET = 2_000  # files/s


def timed(cmd: list[str], **kw: object) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]
    return time.perf_counter() - t


def ingestd_sync(ws: Workspace, src: Path, settle: str, expect: int) -> float:
    run = ws.fresh(f"sync-{settle}")
    cfg = write_config(
        run / "ingestd.yaml", state=run / "state", store=run / "store", source=src, settle=settle
    )
    with open(run / "stderr.log", "wb") as err:
        t = time.perf_counter()
        proc = subprocess.run(
            [*INGESTD, "sync", "-c", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=ENV,
            cwd=REPO,
            timeout=900,
        )
        dt = time.perf_counter() - t
    tail = (run / "stderr.log").read_text(errors="replace").strip().splitlines()[-1:]
    if proc.returncode != 0 or (expect and (not tail or f"{expect} synced" not in tail[0])):
        raise RuntimeError(f"ingestd sync failed ({proc.returncode}): {tail}")
    return dt


def one_run(ws: Workspace, i: int) -> dict[str, float]:
    src = ws.fresh("src")
    make_tree(src, FILES, SIZE, seed=i)
    empty = ws.fresh("empty-src")
    os.sync()  # the tree's own writeback must not land inside a measurement
    steps = {
        "cp -r": lambda: timed(["cp", "-r", str(src), str(ws.fresh("cp") / "dst")]),
        "cp -r; sync": lambda: timed(
            ["sh", "-c", f"cp -r '{src}' '{ws.fresh('cpsync') / 'dst'}' && sync"]
        ),
        "ingestd sync, settle 2s": lambda: ingestd_sync(ws, src, "2s", FILES),
        "ingestd sync, settle 0s": lambda: ingestd_sync(ws, src, "0s", FILES),
        "ingestd sync, empty folder (fixed cost)": lambda: ingestd_sync(ws, empty, "0s", 0),
    }
    names = list(steps)
    order = names[i % len(names) :] + names[: i % len(names)]  # rotate: no order bias
    out = {}
    for name in order:
        os.sync()
        out[name] = steps[name]()
    return out


def main(runs: int | None = None) -> str:
    runs = runs or runs_arg(5)
    results: dict[str, list[float]] = {}
    with Workspace("sync") as ws:
        for i in range(runs):
            r = one_run(ws, i)
            for k, v in r.items():
                results.setdefault(k, []).append(v)
            print(
                f"run {i + 1}/{runs}: " + ", ".join(f"{k} {v:.2f}s" for k, v in r.items()),
                file=sys.stderr,
            )
    base = median(results["cp -r"])
    rows = []
    for name, secs in results.items():
        if "empty" in name:
            rows.append([name, f"{median(secs):.2f}", spread(secs), "–", "–", "–"])
            continue
        rates = [FILES / s for s in secs]
        rows.append(
            [
                name,
                f"{median(secs):.2f}",
                spread(secs),
                f"{median(rates):,.0f}",
                spread(rates),
                f"{base / median(secs):.2f}",
            ]
        )
    fixed = median(results["ingestd sync, empty folder (fixed cost)"])
    s0 = median(results["ingestd sync, settle 0s"])
    s2 = median(results["ingestd sync, settle 2s"])
    notes = [
        f"- {runs} runs, fresh source tree and destinations per run, order rotated per run;"
        " medians, spread = min–max.",
        f"- Settle is a fixed wait, not throughput: every file waits `settle` once, all at"
        f" the same time, so it adds a constant to the run, not a per-file cost (settle 2s"
        f" − settle 0s = {s2 - s0:+.2f}s here, median; noise is of the same order).",
        f"- Without the fixed start/stop cost ({fixed:.2f}s, empty folder): settle 0s moves"
        f" {FILES / max(s0 - fixed, 1e-9):,.0f} files/s.",
        f"- Target ≥ {TARGET:,} files/s (settle 0s): "
        + ("met." if FILES / s0 >= TARGET else f"**missed** ({FILES / s0:,.0f} files/s)."),
    ]
    return "\n".join(
        [
            f"### (a) one-pass sync, {FILES:,} × {SIZE // 1024} KB files",
            "",
            "`.venv/bin/python bench/sync_throughput.py --runs "
            f"{runs}` (runs `python -m ingestd.cli sync -c <cfg>`, default workers, JSON info logs"
            " to a file)",
            "",
            table(
                [
                    "what",
                    "seconds (median)",
                    "seconds (spread)",
                    "files/s (median)",
                    "files/s (spread)",
                    "speed vs cp -r",
                ],
                rows,
            ),
            "",
            *notes,
        ]
    )


if __name__ == "__main__":
    md = main()
    print(machine_md())
    print()
    print(md)
