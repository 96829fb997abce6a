"""(e) HTTP upload throughput: the daemon's `http` sink against a minimal aiohttp client,
both uploading to the same `ingestd serve` with the same concurrency (8).

- daemon: `ingestd sync -c <cfg>` (http backend, workers 8, settle 0s, JSON info logs to
  a file), timed from process start to exit: scan, hash, ledger, upload, manifest.
- minimal: this file's `--minimal-client` mode in its own process, also timed from
  start to exit: walk the tree, then 8 tasks that each, per file, hash it (in a thread),
  HEAD the blob, PUT it (streamed from the file) when missing, and PUT the manifest.
  No retries, no ledger: the floor of what the protocol costs in Python.

Every measurement gets a fresh tree with content no earlier measurement used (so the
server never already holds a blob) and its own dataset; the server and its store stay
the same for the whole benchmark. Both sides run under the same interpreter on the
same machine as the server (loopback). Order alternates per run; medians of --runs.

    .venv/bin/python bench/http_upload.py [--runs N] [--small N] [--big N]
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
import time
import urllib.request
from pathlib import Path

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
    runs_arg,
    spread,
    table,
)

CONCURRENCY = 8
SCENARIOS = {  # name -> (files, size)
    "10 KB": (10_000, 10 * 1024),
    "10 MB": (200, 10 * 1024 * 1024),
}
TARGET_RATIO = 0.8  # daemon / minimal, 10 MB files
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

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def item_count(url: str, dataset: str, token: str) -> int:
    n, cursor = 0, None
    while True:
        q = "?limit=5000" + (f"&cursor={cursor}" if cursor else "")
        req = urllib.request.Request(
            f"{url}/v1/datasets/{dataset}/items{q}", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            page = json.loads(r.read())
        n += len(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            return n


# --- one measurement ---------------------------------------------------------------------


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_daemon(ws: Workspace, src: Path, url: str, dataset: str) -> tuple[float, float]:
    run = ws.fresh("daemon")
    cfg = run / "ingestd.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(run / "state"),
                "log": {"level": "info", "format": "json"},
                "workers": CONCURRENCY,
                "backend": {"kind": "http", "url": url, "token_env": TOKEN_ENV},
                "watches": [{"name": "w", "source": str(src), "dataset": dataset, "settle": "0s"}],
            },
            sort_keys=False,
        )
    )
    with open(run / "stderr.log", "wb") as err:
        cpu = _child_cpu()
        t = time.perf_counter()
        proc = subprocess.run(
            [*INGESTD, "sync", "-c", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=ENV,
            cwd=REPO,
            timeout=1800,
        )
        dt = time.perf_counter() - t
        cpu = _child_cpu() - cpu
    if proc.returncode != 0:
        tail = (run / "stderr.log").read_text(errors="replace").splitlines()[-5:]
        raise RuntimeError(f"ingestd sync exited {proc.returncode}: {tail}")
    return dt, cpu


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


def main() -> str:
    runs = runs_arg(3)
    scenarios = dict(SCENARIOS)
    scenarios["10 KB"] = (_arg("--small", scenarios["10 KB"][0]), scenarios["10 KB"][1])
    scenarios["10 MB"] = (_arg("--big", scenarios["10 MB"][0]), scenarios["10 MB"][1])
    token = secrets.token_hex(24)
    os.environ[TOKEN_ENV] = token
    ENV[TOKEN_ENV] = token
    secs: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    seed = 0
    with Workspace("http") as ws:
        server = Serve(ws.fresh("serve"), token)
        try:
            for i in range(runs):
                for name, (files, size) in scenarios.items():
                    methods = ["daemon", "minimal"]
                    if i % 2:
                        methods.reverse()
                    for method in methods:
                        seed += 1
                        src = ws.fresh(f"src-{method}")
                        make_tree(src, files, size, seed=seed)
                        os.sync()  # the tree's writeback must not land inside a measurement
                        dataset = f"r{i}-{method}-{name.replace(' ', '')}"
                        if method == "daemon":
                            dt, cpu = run_daemon(ws, src, server.url, dataset)
                        else:
                            dt, cpu = run_minimal(src, server.url, dataset)
                        got = item_count(server.url, dataset, token)
                        if got != files:
                            raise RuntimeError(f"{dataset}: {got} items, expected {files}")
                        secs.setdefault((name, method), []).append(dt)
                        cpus.setdefault((name, method), []).append(cpu)
                        print(
                            f"run {i + 1}/{runs} {name} {method}: {dt:.2f}s, cpu {cpu:.2f}s "
                            f"({files / dt:,.0f} files/s, {files * size / dt / 1e6:,.1f} MB/s)",
                            file=sys.stderr,
                        )
        finally:
            server.stop()

    rows = []
    notes = []
    for name, (files, size) in scenarios.items():
        med = {}
        for method in ("daemon", "minimal"):
            s = secs[(name, method)]
            fps = [files / x for x in s]
            mbs = [files * size / x / 1e6 for x in s]
            med[method] = median(fps)
            rows.append(
                [
                    f"{files:,} × {name}",
                    "ingestd sync (http sink)" if method == "daemon" else "minimal aiohttp client",
                    f"{median(s):.2f}",
                    f"{median(fps):,.0f}",
                    spread(fps),
                    f"{median(mbs):,.1f}",
                    spread(mbs),
                    f"{median(cpus[(name, method)]):.2f}",
                    "",
                ]
            )
        ratio = med["daemon"] / med["minimal"]
        rows[-1][-1] = rows[-2][-1] = f"{ratio:.2f}"
        if size >= 1 << 20:
            verdict = "met" if ratio >= TARGET_RATIO else "**missed**"
            notes.append(f"- Target daemon/minimal ≥ {TARGET_RATIO} for {name} files: {verdict}.")
    return "\n".join(
        [
            "### (e) HTTP upload: daemon vs a minimal aiohttp client, same `ingestd serve`",
            "",
            f"`.venv/bin/python bench/http_upload.py --runs {runs}` (concurrency {CONCURRENCY}"
            " on both sides; each side timed as a process from start to exit, hashing included;"
            " fresh content and dataset per measurement, one server and store throughout)",
            "",
            table(
                [
                    "files",
                    "client",
                    "seconds (median)",
                    "files/s (median)",
                    "files/s (spread)",
                    "MB/s (median)",
                    "MB/s (spread)",
                    "client CPU s (median)",
                    "daemon / minimal",
                ],
                rows,
            ),
            "",
            f"- {runs} runs; medians, spread = min–max; order of the two clients alternates per run.",
            "- client CPU s: user + system CPU of the client process (the server's is not"
            " included), a figure less sensitive than wall time to other load on the machine.",
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
