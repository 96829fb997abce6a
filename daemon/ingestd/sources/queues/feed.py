"""A bucket watch's queue as a feed of hints: receive, parse, record, then delete.

`QueueFeed.run(record, report)` is the one loop every queue kind shares. The order is
the guarantee: a batch's hints go to `record` (the runner commits them to the ledger's
`hints` table) and only when that returns are the batch's messages deleted. A crash or
a failed delete in between leaves the messages in the queue; they come back after the
queue's visibility timeout and are recorded again, which is harmless (a hint only says
"look at this key"; the ledger decides by ETag). A failed receive or delete is reported
as the watch's problem through `report`, in words naming the queue and the fix, and
retried with backoff; `report(None)` when receiving works again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog

from ingestd.core.backoff import full_jitter
from ingestd.core.source import ErrorKind, SourceError
from ingestd.sources.queues.messages import Hint, NotAnEvent, Parsed

log = structlog.get_logger("ingestd.queue")

RecordHints = Callable[[list[Hint]], Awaitable[None]]
Report = Callable[[str | None], Awaitable[None]]

BACKOFF_BASE = 1.0  # seconds after a failed receive, doubling (jittered)...
BACKOFF_CAP = 60.0  # ...up to this


class QueueError(SourceError):
    """A named failure of the queue (kinds as SourceError's: credentials, denied,
    not_found for a queue that does not exist, unreachable, other)."""


class QueueClient(Protocol):
    """One cloud's queue: what QueueFeed needs of it."""

    url: str
    describe: str  # e.g. "S3 event notifications from <url>"

    async def receive(self) -> list[tuple[Any, str]]:
        """Up to a batch of (receipt, body); may wait (long polling) when empty."""
        ...

    async def delete(self, receipts: list[Any]) -> None: ...

    def parse(self, body: str) -> Parsed: ...

    async def close(self) -> None: ...


class QueueFeed:
    def __init__(self, client: QueueClient, watch: str) -> None:
        self.client = client
        self.url = client.url
        self.describe = client.describe
        self.log = log.bind(watch=watch, queue=client.url)
        self.started_at = time.time()
        self.messages = 0  # received since the start
        self.test_events = 0
        self.last_message_at: float | None = None
        self.problem: str | None = None

    async def run(self, record: RecordHints, report: Report) -> None:
        failures = 0
        while True:
            try:
                await self._once(record)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failures += 1
                delay = max(BACKOFF_BASE, full_jitter(failures, BACKOFF_BASE, BACKOFF_CAP))
                problem = self._problem_of(e, delay)
                if problem != self.problem:
                    self.log.error("queue failed; retried with backoff", problem=problem)
                self.problem = problem
                await report(problem)
                await asyncio.sleep(delay)
                continue
            if failures or self.problem:
                failures = 0
                self.problem = None
                self.log.info("queue works again")
                await report(None)

    async def _once(self, record: RecordHints) -> None:
        batch = await self.client.receive()
        if not batch:
            return
        self.messages += len(batch)
        self.last_message_at = time.time()
        hints: list[Hint] = []
        for _, body in batch:
            try:
                parsed = self.client.parse(body)
            except NotAnEvent as e:
                self.log.warning("message is no bucket event; deleting it", reason=str(e))
                continue
            self.test_events += parsed.test_event
            hints += parsed.hints
        if hints:
            await record(hints)  # committed to the ledger when this returns
        await self.client.delete([receipt for receipt, _ in batch])
        self.log.debug("messages taken", messages=len(batch), hints=len(hints))

    def _problem_of(self, e: Exception, delay: float) -> str:
        if isinstance(e, SourceError):
            return f"queue {e.kind}: {e.message}; retried in {delay:.0f}s"
        return f"queue other: {self.url}: {type(e).__name__}: {e}; retried in {delay:.0f}s"

    async def close(self) -> None:
        await self.client.close()


def queue_error(kind: ErrorKind, url: str, what: str, fix: str, detail: str) -> QueueError:
    return QueueError(kind, f"{url}: {what}; {fix} ({detail})")
