"""The one-pass forms of the daemon: `ingestd sync` (sync everything once, print a
summary per watch, exit non-zero unless all is in step) and `ingestd sync --dry-run`
(say what a sync would do, change nothing)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ingestd.config import Config
from ingestd.ledger import AsyncLedger, LedgerAt, WatchCounts
from ingestd.observe.status import ledger_at
from ingestd.pipeline.dry_run import dry_run_watch
from ingestd.pipeline.runner import make_runner
from ingestd.runtime.app import App
from ingestd.runtime.progress import Progress
from ingestd.runtime.service import PidLock

# The pass stops waiting for pending items once each has made this many attempts: they
# stay pending in the ledger, and the pass exits non-zero.
ONE_PASS_MAX_ATTEMPTS = 5


async def sync_once(app: App, progress: Progress) -> int:
    """Sync the app's config once; 0 when every watch is in step, 1 otherwise."""
    lock = PidLock(app.config.state_dir)
    lock.acquire()
    try:
        await app.open(observe=False, on_outcome=progress.outcome)
        assert app.pool is not None
        pool_task = asyncio.create_task(app.pool.run(poll=0.2))
        try:
            names = await _until_settled(app, progress)
            counts = await app.ledger.call(app.ledger.sync.counts)
            problems = await app.ledger.call(app.ledger.sync.watch_problems)
        finally:
            await app.close()
            pool_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pool_task
        progress.end()
        return _report(names, counts, problems)
    finally:
        lock.release()


async def _until_settled(app: App, progress: Progress) -> list[str]:
    """Scan every watch, then wait until nothing is in flight and every pending item
    has used up its one-pass attempts (or none is left). Returns the watch names."""
    assert app.pool is not None
    await asyncio.gather(*(r.start() for r in app.runners.values()))
    while any(r.busy for r in app.runners.values()):
        await asyncio.sleep(0.05)
    names = [w.name for w in app.config.watches]
    progress.begin(names)
    while True:
        per_watch = await app.ledger.call(
            app.ledger.sync.pending_state, names, ONE_PASS_MAX_ATTEMPTS
        )
        progress.tick({n: p for n, (p, _) in per_watch.items()})
        pending = sum(p for p, _ in per_watch.values())
        stuck = sum(s for _, s in per_watch.values())
        if app.pool.inflight == 0 and (pending == 0 or pending == stuck):
            return names
        await asyncio.sleep(0.05)


def _report(
    names: list[str], counts: Mapping[str, WatchCounts], problems: Mapping[str, str]
) -> int:
    """Print each watch's counts and problems to stderr; the exit code of the pass."""
    failed = sum(counts[n].failed for n in names if n in counts)
    left = sum(counts[n].pending for n in names if n in counts)
    for n in names:
        c = counts.get(n)
        if c is not None:
            print(
                f"{n}: {c.synced} synced, {c.pending} pending, {c.failed} failed",
                file=sys.stderr,
            )
    # A watch that could not be listed, or whose deletions were refused, is not in
    # step even when none of its known items failed.
    troubled = {n: problems[n] for n in names if n in problems}
    for n, problem in troubled.items():
        print(f"{n}: {problem}", file=sys.stderr)
    return 1 if failed or left or troubled else 0


async def dry_run(config: Config) -> list[str]:
    """What a sync would create, update or delete; changes nothing. Compares with the
    configured ledger (a shared PostgreSQL one, or state_dir's SQLite file); without a
    SQLite ledger yet, with an empty one in a temporary folder."""
    at = ledger_at(config)
    with tempfile.TemporaryDirectory(prefix="ingestd-dry-") as tmp:
        if not at.exists():
            at = LedgerAt(Path(tmp))
        ledger = AsyncLedger(at)
        await ledger.open()
        lines: list[str] = []
        try:
            for w in config.watches:
                runner = make_runner(w, ledger, lambda: None, observe=False)
                try:
                    lines += await dry_run_watch(runner, ledger)
                finally:
                    await runner.stop()
        finally:
            await ledger.close()
        return lines
