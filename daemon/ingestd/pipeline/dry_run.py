"""`ingestd sync --dry-run` for one watch: what a sync would create, update, delete or
forget, from one listing compared with the ledger. Records nothing."""

from __future__ import annotations

import asyncio

from ingestd.core.model import Entry
from ingestd.core.source import SourceError
from ingestd.ledger import DELETED, ITEM, AsyncLedger
from ingestd.pipeline.runner import WatchRunner


async def dry_run_watch(runner: WatchRunner, ledger: AsyncLedger) -> list[str]:
    w = runner.watch
    try:
        found, gone = await _listing(runner)
    except SourceError as e:
        return [f"error   {w.name}: {e.message}"]
    loose: list[Entry] = []
    groups: set[str] = set()
    for e in found:
        m = runner.planner.membership(e.relpath)
        if m.kind == "loose":
            loose.append(e)
        elif m.kind in ("member", "marker") and m.group_dir is not None:
            groups.add(m.group_dir)
    batch = await asyncio.to_thread(runner.planner.plan, loose, groups)
    lines = []
    for p in batch.planned:
        if p.plan is None:
            if p.error:
                lines.append(f"fail    {w.name} {p.source_id}: {p.error}")
            continue
        row = await ledger.call(ledger.sync.item_row, w.name, p.plan.source_id)
        if row is None or row["status"] == DELETED or row["synced_manifest"] is None:
            lines.append(f"create  {w.dataset} {p.plan.key}")
        elif row["desired_fp"] != p.plan.fingerprint or row["status"] == "pending":
            lines.append(f"update  {w.dataset} {p.plan.key}")
    known = await ledger.call(ledger.sync.known_items, w.name, sorted(gone))
    total = await ledger.call(ledger.sync.live_count, w.name)
    gone_items = [rel for rel, role in known if role == ITEM]
    if known and not w.max_delete.allows(len(known), total):
        lines.append(
            f"refuse  {w.name}: would delete {len(known)} of {total} items (max_delete {w.max_delete})"
        )
    else:
        for rel in gone_items:
            row = await ledger.call(ledger.sync.item_row, w.name, rel)
            key = row["key"] if row else rel
            verb = "delete " if w.on_delete == "delete" else "forget "
            lines.append(f"{verb} {w.dataset} {key}")
    return lines


async def _listing(runner: WatchRunner) -> tuple[list[Entry], list[str]]:
    """(every file listed, gone paths) of one pass, settled or not. Every file, not only
    changed ones: an edit of the item settings changes items whose files did not."""
    found: list[Entry] = []
    gone: list[str] = []
    async for batch in runner.source.changes("", runner.known, runner.takes, everything=True):
        found += batch.changed
        gone += batch.gone
    return found, gone
