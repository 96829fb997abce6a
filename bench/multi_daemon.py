"""Many daemons on one PostgreSQL ledger (issue 16, point 2): how fast 1, 2 and 3
daemons get through the same backlog, against one daemon on SQLite, same run.

Each "daemon" is a process with its own `Ledger` (its own holder id), doing what the
sync pool does with a sink that takes everything at once: claim up to 64 due items
(`Ledger.due`: a lease in PostgreSQL, a plain read in SQLite), record them synced in one
transaction (`op_synced_many`), again until nothing is due. What is measured is the
ledger's side of syncing, two ways: "claims/s", items claimed and each recorded by an
op of its own (the per-item path: op_retry_later per item, handing it back), and
"synced items/s", items claimed and recorded synced in one op per batch (the group
path: op_synced_many).
The sink's cost is left out on purpose: with a real backend it is what N daemons
divide, and on this 2-core machine it would only measure the cores.

    .venv/bin/python bench/multi_daemon.py [--items N] [--runs R]

Starts its own PostgreSQL (tests/support/postgres.py: Debian's postgresql package).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
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

from tests.support.postgres import PostgresServer, fresh_schema  # noqa: E402

BATCH = 64


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    server = PostgresServer()
    server.start()
    rows: list[tuple[str, float, float]] = []
    try:
        cases = [("SQLite, 1 daemon", None, 1)] + [
            (f"PostgreSQL, {k} daemon{'s' if k > 1 else ''}", server.dsn, k) for k in (1, 2, 3)
        ]
        for name, dsn, k in cases:
            rates: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.runs):
                for record in (False, True):
                    with tempfile.TemporaryDirectory() as tmp:
                        if dsn is None:
                            secs, got = measure(LedgerAt(Path(tmp)), k, args.items, record)
                        else:
                            with fresh_schema(dsn) as sdsn:
                                secs, got = measure(
                                    LedgerAt(Path(tmp), dsn=sdsn), k, args.items, record
                                )
                    assert got == args.items, (name, got)
                    rates[record].append(got / secs)
            claims, synced = statistics.median(rates[False]), statistics.median(rates[True])
            rows.append((name, claims, synced))
            print(f"{name}: {claims:,.0f} claims/s, {synced:,.0f} synced items/s", flush=True)
    finally:
        server.remove()
    base = rows[0][2]
    print(f"\n{args.items:,} items, batches of {BATCH}, medians of {args.runs} runs\n")
    print("| ledger | claims/s | synced items/s | vs SQLite |")
    print("| --- | ---: | ---: | ---: |")
    for name, claims, synced in rows:
        print(f"| {name} | {claims:,.0f} | {synced:,.0f} | {synced / base:.2f}× |")


if __name__ == "__main__":
    main()
