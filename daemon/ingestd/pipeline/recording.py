"""A planning result into the ledger: plans, failed plans, plain entries, and the items
of a group folder that the new plan no longer has."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ingestd.ledger import Ledger
from ingestd.ledger.ops import PlanFailure, Planning, op_apply_plans
from ingestd.pipeline.planner import PlanBatch, failed_fingerprint
from ingestd.plan.metadata import type_conflicts, value_type

if TYPE_CHECKING:
    from ingestd.pipeline.runner import WatchRunner


async def record_plans(runner: WatchRunner, batch: PlanBatch) -> None:
    """Write a planning result to the ledger and log the items that failed. The whole
    batch is one op of a few statements (op_apply_plans), not one op per item: with a
    shared PostgreSQL ledger every statement is a round trip."""
    now = time.time()
    w = runner.watch
    ledger = runner.ledger
    planned: list[Planning] = []
    for p in batch.planned:
        if p.plan is not None:
            planned.append((p.plan, p.entries))
        elif p.error is not None:
            failure = PlanFailure(p.source_id, p.key, failed_fingerprint(p.entries), p.error)
            planned.append((failure, p.entries))
        else:
            planned.append((None, p.entries))
    if batch.entries_only:
        planned.append((None, batch.entries_only))
    ops = [op_apply_plans(w.name, w.dataset, planned, type_conflicts, value_type, now)]
    for group_dir, source_ids in batch.groups.items():
        existing = await ledger.call(ledger.sync.group_items, w.name, group_dir)
        stale = [sid for sid in existing if sid not in source_ids]
        if stale:
            ops.append(Ledger.op_drop_items(w.name, stale, w.on_delete, now))
    results = (await ledger.write_many(ops))[0]
    for p, (result, reason) in zip(batch.planned, results, strict=False):
        if result == "failed":
            runner.log.error("item failed", item=p.key, source=p.source_id, reason=reason)
