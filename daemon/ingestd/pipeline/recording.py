"""A planning result into the ledger: plans, failed plans, plain entries, and the items
of a group folder that the new plan no longer has."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ingestd.ledger import Ledger
from ingestd.pipeline.planner import PlanBatch, failed_fingerprint
from ingestd.plan.metadata import type_conflicts, value_type

if TYPE_CHECKING:
    from ingestd.pipeline.runner import WatchRunner


async def record_plans(runner: WatchRunner, batch: PlanBatch) -> None:
    """Write a planning result to the ledger and log the items that failed."""
    now = time.time()
    w = runner.watch
    ledger = runner.ledger
    ops = []
    for p in batch.planned:
        if p.plan is not None:
            ops.append(
                Ledger.op_apply_plan(
                    w.name, w.dataset, p.plan, p.entries, type_conflicts, value_type, now
                )
            )
        elif p.error is not None:
            fp = failed_fingerprint(p.entries)
            ops.append(
                Ledger.op_plan_failed(
                    w.name, w.dataset, p.source_id, p.key, fp, p.entries, p.error, now
                )
            )
        else:
            ops.append(Ledger.op_put_entries(w.name, p.entries))
    if batch.entries_only:
        ops.append(Ledger.op_put_entries(w.name, batch.entries_only))
    for group_dir, source_ids in batch.groups.items():
        existing = await ledger.call(ledger.sync.group_items, w.name, group_dir)
        stale = [sid for sid in existing if sid not in source_ids]
        if stale:
            ops.append(Ledger.op_drop_items(w.name, stale, w.on_delete, now))
    results = await ledger.write_many(ops)
    for p, result in zip(batch.planned, results, strict=False):
        if result == "failed":
            reason = p.error
            if reason is None:
                row = await ledger.call(ledger.sync.item_row, w.name, p.source_id)
                reason = row["last_error"] if row else None
            runner.log.error("item failed", item=p.key, source=p.source_id, reason=reason)
