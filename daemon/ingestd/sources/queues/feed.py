"""A bucket watch's queue as a feed of hints: receive, parse, record, then delete.

`QueueFeed.run(record, report)` is the one loop every queue kind shares. The order is
the guarantee: a batch's hints go to `record` (the runner commits them to the ledger's
`hints` table) and only when that returns are the batch's messages deleted. A crash or
a failed delete in between leaves the messages in the queue; they come back after the
queue's visibility timeout and are recorded again, which is harmless (a hint only says
"look at this key"; the ledger decides by ETag). A failed receive or delete is reported
as the watch's problem through `report`, in words naming the queue and the fix, and
retried with backoff; `report(None)` when receiving works again.

Receives in flight: one while the queue is quiet, up to RECEIVERS while it has a backlog
(a receive came back full). A queue consumed one receive at a time falls behind a busy
bucket: each round is a receive, a ledger commit and a delete, one after the other. And
a queue that grows gets slower to read on some servers (moto's SQS scans the whole queue
on every receive and on every delete: 20,000 objects took 1,063 s in
tests/e2e/test_many_daemons.py with one receive at a time), so falling behind feeds on
itself. Each receiver records and deletes its own batch as soon as it has it; SQS and
Storage queues hand concurrent receivers different messages. The extra receivers go
back to waiting as soon as one of them gets less than a full batch, so a quiet queue
costs one long poll at a time.

`drained_at`: when the last receive that came back empty began (wall time). The
queue's judge (pipeline/queue_hints.py) reads it: every message sent before then had
been handed to some receiver, so a key still unnamed some time later was not merely
late.
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
RECEIVERS = 4  # receives in flight per watch while the queue has a backlog


class QueueError(SourceError):
    """A named failure of the queue (kinds as SourceError's: credentials, denied,
    not_found for a queue that does not exist, unreachable, other)."""


class QueueClient(Protocol):
    """One cloud's queue: what QueueFeed needs of it."""

    url: str
    describe: str  # e.g. "S3 event notifications from <url>"
    batch: int  # the most messages one receive returns: a full one means more wait

    async def receive(self) -> list[tuple[Any, str]]:
        """Up to a batch of (receipt, body); may wait (long polling) when empty."""
        ...

    async def delete(self, receipts: list[Any]) -> None: ...

    def parse(self, body: str) -> Parsed: ...

    async def close(self) -> None: ...


class QueueFeed:
    def __init__(self, client: QueueClient, watch: str, receivers: int = RECEIVERS) -> None:
        self.client = client
        self.url = client.url
        self.describe = client.describe
        self.log = log.bind(watch=watch, queue=client.url)
        self.receivers = max(1, receivers)
        self.started_at = time.time()
        self.messages = 0  # received since the start
        self.test_events = 0
        self.last_message_at: float | None = None
        self.drained_at: float | None = None  # a receive came back empty (wall time)
        self.problem: str | None = None
        self._failures = 0
        self._failed_at = 0.0  # monotonic: only a receive started later clears a problem
        self._backlog = asyncio.Event()  # set: the extra receivers run

    async def run(self, record: RecordHints, report: Report) -> None:
        async with asyncio.TaskGroup() as group:
            for n in range(self.receivers):
                group.create_task(self._receive_loop(n, record, report))

    async def _receive_loop(self, n: int, record: RecordHints, report: Report) -> None:
        """Receiver 0 always runs (and alone probes a failing queue, with backoff); the
        others only while the queue has a backlog."""
        while True:
            if n:
                await self._backlog.wait()
            started = time.monotonic()
            try:
                got = await self._once(record)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._backlog.clear()
                self._failures += 1
                self._failed_at = time.monotonic()
                delay = full_jitter(self._failures, BACKOFF_BASE, BACKOFF_CAP)
                delay = max(BACKOFF_BASE, delay)
                problem = self._problem_of(e, delay)
                if problem != self.problem:
                    self.log.error("queue failed; retried with backoff", problem=problem)
                self.problem = problem
                await report(problem)
                await asyncio.sleep(delay)
                continue
            if got >= self.client.batch:
                self._backlog.set()
            elif n:
                self._backlog.clear()
            if (self._failures or self.problem) and started > self._failed_at:
                self._failures = 0
                self.problem = None
                self.log.info("queue works again")
                await report(None)

    async def _once(self, record: RecordHints) -> int:
        began = time.time()
        batch = await self.client.receive()
        if not batch:
            # Its start, not its end: a storage queue's receive does not wait, so only
            # at the start is the queue known to have held nothing visible.
            self.drained_at = max(self.drained_at or 0.0, began)
            return 0
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
        return len(batch)

    def _problem_of(self, e: Exception, delay: float) -> str:
        if isinstance(e, SourceError):
            return f"queue {e.kind}: {e.message}; retried in {delay:.0f}s"
        return f"queue other: {self.url}: {type(e).__name__}: {e}; retried in {delay:.0f}s"

    async def close(self) -> None:
        await self.client.close()


def queue_error(kind: ErrorKind, url: str, what: str, fix: str, detail: str) -> QueueError:
    return QueueError(kind, f"{url}: {what}; {fix} ({detail})")
