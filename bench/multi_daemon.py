"""Many daemons on one PostgreSQL ledger (issue 16, point 2): how fast 1, 2 and 3
daemons get through the same backlog, against one daemon on SQLite, same run.

Two parts, each case in turn within every run (so load drifts hit all alike):

- The ledger alone. Each "daemon" is a process with its own `Ledger` (its own holder
  id), doing what the sync pool does with a sink that takes everything at once: claim up
  to 64 due items (`Ledger.due`: a lease in PostgreSQL, a plain read in SQLite) and
  record them, until nothing is due. "claims/s": each item recorded by an op of its own
  (the per-item path: op_retry_later, handing it back); "synced items/s": one
  op_synced_many per batch (the group path).
- End to end, as several daemons are deployed: one bucket watch (moto's S3 from the test
  services, `transfer: copy`, `ingestd serve` as the backend with a fresh store per
  case) and k `ingestd run` processes with their own state dirs on the shared ledger.
  The daemon holding the watch's listing lease lists and plans the prefix; the items are
  spread over the k daemons by their claims. "synced files/s": `--files` objects over
  the time from starting the daemons to the server holding every one (its
  `ingestd_serve_items_total`). The baseline is one daemon on SQLite on the same
  bucket, and the peer is the emulator's own speed: a GET of every object with boto3
  from `workers` threads, in the same run.

    . .ci/services.sh && start_services   # moto (and a PostgreSQL the bench does not use)
    flock /tmp/heavy.lock .venv/bin/python bench/multi_daemon.py [--items N] [--files F] [--runs R]

Starts its own PostgreSQL (tests/support/postgres.py: Debian's postgresql package).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "daemon"))

from ingestd.core.model import ItemPlan, PlannedFile, PlannedSlot  # noqa: E402
from ingestd.ledger import Ledger, LedgerAt  # noqa: E402
from ingestd.ledger.ops import Planning, op_apply_plans  # noqa: E402
from ingestd.plan.metadata import type_conflicts, value_type  # noqa: E402

from tests.support.daemon import INGESTD  # noqa: E402
from tests.support.emulators import S3Emulator, from_env  # noqa: E402
from tests.support.postgres import PostgresServer, fresh_schema  # noqa: E402
from tests.support.serve import Server  # noqa: E402

BATCH = 64
TOKEN = "tok-multi-daemon-bench-0123456789"


def fill(at: LedgerAt, n: int) -> None:
    lg = Ledger(at)
    planned: list[Planning] = []
    for i in range(n):
        rel = f"d{i // 1000:03}/f{i:06}.jpg"
        slot = PlannedSlot("0", "image", (PlannedFile(rel, rel, 1, 1),))
        planned.append((ItemPlan(rel, "/", rel, (slot,), {}, f"fp{i}"), []))
    for i in range(0, n, 2000):
        chunk = planned[i : i + 2000]
        lg.transaction([op_apply_plans("w", "ds", chunk, type_conflicts, value_type, 0.0)])
    lg.close()


def daemon(at: LedgerAt, record: bool, out: mp.Queue) -> None:  # type: ignore[type-arg]
    lg = Ledger(LedgerAt(at.state_dir, dsn=at.dsn))  # its own holder: another daemon
    done = 0
    while claims := lg.due(time.time(), BATCH, [], ["w"]):
        done += len(claims)
        if record:
            lg.transaction([Ledger.op_synced_many([(c, {"m": 1}, None) for c in claims], 0.0)])
        else:  # claims only: hand them back as not due for a minute
            lg.transaction(
                [
                    Ledger.op_retry_later(c, None, time.time() + 60, count_attempt=False, now=0.0)
                    for c in claims
                ]
            )
    lg.close()
    out.put(done)


def measure(at: LedgerAt, daemons: int, n: int, record: bool) -> tuple[float, int]:
    fill(at, n)
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=daemon, args=(at, record, q)) for _ in range(daemons)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    got = sum(q.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    return time.monotonic() - t0, got


WORKERS = 4


def fill_bucket(emu: S3Emulator, files: int) -> str:
    """A bucket holding `files` objects of about 1 KB under in/ (once per bench)."""
    bucket = emu.create_bucket("bench")
    emu.put_many(
        bucket,
        ((f"in/d{i // 500:02}/f{i:05}.txt", f"file {i} ".encode() * 100) for i in range(files)),
    )
    return bucket


def peer_gets(emu: S3Emulator, bucket: str, files: int) -> float:
    """Objects/s of a GET of every object from WORKERS threads: the emulator's own speed."""
    keys = [f"in/d{i // 500:02}/f{i:05}.txt" for i in range(files)]
    local = threading.local()

    def get(key: str) -> int:
        if not hasattr(local, "client"):
            local.client = emu.client()
        return len(local.client.get_object(Bucket=bucket, Key=key)["Body"].read())

    t0 = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        got = sum(1 for n in pool.map(get, keys) if n > 0)
    secs = time.monotonic() - t0
    assert got == files, got
    return files / secs


TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pids: list[int]) -> float:
    """CPU seconds (user + system) these processes have used so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def tree_of(pid: int) -> list[int]:
    """A process and its children (PostgreSQL's backends, one per connection)."""
    found = [pid]
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(d.name))
            except OSError:
                continue
    return found


def moto_pids(endpoint: str) -> list[int]:
    """The moto server answering at `endpoint` (the test services run it)."""
    port = str(urlsplit(endpoint).port)
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"moto.server" in argv and port.encode() in argv:
                found.append(int(d.name))
    return found


def busy_cpus() -> float:
    """CPU seconds the whole machine has been busy (every process, other sessions too)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    )
    return (user + nice + system + irq + softirq) / TICK


def end_to_end(
    tmp: Path,
    pg: PostgresServer | None,
    dsn: str | None,
    daemons: int,
    emu: S3Emulator,
    bucket: str,
    files: int,
    code: Path | None = None,
) -> tuple[float, dict[str, float]]:
    """Synced files/s of `daemons` `ingestd run`s sharing one bucket watch, through
    `ingestd serve`, from their start to the server holding every object; and the CPU
    milliseconds per file each part used meanwhile ("machine": the whole machine's,
    other sessions' work included)."""
    server = Server(tmp, TOKEN)
    serve_proc = server.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        watch = {
            "name": "b",
            "source": emu.url(bucket, "in"),
            "source_options": emu.source_options,
            "dataset": "ds",
            "settle": "0s",
            "transfer": "copy",
            # one listing, at start: the rest of the run is planning and syncing it
            "poll_interval": "1h",
        }
        state: dict[str, object] = {} if dsn is None else {"state": {"ledger": dsn}}
        path = str(REPO) if code is None else f"{code}:{REPO}"  # the daemons' code
        env = {**os.environ, **emu.env, "PYTHONPATH": path, "BENCH_TOKEN": TOKEN}
        logs = []
        others = {"serve": [serve_proc.pid], "moto": moto_pids(emu.endpoint)}
        if pg is not None and pg.proc is not None:
            others["postgresql"] = tree_of(pg.proc.pid)
        before = {part: cpu_of(pids) for part, pids in others.items()}
        machine0 = busy_cpus()
        t0 = time.monotonic()
        for k in range(daemons):
            cfg = tmp / f"d{k}.yaml"
            cfg.write_text(
                json.dumps(
                    {
                        "state_dir": str(tmp / f"state{k}"),
                        "log": {"level": "warning", "format": "json"},
                        "status": {"listen": None},
                        "workers": WORKERS,
                        "backend": {"kind": "http", "url": server.url, "token_env": "BENCH_TOKEN"},
                        "watches": [watch],
                        **state,
                    }
                )
            )
            log = open(tmp / f"d{k}.log", "wb")  # noqa: SIM115 - the daemon writes it until stopped
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [*INGESTD, "run", "-c", str(cfg)],
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )
        deadline = t0 + 900
        while created(server) < files:
            for k, p in enumerate(procs):
                if p.poll() is not None:
                    tail = (tmp / f"d{k}.log").read_bytes()[-2000:].decode(errors="replace")
                    raise RuntimeError(f"daemon {k} exited ({p.returncode}):\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not synced in 900 s: {created(server)} of {files}")
            time.sleep(0.25)  # poll interval, not a wait for readiness
        secs = time.monotonic() - t0
        if pg is not None and pg.proc is not None:
            others["postgresql"] = tree_of(pg.proc.pid)  # the daemons' backends too
        used = {part: cpu_of(pids) - before.get(part, 0.0) for part, pids in others.items()}
        used["daemons"] = cpu_of([p.pid for p in procs])
        used["machine"] = busy_cpus() - machine0
        held = server_items(server)
        assert held == files, (held, files)
        return files / secs, {part: 1000 * c / files for part, c in used.items()}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        server.stop()


def created(server: Server) -> float:
    return sum(
        v
        for k, v in server.metrics().items()
        if k.startswith("ingestd_serve_items_total{") and 'result="created"' in k
    )


def server_items(server: Server) -> int:
    n, cursor = 0, ""
    while True:
        page = server.request("GET", f"/v1/datasets/ds/items?limit=1000&cursor={cursor}").json()
        n += len(page["items"])
        cursor = page.get("next_cursor") or ""
        if not cursor:
            return n


