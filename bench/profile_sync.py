"""Where the time of a one-pass sync goes (a profiling aid for (a), not a benchmark).

Runs `ingestd sync` (settle 0s) over a fresh tree of 10,000 x 10 KB files under
`py-spy record --gil` (install with `.venv/bin/pip install py-spy`), samples each
thread's CPU time from /proc while it runs, and prints: CPU seconds per thread
(user+sys), the share of GIL-holding samples per thread, and the functions holding the
GIL (inclusive and self shares).

    .venv/bin/python bench/profile_sync.py [--files N] [--workers N]
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import ENV, INGESTD, REPO, Workspace, make_tree, table, write_config

CLK = os.sysconf("SC_CLK_TCK")


def _arg(name: str, default: int) -> int:
    a = sys.argv[1:]
    return int(a[a.index(name) + 1]) if name in a else default


def _child_pid(parent: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            kids = []
        if kids:
            return int(kids[0])
        time.sleep(0.005)
    raise TimeoutError("py-spy did not start the python process")


def _sample_threads(
    pid: int, seen: dict[int, tuple[str, float, float]], stop: threading.Event
) -> None:
    """Keep the latest CPU seconds of every thread (threads that end keep their last)."""
    while not stop.is_set():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return
        for tid in tids:
            try:
                name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
                fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            seen[int(tid)] = (name, int(fields[11]) / CLK, int(fields[12]) / CLK)
        stop.wait(0.05)


def _norm_thread(label: str) -> str:
    # "thread (1234): ingestd-local-sink_3" -> "ingestd-local-sink"
    name = label.split(":", 1)[-1].strip() if ":" in label else label
    return re.sub(r"_\d+$", "", name) or label


def _frame(f: str) -> str:
    return re.sub(r":\d+\)", ")", f)


def main() -> None:
    files = _arg("--files", 10_000)
    workers = _arg("--workers", 8)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(pyspy):
        sys.exit("py-spy not found: .venv/bin/pip install py-spy")
    with Workspace("profile") as ws:
        src = ws.fresh("src")
        make_tree(src, files, 10 * 1024)
        run = ws.fresh("run")
        cfg = write_config(
            run / "ingestd.yaml",
            state=run / "state",
            store=run / "store",
            source=src,
            settle="0s",
            workers=workers,
        )
        raw = run / "pyspy.txt"
        os.sync()
        t = time.perf_counter()
        with open(run / "stderr.log", "wb") as err:
            spy = subprocess.Popen(
                [
                    pyspy,
                    "record",
                    "--gil",
                    "--threads",
                    "-r",
                    "250",
                    "-f",
                    "raw",
                    "-o",
                    str(raw),
                    "--",
                    *INGESTD,
                    "sync",
                    "-c",
                    str(cfg),
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=ENV,
                cwd=REPO,
            )
            pid = _child_pid(spy.pid)
            seen: dict[int, tuple[str, float, float]] = {}
            stop = threading.Event()
            sampler = threading.Thread(target=_sample_threads, args=(pid, seen, stop))
            sampler.start()
            spy.wait()
            stop.set()
            sampler.join()
        wall = time.perf_counter() - t

        # py-spy labels threads "thread (<os tid>): <python name>": name the /proc tids.
        names: dict[int, str] = {}
        for line in raw.read_text().splitlines():
            m = re.match(r"thread \((\d+)\): ([^;]+);", line)
            if m:
                names[int(m.group(1))] = re.sub(r"_\d+$", "", m.group(2).strip())
        cpu: collections.Counter[str] = collections.Counter()
        usr: collections.Counter[str] = collections.Counter()
        for tid, (_, u, k) in seen.items():
            name = names.get(tid, f"tid {tid} (never held the GIL)")
            cpu[name] += u + k
            usr[name] += u
        total_cpu = sum(cpu.values())
        print(
            f"{files} files, workers {workers}: {wall:.2f}s wall under py-spy,"
            f" {files / wall:,.0f} files/s; CPU {total_cpu:.2f}s"
            f" ({total_cpu / files * 1e3:.2f} ms per file)\n"
        )
        print(
            table(
                ["thread", "CPU s (user+sys)", "of which sys", "share of CPU"],
                [
                    [k, f"{v:.2f}", f"{v - usr[k]:.2f}", f"{v / total_cpu:.0%}"]
                    for k, v in cpu.most_common()
                ],
            )
        )

        per_thread: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        threads: collections.Counter[str] = collections.Counter()
        incl: collections.Counter[str] = collections.Counter()
        self_: collections.Counter[str] = collections.Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, n_s = line.rpartition(" ")
            n = int(n_s)
            frames = stack.split(";")
            total += n
            threads[_norm_thread(frames[0])] += n
            for f in {_frame(f) for f in frames[1:]}:
                incl[f] += n
                per_thread[_norm_thread(frames[0])][f] += n
            self_[_frame(frames[-1])] += n
        rate = 250
        print(
            f"\nGIL held in {total} samples of {wall * rate:.0f} possible"
            f" ({total / (wall * rate):.0%} of wall time)\n"
        )
        print(
            table(
                ["thread holding the GIL", "share"],
                [[k, f"{v / total:.1%}"] for k, v in threads.most_common()],
            )
        )
        skip = ("threading.py", "runpy", "<module>", "asyncio/runners.py", "cli.py)")
        print(
            "\n"
            + table(
                ["function (inclusive, GIL samples)", "share"],
                [
                    [f, f"{v / total:.1%}"]
                    for f, v in incl.most_common(60)
                    if not any(s in f for s in skip)
                ][:35],
            )
        )
        for th, _ in threads.most_common(4):
            print(
                "\n"
                + table(
                    [f"{th}: function (inclusive)", "share of all GIL samples"],
                    [
                        [f, f"{v / total:.1%}"]
                        for f, v in per_thread[th].most_common(40)
                        if not any(s in f for s in skip)
                    ][:15],
                )
            )
        print(
            "\n"
            + table(
                ["function (self, GIL samples)", "share"],
                [[f, f"{v / total:.1%}"] for f, v in self_.most_common(25)],
            )
        )


if __name__ == "__main__":
    main()
