"""(e) HTTP upload: the daemon's `http` sink through `ingestd serve`, against the local
store and a minimal aiohttp client, same run, same files.

- small files (5,000 x 10 KB): `ingestd sync` into `ingestd serve` (the http sink's
  batches, POST /v1/batch) against the *same tree* synced into the local store. Each
  side writes into an empty store (the server gets a fresh store per measurement,
  started outside the timing). Target: http >= 0.9x local (issue 13; 0.31x before the
  batch route). The minimal client below runs on the same tree for reference.
- big files (200 x 10 MB): `ingestd sync` against the minimal client, both to the same
  server, fresh content and dataset per measurement. Target: daemon >= 0.8x minimal.
- memory: one 1 GiB file synced through `ingestd serve`: the peak RSS of the daemon
  and the server, and the server's RSS sampled while the bytes move (flat: it does not
  grow with the bytes sent).

Every side is a whole process timed from start to exit (scan, hash, ledger, upload):
`python -m ingestd.cli sync -c CONFIG` for ingestd, this file's `--minimal-client` mode
for the minimal client (walk the tree, then 8 tasks that each, per file, hash it in a
thread, HEAD the blob, PUT it (streamed) when missing, and PUT the manifest: no
retries, no ledger, the floor of the single-item protocol in Python). Requests per
file are counted at the server (`ingestd_serve_requests_total`, /v1 routes). Order
alternates per run; medians of --runs.

    .venv/bin/python bench/http_upload.py [--runs N] [--small N] [--big N] [--rss-mib N]
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
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
)

CONCURRENCY = 8
SMALL = (5_000, 10 * 1024)
BIG = (200, 10 * 1024 * 1024)
TARGET_SMALL = 0.9  # http / local, 10 KB files
TARGET_BIG = 0.8  # daemon / minimal, 10 MB files
TOKEN_ENV = "INGESTD_BENCH_TOKEN"


def _arg(name: str, default: int) -> int:
    args = sys.argv[1:]
    return int(args[args.index(name) + 1]) if name in args else default


# --- the minimal client ----------------------------------------------------------------


async def minimal_client(root: Path, url: str, dataset: str, token: str) -> int:
    import aiohttp

    files = sorted(p for p in root.rglob("*") if p.is_file())
    headers = {"Authorization": f"Bearer {token}"}
    queue: asyncio.Queue[Path] = asyncio.Queue()
    for p in files:
        queue.put_nowait(p)

    def digest_of(path: Path) -> tuple[str, int]:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        return "sha256:" + h.hexdigest(), path.stat().st_size

    async with aiohttp.ClientSession(
        url,
        headers=headers,
        connector=aiohttp.TCPConnector(limit=CONCURRENCY),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=120),
    ) as http:
        async with http.put(f"/v1/datasets/{dataset}") as r:
            assert r.status in (200, 201), r.status

        async def worker() -> None:
            while True:
                try:
                    path = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                digest, size = await asyncio.to_thread(digest_of, path)
                async with http.head(f"/v1/blobs/{digest}") as r:
                    have = r.status == 200
                if not have:
                    with open(path, "rb") as fh:  # aiohttp streams a file object in chunks
                        async with http.put(f"/v1/blobs/{digest}", data=fh) as r:
                            assert r.status in (200, 201), (r.status, await r.text())
                rel = path.relative_to(root).as_posix()
                manifest = {
                    "slots": [
                        {
                            "name": "0",
                            "type": "file",
                            "files": [{"name": path.name, "digest": digest, "size": size}],
                        }
                    ],
                    "metadata": {},
                }
                async with http.put(f"/v1/datasets/{dataset}/items/{rel}", json=manifest) as r:
                    assert r.status in (200, 201), (r.status, await r.text())

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return len(files)


# --- the server --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    def __init__(self, root: Path, token: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        (root / "tokens").write_text(token + "\n")
        self.log = open(root / "serve.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                *INGESTD,
                "serve",
                "--store",
                str(root / "store"),
                "--port",
                str(self.port),
                "--token-file",
                str(root / "tokens"),
                "--log-format",
                "json",
            ],
            cwd=REPO,
            env=ENV,
            stdout=self.log,
            stderr=self.log,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("ingestd serve did not start") from None
                time.sleep(0.05)

    def requests(self) -> float:
        """API requests answered so far (/v1 routes, every status)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("ingestd_serve_requests_total{") and 'route="/v1/' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def items(self, dataset: str) -> int:
        n, cursor = 0, None
        while True:
            q = "?limit=5000" + (f"&cursor={cursor}" if cursor else "")
            req = urllib.request.Request(
                f"{self.url}/v1/datasets/{dataset}/items{q}",
                headers={"Authorization": f"Bearer {self.token}"},
            )
            with urllib.request.urlopen(req, timeout=60) as r:
                page = json.loads(r.read())
            n += len(page["items"])
            cursor = page["next_cursor"]
            if not cursor:
                return n

    def cpu(self) -> float:
        """User + system CPU seconds the server has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


# --- one measurement ---------------------------------------------------------------------


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _config(run: Path, src: Path, dataset: str, backend: dict[str, Any]) -> Path:
    cfg = run / "ingestd.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(run / "state"),
                "log": {"level": "info", "format": "json"},
                "workers": CONCURRENCY,
                "backend": backend,
                "watches": [{"name": "w", "source": str(src), "dataset": dataset, "settle": "0s"}],
            },
            sort_keys=False,
        )
    )
    return cfg


def run_sync(run: Path, cfg: Path) -> tuple[float, float, int]:
    """`ingestd sync -c cfg` as a process: (seconds, CPU seconds, peak RSS kB)."""
    with open(run / "stderr.log", "wb") as err:
        cpu = _child_cpu()
        t = time.perf_counter()
        proc = subprocess.Popen(
            [*INGESTD, "sync", "-c", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=ENV,
            cwd=REPO,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        dt = time.perf_counter() - t
        cpu = _child_cpu() - cpu
    if proc.returncode != 0:
        tail = (run / "stderr.log").read_text(errors="replace").splitlines()[-5:]
        raise RuntimeError(f"ingestd sync exited {proc.returncode}: {tail}")
    return dt, cpu, usage.ru_maxrss


def run_minimal(src: Path, url: str, dataset: str) -> tuple[float, float]:
    cpu = _child_cpu()
    t = time.perf_counter()
    subprocess.run(
        [PYTHON, __file__, "--minimal-client", str(src), url, dataset],
        env=ENV,
        cwd=REPO,
        check=True,
        timeout=1800,
    )
    return time.perf_counter() - t, _child_cpu() - cpu


class Results:
    def __init__(self) -> None:
        self.secs: dict[tuple[str, str], list[float]] = {}
        self.cpus: dict[tuple[str, str], list[float]] = {}
        self.reqs: dict[tuple[str, str], list[float]] = {}
        self.server_cpu: dict[tuple[str, str], list[float]] = {}

    def add(self, key: tuple[str, str], dt: float, cpu: float, reqs: float | None) -> None:
        self.secs.setdefault(key, []).append(dt)
        self.cpus.setdefault(key, []).append(cpu)
        if reqs is not None:
            self.reqs.setdefault(key, []).append(reqs)


def _say(label: str, files: int, size: int, dt: float, cpu: float, reqs: float | None) -> None:
    per = f", {reqs / files:.3f} requests/file" if reqs is not None else ""
    print(
        f"{label}: {dt:.2f}s, cpu {cpu:.2f}s ({files / dt:,.0f} files/s, "
        f"{files * size / dt / 1e6:,.1f} MB/s{per})",
        file=sys.stderr,
    )


def measure_small(ws: Workspace, res: Results, i: int, token: str, files: int, size: int) -> None:
    src = ws.fresh("src-small")
    make_tree(src, files, size, seed=1000 + i)
    os.sync()  # the tree's writeback must not land inside a measurement
    methods = ["local", "http", "minimal"]
    if i % 2:
        methods.reverse()
    for method in methods:
        run = ws.fresh(f"small-{method}")
        reqs: float | None = None
        if method == "local":
            cfg = _config(run, src, "ds", {"kind": "local", "path": str(run / "store")})
            dt, cpu, _ = run_sync(run, cfg)
        else:
            server = Serve(ws.fresh("serve"), token)
            try:
                before, server_cpu = server.requests(), server.cpu()
                if method == "http":
                    backend = {"kind": "http", "url": server.url, "token_env": TOKEN_ENV}
                    dt, cpu, _ = run_sync(run, _config(run, src, "ds", backend))
                else:
                    dt, cpu = run_minimal(src, server.url, "ds")
                reqs = server.requests() - before  # /metrics itself is no /v1 route
                res.server_cpu.setdefault(("small", method), []).append(server.cpu() - server_cpu)
                got = server.items("ds")
            finally:
                server.stop()
            if got != files:
                raise RuntimeError(f"{method}: {got} items, expected {files}")
        res.add(("small", method), dt, cpu, reqs)
        _say(f"run {i + 1} {files} x {size // 1024} KB {method}", files, size, dt, cpu, reqs)


def measure_big(
    ws: Workspace, res: Results, i: int, server: Serve, files: int, size: int, seed: int
) -> None:
    methods = ["daemon", "minimal"]
    if i % 2:
        methods.reverse()
    for method in methods:
        src = ws.fresh(f"src-big-{method}")
        make_tree(src, files, size, seed=seed + len(method))
        os.sync()
        dataset = f"r{i}-{method}"
        before, server_cpu = server.requests(), server.cpu()
        if method == "daemon":
            run = ws.fresh("big-daemon")
            backend = {"kind": "http", "url": server.url, "token_env": TOKEN_ENV}
            dt, cpu, _ = run_sync(run, _config(run, src, dataset, backend))
        else:
            dt, cpu = run_minimal(src, server.url, dataset)
        reqs = server.requests() - before
        res.server_cpu.setdefault(("big", method), []).append(server.cpu() - server_cpu)
        got = server.items(dataset)
        if got != files:
            raise RuntimeError(f"{dataset}: {got} items, expected {files}")
        res.add(("big", method), dt, cpu, reqs)
        _say(f"run {i + 1} {files} x {size >> 20} MB {method}", files, size, dt, cpu, reqs)


def measure_memory(ws: Workspace, token: str, mib: int) -> dict[str, Any]:
    """One `mib` MiB file through `ingestd serve`: peak RSS of both processes, and the
    server's RSS sampled every 0.2 s while the upload runs."""
    src = ws.fresh("src-huge")
    block = os.urandom(1 << 20)
    with open(src / "huge.bin", "wb") as fh:
        for i in range(mib):
            fh.write(f"{i}\n".encode() + block[16:] + bytes(16 - len(f"{i}\n")))
    os.sync()
    server = Serve(ws.fresh("serve-huge"), token)
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            samples.append(proc_status(server.proc.pid)["VmRSS"])

    try:
        idle = proc_status(server.proc.pid)["VmRSS"]
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        run = ws.fresh("huge")
        backend = {"kind": "http", "url": server.url, "token_env": TOKEN_ENV}
        dt, _, daemon_kb = run_sync(run, _config(run, src, "ds", backend))
        done.set()
        sampler.join()
        server_kb = proc_status(server.proc.pid)["VmHWM"]
    finally:
        done.set()
        server.stop()
    return {
        "mib": mib,
        "seconds": dt,
        "daemon_peak_mb": daemon_kb / 1000,
        "server_peak_mb": server_kb / 1000,
        "server_idle_mb": idle / 1000,
        "server_samples_mb": (min(samples) / 1000, max(samples) / 1000) if samples else None,
        "server_quarters_mb": [
            round(max(samples[k * len(samples) // 4 : (k + 1) * len(samples) // 4] or [0]) / 1000)
            for k in range(4)
        ],
    }


def main() -> str:
    runs = runs_arg(3)
    small = (_arg("--small", SMALL[0]), SMALL[1])
    big = (_arg("--big", BIG[0]), BIG[1])
    mib = _arg("--rss-mib", 1024)
    token = secrets.token_hex(24)
    os.environ[TOKEN_ENV] = token
    ENV[TOKEN_ENV] = token
    res = Results()
    memory: dict[str, Any] | None = None
    with Workspace("http") as ws:
        for i in range(runs):
            measure_small(ws, res, i, token, *small)
        if big[0]:
            server = Serve(ws.fresh("serve-big"), token)
            try:
                for i in range(runs):
                    measure_big(ws, res, i, server, *big, seed=2000 + 10 * i)
            finally:
                server.stop()
        if mib:
            memory = measure_memory(ws, token, mib)
            print(f"memory: {json.dumps(memory)}", file=sys.stderr)
    return report(res, runs, small, big, memory)


def _row(res: Results, key: tuple[str, str], label: str, files: int, size: int) -> list[str]:
    s = res.secs[key]
    fps = [files / x for x in s]
    reqs = res.reqs.get(key)
    return [
        f"{files:,} × {size // 1024 if size < 1 << 20 else size >> 20} "
        + ("KB" if size < 1 << 20 else "MB"),
        label,
        f"{median(s):.2f}",
        f"{median(fps):,.0f}",
        spread(fps),
        f"{median([files * size / x / 1e6 for x in s]):,.1f}",
        f"{median(res.cpus[key]):.2f}",
        f"{median(res.server_cpu[key]):.2f}" if key in res.server_cpu else "–",
        f"{median(reqs) / files:.3f}" if reqs else "0",
    ]


def report(
    res: Results,
    runs: int,
    small: tuple[int, int],
    big: tuple[int, int],
    memory: dict[str, Any] | None,
) -> str:
    rows = [
        _row(res, ("small", "local"), "ingestd sync, local store", *small),
        _row(res, ("small", "http"), "ingestd sync, http sink → ingestd serve", *small),
        _row(res, ("small", "minimal"), "minimal aiohttp client → ingestd serve", *small),
    ]
    fps = {k: median([small[0] / x for x in v]) for k, v in res.secs.items() if k[0] == "small"}
    ratio_small = fps[("small", "http")] / fps[("small", "local")]
    notes = [
        f"- 10 KB: http / local = {ratio_small:.2f} (target ≥ {TARGET_SMALL}: "
        + ("met" if ratio_small >= TARGET_SMALL else "**missed**")
        + f"); http / minimal client = {fps[('small', 'http')] / fps[('small', 'minimal')]:.2f}."
    ]
    if ("big", "daemon") in res.secs:
        rows += [
            _row(res, ("big", "daemon"), "ingestd sync, http sink → ingestd serve", *big),
            _row(res, ("big", "minimal"), "minimal aiohttp client → ingestd serve", *big),
        ]
        b = {k: median([big[0] / x for x in v]) for k, v in res.secs.items() if k[0] == "big"}
        ratio_big = b[("big", "daemon")] / b[("big", "minimal")]
        notes.append(
            f"- 10 MB: daemon / minimal = {ratio_big:.2f} (target ≥ {TARGET_BIG}: "
            + ("met" if ratio_big >= TARGET_BIG else "**missed**")
            + ")."
        )
    if memory is not None:
        lo, hi = memory["server_samples_mb"] or (0, 0)
        notes.append(
            f"- {memory['mib']:,} MiB file through ingestd serve in {memory['seconds']:.1f} s:"
            f" peak RSS daemon {memory['daemon_peak_mb']:.0f} MB, server"
            f" {memory['server_peak_mb']:.0f} MB (idle {memory['server_idle_mb']:.0f} MB;"
            f" sampled while uploading {lo:.0f}–{hi:.0f} MB, peak per quarter of the upload"
            f" {memory['server_quarters_mb']} MB)."
        )
    return "\n".join(
        [
            "### (e) HTTP upload: ingestd serve against the local store and a minimal client",
            "",
            f"`.venv/bin/python bench/http_upload.py --runs {runs}` (concurrency {CONCURRENCY};"
            " every side a whole process from start to exit, hashing included; 10 KB: the same"
            " tree for the three, each into an empty store; 10 MB: fresh content and dataset"
            " per measurement, one server)",
            "",
            table(
                [
                    "files",
                    "client",
                    "seconds (median)",
                    "files/s (median)",
                    "files/s (spread)",
                    "MB/s (median)",
                    "client CPU s (median)",
                    "server CPU s (median)",
                    "API requests per file",
                ],
                rows,
            ),
            "",
            f"- {runs} runs; medians, spread = min–max; order alternates per run.",
            "- client CPU s: user + system CPU of the client process; server CPU s: the"
            " server's during the measurement; requests counted at the server (/v1 routes).",
            *notes,
        ]
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--minimal-client":
        root, url, dataset = Path(sys.argv[2]), sys.argv[3], sys.argv[4]
        asyncio.run(minimal_client(root, url, dataset, os.environ[TOKEN_ENV]))
        sys.exit(0)
    md = main()
    print(machine_md())
    print()
    print(md)