def ledger_alone(dsn: str | None, k: int, n: int, record: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        if dsn is None:
            secs, got = measure(LedgerAt(Path(tmp)), k, n, record)
        else:
            with fresh_schema(dsn) as sdsn:
                secs, got = measure(LedgerAt(Path(tmp), dsn=sdsn), k, n, record)
    assert got == n, got
    return got / secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=5_000)
    ap.add_argument("--files", type=int, default=2_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--old-code",
        type=Path,
        help="an older tree's daemon/ folder: 1 daemon on each engine runs it too, end to"
        " end only, in every run (a same-run A/B of the daemon's code)",
    )
    args = ap.parse_args()
    emu = from_env("s3")
    if not isinstance(emu, S3Emulator):
        raise SystemExit("no S3 emulator: `. .ci/services.sh && start_services` first")
    bucket = fill_bucket(emu, args.files)
    server = PostgresServer()
    server.start()
    cases = [("SQLite, 1 daemon", None, 1)] + [
        (f"PostgreSQL, {k} daemon{'s' if k > 1 else ''}", server.dsn, k) for k in (1, 2, 3)
    ]
    rates: dict[str, dict[str, list[float]]] = {c[0]: {} for c in cases}
    peer: list[float] = []
    old: dict[str, list[float]] = {}
    try:
        for run in range(args.runs):
            peer.append(peer_gets(emu, bucket, args.files))
            print(f"run {run + 1} peer: {peer[-1]:,.0f} GETs/s", flush=True)
            for name, dsn, k in cases:
                got = rates[name]
                got.setdefault("claims", []).append(ledger_alone(dsn, k, args.items, False))
                got.setdefault("synced", []).append(ledger_alone(dsn, k, args.items, True))
                with tempfile.TemporaryDirectory() as tmp:
                    if dsn is None:
                        e2e, cpu = end_to_end(Path(tmp), None, None, k, emu, bucket, args.files)
                    else:
                        with fresh_schema(dsn) as sdsn:
                            e2e, cpu = end_to_end(
                                Path(tmp), server, sdsn, k, emu, bucket, args.files
                            )
                got.setdefault("files", []).append(e2e)
                for part, ms in cpu.items():
                    got.setdefault(f"cpu {part}", []).append(ms)
                print(
                    f"run {run + 1} {name}: {got['claims'][-1]:,.0f} claims/s,"
                    f" {got['synced'][-1]:,.0f} synced items/s, {e2e:,.0f} files/s;"
                    " CPU ms per file: " + ", ".join(f"{p} {ms:.1f}" for p, ms in cpu.items()),
                    flush=True,
                )
            if args.old_code is not None:
                for name, pg in (("SQLite", None), ("PostgreSQL", server)):
                    with tempfile.TemporaryDirectory() as tmp, fresh_schema(server.dsn) as sdsn:
                        dsn = None if pg is None else sdsn
                        e2e, _ = end_to_end(
                            Path(tmp), pg, dsn, 1, emu, bucket, args.files, args.old_code
                        )
                    old.setdefault(name, []).append(e2e)
                    print(f"run {run + 1} {name}, 1 daemon, old code: {e2e:,.0f} files/s")
    finally:
        server.remove()
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in rates.items()}
    base = med[cases[0][0]]
    gets = statistics.median(peer)
    print(
        f"\nledger alone: {args.items:,} items, batches of {BATCH}; end to end: {args.files:,}"
        f" objects of one bucket watch (moto S3, transfer: copy) through `ingestd serve`;"
        f" peer: {gets:,.0f} GETs/s ({WORKERS} threads); medians of {args.runs} runs\n"
    )
    print(
        "| ledger | claims/s | synced items/s | synced files/s end to end"
        " | files/s vs SQLite | files/s vs the peer's GETs/s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, m in med.items():
        print(
            f"| {name} | {m['claims']:,.0f} | {m['synced']:,.0f} | {m['files']:,.0f}"
            f" | {m['files'] / base['files']:.2f}× | {m['files'] / gets:.2f}× |"
        )
    parts = ("daemons", "serve", "moto", "postgresql", "machine")
    print("\n| ledger | CPU ms per synced file: " + " | ".join(parts) + " |")
    print("| --- |" + " ---: |" * len(parts))
    for name, m in med.items():
        row = " | ".join(f"{m[f'cpu {p}']:.1f}" if f"cpu {p}" in m else "-" for p in parts)
        print(f"| {name} | {row} |")
    for name, rs in old.items():
        print(f"old code ({args.old_code}), {name}, 1 daemon: {statistics.median(rs):,.0f} files/s")


if __name__ == "__main__":
    main()
