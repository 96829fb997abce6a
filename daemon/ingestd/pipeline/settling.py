"""When a listed file is complete, by the kind of source it comes from.

A source with change events (a local folder) is settled by our own observations: a
hinted file is stat'ed again `settle` seconds later and taken when unchanged
(sources/settle.py). A polled source (a bucket) is settled by its listings: an object is
taken when it is older than `settle`, or a later pass lists it unchanged
(sources/bucket_poll.PendingObjects). The runner talks to either through `Settling`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from ingestd.core.model import Entry
from ingestd.core.source import Source
from ingestd.sources.bucket_poll import PendingObjects
from ingestd.sources.objects import ObjectInfo
from ingestd.sources.settle import Settler


class Settling(Protocol):
    def offer(self, entries: list[Entry], pass_no: int) -> tuple[int, list[Entry]]:
        """Files a listing found new or changed: (how many of them are versions not
        seen before, those ready now). Files that become ready later go to the
        runner's `on_ready`."""
        ...

    def hint(self, relpath: str) -> bool:
        """Look at a path again (a change event, or the sync step saw it change)."""
        ...

    def end_pass(self, pass_no: int) -> None: ...

    async def room(self) -> None:
        """Wait until a listing pass may offer more (backpressure: a first pass of a
        million files must not be held here all at once)."""
        ...

    def pending_under(self, prefix: str) -> bool: ...

    def __contains__(self, relpath: str) -> bool: ...

    def __len__(self) -> int: ...

    async def run(self) -> None: ...


class ObservedSettling:
    """For sources with events: our own two observations `settle` apart."""

    def __init__(
        self,
        source: Source,
        settle: float,
        on_ready: Callable[[list[Entry]], None],
        on_gone: Callable[[list[str]], None],
        on_overflow: Callable[[], None],
        downstream: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settler = Settler(
            settle,
            source.stat_many,
            on_ready,
            on_gone,
            on_overflow=on_overflow,
            downstream=downstream,
        )

    def offer(self, entries: list[Entry], pass_no: int) -> tuple[int, list[Entry]]:
        hint = self.settler.hint
        return sum(hint(e.relpath, stat=(e.size, e.mtime_ns)) for e in entries), []

    def hint(self, relpath: str) -> bool:
        return self.settler.hint(relpath)

    def end_pass(self, pass_no: int) -> None:
        return None

    async def room(self) -> None:
        await self.settler.room()

    def pending_under(self, prefix: str) -> bool:
        return self.settler.pending_under(prefix)

    def __contains__(self, relpath: str) -> bool:
        return relpath in self.settler

    def __len__(self) -> int:
        return len(self.settler)

    async def run(self) -> None:
        await self.settler.run()


class ListedSettling:
    """For polled sources: old enough, or listed unchanged by a later pass."""

    def __init__(self, settle: float) -> None:
        self.pending = PendingObjects(settle)

    def offer(self, entries: list[Entry], pass_no: int) -> tuple[int, list[Entry]]:
        new = 0
        ready = []
        for e in entries:
            obj = ObjectInfo(e.relpath, e.size, e.etag or "", e.mtime_ns)
            # A version waiting to settle is listed again each poll: count it once.
            new += not self.pending.holds(obj)
            if self.pending.observe(obj, pass_no):
                ready.append(e)
        return new, ready

    def hint(self, relpath: str) -> bool:
        return False  # the next listing looks again

    def end_pass(self, pass_no: int) -> None:
        self.pending.end_pass(pass_no)

    async def room(self) -> None:
        return None  # what is ready is planned inside the pass, which waits for it

    def pending_under(self, prefix: str) -> bool:
        return self.pending.pending_under(prefix)

    def __contains__(self, relpath: str) -> bool:
        return relpath in self.pending

    def __len__(self) -> int:
        return len(self.pending)

    async def run(self) -> None:
        return None
