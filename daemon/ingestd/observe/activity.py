"""What the dashboard shows about recent activity, fed from sync outcomes: kept in
memory because sorting the ledger by time on every refresh would read all of it."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ingestd.pipeline.outcome import Outcome

RECENT_MAX = 500  # recent items remembered for the dashboard
RATE_WINDOW = 60  # seconds


class Activity:
    """Per watch: outcomes per second over the last minute and the last activity; and
    the most recently finished items, most recent last."""

    def __init__(self) -> None:
        self.recent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._buckets: dict[str, deque[list[int]]] = {}  # [second, synced, failed]
        self.last: dict[str, float] = {}

    def outcome(self, o: Outcome, now: float | None = None) -> None:
        if o.result in ("abandoned", "changed"):
            return  # nothing happened to the item yet
        now = time.time() if now is None else now
        c = o.claim
        self.last[c.watch] = now
        k = (c.watch, c.source_id)
        self.recent[k] = None
        self.recent.move_to_end(k)
        while len(self.recent) > RECENT_MAX:
            self.recent.popitem(last=False)
        sec = int(now)
        buckets = self._buckets.setdefault(c.watch, deque(maxlen=RATE_WINDOW))
        if not buckets or buckets[-1][0] != sec:
            buckets.append([sec, 0, 0])
        if o.result in ("synced", "unchanged", "deleted"):
            buckets[-1][1] += 1
        elif o.result == "failed":
            buckets[-1][2] += 1

    def seed(self, keys: list[tuple[str, str]]) -> None:
        """Oldest first: items finished before this run, shown until new ones come."""
        for k in keys:
            if k not in self.recent:
                self.recent[k] = None
                self.recent.move_to_end(k, last=False)

    def last_minute(self, watch: str, now: float | None = None) -> tuple[int, int]:
        """(items synced, items failed) in the last minute."""
        now = time.time() if now is None else now
        since = int(now) - RATE_WINDOW
        synced = failed = 0
        for sec, s, f in self._buckets.get(watch, ()):
            if sec > since:
                synced += s
                failed += f
        return synced, failed
