"""A first pass over more files than settling and the plan queue may hold waits for
them (backpressure from planning back to the listing) instead of holding the whole
backlog in memory; every file still reaches the ledger. The bounds are made small here
so that a few thousand files go over them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from ingestd.config import Watch
from ingestd.ledger import AsyncLedger
from ingestd.pipeline.runner import WatchRunner
from ingestd.sources.local import LocalFolderSource

from tests.support.wait import wait_until

FILES = 4000
PER_DIR = 250
HOLD = 300  # paths settling may hold before a pass waits
QUEUED = 200  # files the plan queue may hold before the settler waits
BATCH = 100  # paths the settler looks at a time
CHUNK = 1000 + PER_DIR  # what the walk hands over at most at a time (local.py)


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[AsyncLedger]:
    lg = AsyncLedger(tmp_path / "state")
    await lg.open()
    yield lg
    await lg.close()


def make_tree(root: Path) -> None:
    for i in range(FILES):
        d = root / f"d{i // PER_DIR:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.bin").write_bytes(b"%05d" % i)


async def test_a_first_pass_waits_for_settling_and_planning(
    tmp_path: Path, ledger: AsyncLedger
) -> None:
    src = tmp_path / "src"
    make_tree(src)
    watch = Watch.model_validate({"name": "w", "source": str(src), "dataset": "ds", "settle": "0s"})
    # observe=False: as `ingestd sync` runs it (no file watcher, one pass).
    runner = WatchRunner(watch, ledger, lambda: None, source=LocalFolderSource(src), observe=False)
    settler = runner.settling.settler  # type: ignore[attr-defined]
    settler.pass_hold, settler.batch = HOLD, BATCH
    runner.plans.max_files = QUEUED
    most = {"settling": 0, "queued": 0}

    async def sample() -> None:
        while True:
            most["settling"] = max(most["settling"], len(runner.settling))
            most["queued"] = max(most["queued"], runner.plans.queued_files)
            await asyncio.sleep(0)

    sampler = asyncio.create_task(sample())
    try:
        await runner.start()

        async def all_planned() -> bool:
            counts = await ledger.call(ledger.sync.counts)
            return "w" in counts and counts["w"].pending == FILES

        await wait_until(all_planned, timeout=120)
    finally:
        sampler.cancel()
        await runner.stop()
    # Without backpressure settling takes the whole tree (4,000) from the pass at once.
    assert most["settling"] <= HOLD + CHUNK, most
    assert most["queued"] <= QUEUED + BATCH, most
    assert most["settling"] > 0 and most["queued"] > 0, most
