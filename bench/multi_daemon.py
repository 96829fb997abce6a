"""Many daemons on one PostgreSQL ledger (issue 16, point 2): how fast 1, 2 and 3
daemons get through the same backlog, against one daemon on SQLite, same run.

Two parts, each case in turn within every run (so load drifts hit all alike):

- The ledger alone. Each "daemon" is a process with its own `Ledger` (its own holder
  id), doing what the sync pool does with a sink that takes everything at once: claim up
  to 64 due items (`Ledger.due`: a lease in PostgreSQL, a plain read in SQLite) and
  record them, until nothing is due. "claims/s": each item recorded by an op of its own
  (the per-item path: op_retry_later, handing it back); "synced items/s": one
  op_synced_many per batch (the group path).
- End to end. `--files` small files in one local folder, `ingestd serve` as the backend
  (a fresh store per case), and k `ingestd sync` processes, each with its own state_dir
  and the same watch (name, folder) on the shared ledger; "synced files/s" is the files
  over the time from starting them to the last one's exit, and the server must then hold
  every file. Each process lists and plans the folder (a local watch is listed by every
  daemon that has it: the second plans find every item unchanged) and claims through
  leases, so the sink, the planning and the ledger share this machine's cores.

    .venv/bin/python bench/multi_daemon.py [--items N] [--files F] [--runs R]

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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "daemon"))

from ingestd.core.model import ItemPlan, PlannedFile, PlannedSlot  # noqa: E402
from ingestd.ledger import Ledger, LedgerAt  # noqa: E402
from ingestd.plan.metadata import type_conflicts, value_type  # noqa: E402

from tests.support.daemon import INGESTD  # noqa: E402
from tests.support.postgres import PostgresServer, fresh_schema  # noqa: E402
from tests.support.serve import Server  # noqa: E402

BATCH = 64
TOKEN = "tok-multi-daemon-bench-0123456789"


def fill(at: LedgerAt, n: int) -> None:
    lg = Ledger(at)
    ops = []
    for i in range(n):
        rel = f"d{i // 1000:03}/f{i:06}.jpg"
        slot = PlannedSlot("0", "image", (PlannedFile(rel, rel, 1, 1),))
        plan = ItemPlan(rel, "/", rel, (slot,), {}, f"fp{i}")
        ops.append(Ledger.op_apply_plan("w", "ds", plan, [], type_conflicts, value_type, 0.0))
        if len(ops) == 2000:
            lg.transaction(ops)
            ops = []
    lg.transaction(ops)
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


def end_to_end(tmp: Path, dsn: str | None, daemons: int, files: int) -> float:
    """Synced files/s of `daemons` one-pass syncs of one folder through `ingestd serve`."""
    drop = tmp / "drop"
    drop.mkdir()
    for i in range(files):
        d = drop / f"d{i // 500:02}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:05}.txt").write_bytes(f"file {i} ".encode() * 100)
    server = Server(tmp, TOKEN)
    server.start()
    try:
        configs = []
        for k in range(daemons):
            cfg = tmp / f"d{k}.yaml"
            state: dict[str, object] = {} if dsn is None else {"state": {"ledger": dsn}}
            cfg.write_text(
                json.dumps(
                    {
                        "state_dir": str(tmp / f"state{k}"),
                        "log": {"level": "warning", "format": "json"},
                        "status": {"listen": None},
                        "workers": 4,
                        "backend": {"kind": "http", "url": server.url, "token_env": "BENCH_TOKEN"},
                        "watches": [
                            {"name": "w", "source": str(drop), "dataset": "ds", "settle": "0s"}
                        ],
                        **state,
                    }
                )
            )
            configs.append(cfg)
        env = {**os.environ, "PYTHONPATH": str(REPO), "BENCH_TOKEN": TOKEN}
        t0 = time.monotonic()
        procs = [
            subprocess.Popen(
                [*INGESTD, "sync", "-c", str(c)],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for c in configs
        ]
        errs = [p.communicate(timeout=900)[1] for p in procs]
        secs = time.monotonic() - t0
        for p, err in zip(procs, errs, strict=True):
            assert p.returncode == 0, err.decode(errors="replace")[-2000:]
        held = server_items(server)
        assert held == files, (held, files)
        return files / secs
    finally:
        server.stop()


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
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--files", type=int, default=2_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    server = PostgresServer()
    server.start()
    cases = [("SQLite, 1 daemon", None, 1)] + [
        (f"PostgreSQL, {k} daemon{'s' if k > 1 else ''}", server.dsn, k) for k in (1, 2, 3)
    ]
    rates: dict[str, dict[str, list[float]]] = {c[0]: {} for c in cases}
    try:
        for run in range(args.runs):
            for name, dsn, k in cases:
                got = rates[name]
                got.setdefault("claims", []).append(ledger_alone(dsn, k, args.items, False))
                got.setdefault("synced", []).append(ledger_alone(dsn, k, args.items, True))
                with tempfile.TemporaryDirectory() as tmp:
                    if dsn is None:
                        e2e = end_to_end(Path(tmp), None, k, args.files)
                    else:
                        with fresh_schema(dsn) as sdsn:
                            e2e = end_to_end(Path(tmp), sdsn, k, args.files)
                got.setdefault("files", []).append(e2e)
                print(
                    f"run {run + 1} {name}: {got['claims'][-1]:,.0f} claims/s,"
                    f" {got['synced'][-1]:,.0f} synced items/s, {e2e:,.0f} files/s",
                    flush=True,
                )
    finally:
        server.remove()
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in rates.items()}
    base = med[cases[0][0]]
    print(
        f"\nledger alone: {args.items:,} items, batches of {BATCH}; end to end: {args.files:,}"
        f" files through `ingestd serve`; medians of {args.runs} runs\n"
    )
    print("| ledger | claims/s | synced items/s | synced files/s end to end | files/s vs SQLite |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, m in med.items():
        print(
            f"| {name} | {m['claims']:,.0f} | {m['synced']:,.0f} | {m['files']:,.0f}"
            f" | {m['files'] / base['files']:.2f}× |"
        )


if __name__ == "__main__":
    main()
