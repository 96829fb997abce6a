"""Recording plans in the ledger: plans/s of a pass's batches, one op per plan against
one op per batch (ops.op_apply_plans), on SQLite and PostgreSQL, same run.

Each case plans `--items` new items in batches of `--batch` (one transaction each, as
the plan queue records one unit of work), then the same plans again (every one
'unchanged': a rescan), into a fresh ledger; one file entry and two metadata values per
item. The cases alternate within every run, so load drifts hit all alike. With code
from before op_apply_plans (an A/B against an older commit: put its `daemon` folder
first on PYTHONPATH) only the per-op case runs.

    .venv/bin/python bench/planning.py [--items N] [--batch B] [--runs R]

PostgreSQL: $INGESTD_TEST_POSTGRES_DSN when set (`. .ci/services.sh && start_services`),
otherwise a server of its own (tests/support/postgres.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# An older tree's code when PYTHONPATH names one (the A/B), else this tree's.
if not any(Path(p, "ingestd").is_dir() for p in os.environ.get("PYTHONPATH", "").split(":") if p):
    sys.path.insert(0, str(REPO / "daemon"))

from ingestd.core.model import Entry, ItemPlan, PlannedFile, PlannedSlot  # noqa: E402
from ingestd.ledger import Ledger, LedgerAt  # noqa: E402
from ingestd.ledger import ops as ledger_ops  # noqa: E402
from ingestd.plan.metadata import type_conflicts, value_type  # noqa: E402

from tests.support.postgres import ENV_POSTGRES_DSN, PostgresServer, fresh_schema  # noqa: E402

BATCHED = hasattr(ledger_ops, "op_apply_plans")


def plans(n: int) -> list[tuple[ItemPlan, list[tuple[Entry, str]]]]:
    out = []
    for i in range(n):
        rel = f"d{i // 1000:03}/f{i:06}.jpg"
        slot = PlannedSlot("0", "image", (PlannedFile(rel, rel, 1, 1),))
        meta = {"camera": f"c{i % 7}", "n": i}
        plan = ItemPlan(rel, "/", rel, (slot,), meta, f"fp{i}")
        out.append((plan, [(Entry(rel, 1, 1), "item")]))
    return out


def per_op(batch: list[tuple[ItemPlan, list[tuple[Entry, str]]]]) -> list[Any]:
    now = time.time()
    return [
        Ledger.op_apply_plan("w", "ds", p, es, type_conflicts, value_type, now) for p, es in batch
    ]


def one_op(batch: list[tuple[ItemPlan, list[tuple[Entry, str]]]]) -> list[Any]:
    return [ledger_ops.op_apply_plans("w", "ds", batch, type_conflicts, value_type, time.time())]


def measure(
    at: LedgerAt, items: int, size: int, make: Callable[[list[Any]], list[Any]]
) -> tuple[float, float]:
    """(new plans/s, unchanged plans/s)."""
    work = plans(items)
    lg = Ledger(at)
    try:
        rates = []
        for _ in range(2):
            t0 = time.perf_counter()
            for i in range(0, items, size):
                lg.transaction(make(work[i : i + size]))
            rates.append(items / (time.perf_counter() - t0))
        assert lg.counts()["w"].pending == items
    finally:
        lg.close()
    return rates[0], rates[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--engines", default="sqlite,postgresql")
    args = ap.parse_args()
    server = None
    dsn = os.environ.get(ENV_POSTGRES_DSN)
    engines = args.engines.split(",")
    if "postgresql" in engines and not dsn:
        server = PostgresServer()
        server.start()
        dsn = server.dsn
    modes = [("one op per plan", per_op)] + ([("one op per batch", one_op)] if BATCHED else [])
    got: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        for run in range(args.runs):
            for engine in engines:
                for name, make in modes:
                    with tempfile.TemporaryDirectory() as tmp:
                        if engine == "sqlite":
                            r = measure(LedgerAt(Path(tmp)), args.items, args.batch, make)
                        else:
                            assert dsn is not None
                            with fresh_schema(dsn) as sdsn:
                                at = LedgerAt(Path(tmp), dsn=sdsn)
                                r = measure(at, args.items, args.batch, make)
                    got.setdefault((engine, name), []).append(r)
                    print(
                        f"run {run + 1} {engine}, {name}: {r[0]:,.0f} new plans/s,"
                        f" {r[1]:,.0f} unchanged plans/s",
                        flush=True,
                    )
    finally:
        if server is not None:
            server.remove()
    print(
        f"\n{args.items:,} items in batches of {args.batch}, medians of {args.runs}"
        f" ({ledger_ops.__file__})\n"
    )
    print("| ledger | recorded as | new plans/s | unchanged plans/s |")
    print("| --- | --- | ---: | ---: |")
    for (engine, name), rs in got.items():
        new = statistics.median(r[0] for r in rs)
        same = statistics.median(r[1] for r in rs)
        print(f"| {engine} | {name} | {new:,.0f} | {same:,.0f} |")


if __name__ == "__main__":
    main()
