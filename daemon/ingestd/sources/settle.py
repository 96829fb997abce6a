"""Settle: hold a path until it is complete.

A path is ready when our own observations show its size and mtime unchanged for
`settle` seconds. Observations are ours (two stats `settle` apart), not the file's
mtime age, so a writer on a host with a skewed clock cannot fool it. Events only
schedule a look; a close-after-write shortens nothing. (Holding files between a
"created" and its close is not possible with watchdog: when a folder appears it
reports synthetic "created" events for files inside, whose close never comes.)
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from ingestd.core.model import Entry
from ingestd.core.source import Stat

StatMany = Callable[[Sequence[str]], list[Stat]]

# A listing pass waits while this many paths are held (`room`), so that a first pass of a
# million files never holds them all here: hints keep the headroom up to `max_pending`.
PASS_HOLD = 20_000


@dataclass(slots=True)
class _State:
    stat: Stat | bool  # False: not observed yet
    since: float
    due: float


class Settler:
    def __init__(
        self,
        settle: float,
        stat_many: StatMany,
        on_ready: Callable[[list[Entry]], None],
        on_gone: Callable[[list[str]], None],
        *,
        max_pending: int = 200_000,
        on_overflow: Callable[[], None] | None = None,
        downstream: Callable[[], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`downstream`: awaited before each batch is looked at, so that ready files
        wait here (stat'ed again later) while whoever takes them is full."""
        self.settle = settle
        self._stat_many = stat_many
        self._on_ready = on_ready
        self._on_gone = on_gone
        self._on_overflow = on_overflow
        self._max_pending = max_pending
        self._clock = clock
        self._state: dict[str, _State] = {}
        self._heap: list[tuple[float, str]] = []
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._downstream = downstream
        self.pass_hold = PASS_HOLD
        self.batch = 5000  # paths stat'ed at a time
        self.overflowed = False

    def __len__(self) -> int:
        return len(self._state)

    def __contains__(self, relpath: str) -> bool:
        return relpath in self._state

    def hint(self, relpath: str, *, stat: Stat | bool = False) -> bool:
        """Something may have changed at relpath. `stat` is a fresh observation when the
        caller already has one (a scan). True when the path was not held already, so the
        many events of one write and a scan that meets the same file count once."""
        now = self._clock()
        st = self._state.get(relpath)
        if st is None:
            if len(self._state) >= self._max_pending:
                # The backlog lives on disk: the next rescan finds what we drop here.
                if not self.overflowed:
                    self.overflowed = True
                    if self._on_overflow:
                        self._on_overflow()
                return False
            st = _State(stat=False, since=now, due=now)
            self._state[relpath] = st
            if stat is not False:
                st.stat = stat
                st.due = now + self.settle
            self._push(relpath, st, st.due)
            return True
        if stat is not False and stat != st.stat:
            st.stat, st.since = stat, now
            self._push(relpath, st, now + self.settle)
        elif stat is False and st.due > now:
            # Look again now: if our last look caught the writer mid-way (say, size 0
            # just after its open), waiting for the old due would cost a second settle.
            self._push(relpath, st, now)
        return False

    async def room(self) -> None:
        """Wait until fewer than `pass_hold` paths are held (a pass's backpressure)."""
        while len(self._state) >= self.pass_hold:
            self._drained.clear()
            await self._drained.wait()

    def pending_under(self, prefix: str) -> bool:
        """Is any path below `prefix` (ending in '/') still settling?"""
        return any(rel.startswith(prefix) for rel in self._state)

    def _push(self, relpath: str, st: _State, due: float) -> None:
        # Heap entries whose due no longer matches the state are skipped as stale.
        st.due = due
        heapq.heappush(self._heap, (due, relpath))
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wait_due()
            if self._downstream is not None:
                await self._downstream()
            batch = self.pop_due(self._clock(), self.batch)
            if batch:
                stats = await asyncio.to_thread(self._stat_many, batch)
                self.evaluate(batch, stats, self._clock())

    def pop_due(self, now: float, limit: int = 5000) -> list[str]:
        """The paths due for a look at `now` (each once)."""
        batch: list[str] = []
        while self._heap and self._heap[0][0] <= now and len(batch) < limit:
            due, relpath = heapq.heappop(self._heap)
            st = self._state.get(relpath)
            if st is not None and st.due == due:
                batch.append(relpath)
        return batch

    def evaluate(self, batch: list[str], stats: list[Stat], now: float) -> None:
        ready: list[Entry] = []
        gone: list[str] = []
        for relpath, stat in zip(batch, stats, strict=True):
            st = self._state.get(relpath)
            if st is None:
                continue
            if stat is None:
                del self._state[relpath]
                gone.append(relpath)
                continue
            if stat != st.stat:
                st.stat, st.since = stat, now
                if self.settle > 0:
                    self._push(relpath, st, now + max(self.settle, 0.05))
                    continue
            if now - st.since < self.settle:
                self._push(relpath, st, st.since + self.settle)
                continue
            del self._state[relpath]
            ready.append(Entry(relpath, stat[0], stat[1]))
        if not self._state and self.overflowed:
            self.overflowed = False
        if gone or ready:
            self._drained.set()
        if gone:
            self._on_gone(gone)
        if ready:
            self._on_ready(ready)

    async def _wait_due(self) -> None:
        while True:
            while self._heap:
                due, relpath = self._heap[0]
                st = self._state.get(relpath)
                if st is None or st.due != due:
                    heapq.heappop(self._heap)  # stale: superseded or forgotten
                    continue
                break
            if self._heap:
                delay = self._heap[0][0] - self._clock()
                if delay <= 0:
                    return
            else:
                delay = None
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                return
