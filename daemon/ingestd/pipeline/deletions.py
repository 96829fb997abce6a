"""Judging what a watch's listing no longer holds: items to forget or delete, group
items to plan again, sidecars whose items lose metadata, and the mass-deletion guard
(`max_delete`) that refuses a pass deleting too much at once (an unmounted disk)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ingestd.ledger import MEMBER, SIDECAR, Ledger
from ingestd.pipeline.work import PlanWork

if TYPE_CHECKING:
    from ingestd.pipeline.runner import WatchRunner


async def apply_gone(runner: WatchRunner, gone: list[str], *, full_pass: bool) -> None:
    """Record `gone` paths, unless the guard refuses them (a watch problem until the
    files are back or `max_delete` is raised). A full pass that got this far clears the
    watch's problem. While the ledger cannot be written this waits for it; on any other
    failure the paths go back to the runner's gone set for the next try."""
    while True:
        try:
            await _apply_gone(runner, gone, full_pass=full_pass)
            return
        except Exception as e:
            if not runner.ledger.is_unwritable(e):
                runner.gone.update(gone)
                raise
        await runner.ledger.wait_writable()


async def _apply_gone(runner: WatchRunner, gone: list[str], *, full_pass: bool) -> None:
    w = runner.watch
    ledger = runner.ledger
    now = time.time()
    membership = runner.planner.membership
    known = await ledger.call(ledger.sync.known_items, w.name, gone)
    # Items affected: single files, plus each group folder losing files.
    affected = {rel for rel, role in known if role != MEMBER}
    affected |= {membership(rel).group_dir or rel for rel, role in known if role == MEMBER}
    total = await ledger.call(ledger.sync.live_count, w.name)
    if affected and not w.max_delete.allows(len(affected), total):
        share = len(affected) / total if total else 1.0
        problem = (
            f"refused to delete {len(affected)} of {total} items ({share:.0%}) at once: more "
            f"than max_delete {w.max_delete}. Is the source folder mounted and complete? If "
            "the deletion is intended, raise max_delete for this watch and restart"
        )
        if await ledger.write(Ledger.op_set_problem(w.name, problem, now)):
            runner.log.error("mass deletion refused", deletions=len(affected), items=total)
        return
    if gone:
        replan = await ledger.write(Ledger.op_gone(w.name, gone, w.on_delete, now))
        if affected:
            runner.log.info("source files gone", items=len(affected), on_delete=w.on_delete)
        groups = {g for rel in replan[MEMBER] if (g := membership(rel).group_dir)}
        if groups or replan[SIDECAR]:
            runner.queue_plan(PlanWork(groups=groups, forced=True, sidecars_gone=replan[SIDECAR]))
        runner.on_planned()
    if full_pass and await ledger.write(Ledger.op_set_problem(w.name, None, now)):
        runner.log.info("watch healthy again")
