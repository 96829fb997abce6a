"""Run every benchmark and print the markdown for bench/RESULTS.md.

    .venv/bin/python bench/run_all.py [--runs N]   (N overrides each bench's default)

Progress goes to stderr; the markdown to stdout. Takes ~20 minutes on 2 cores.
"""

from __future__ import annotations

import os
import sys
import time

import latency
import rescan
import rss
import sync_throughput
from common import machine_md, pressure, runs_arg

BENCHES = [sync_throughput, rescan, latency, rss]


def main() -> None:
    runs = runs_arg(0) or None
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = machine_md()
    sections = []
    for bench in BENCHES:
        t = time.perf_counter()
        print(f"== {bench.__name__}", file=sys.stderr)
        sections.append(bench.main(runs))
        print(f"== {bench.__name__}: {time.perf_counter() - t:.0f}s", file=sys.stderr)
    print(f"## Run of {started}\n")
    print("Machine (at the start of the run):\n")
    print(header)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"- at the end: load average {load}; cpu pressure {pressure('cpu')};"
        f" io pressure {pressure('io')}"
    )
    for s in sections:
        print()
        print(s)


if __name__ == "__main__":
    main()
