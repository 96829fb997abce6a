"""A bucket watch runner fed by a queue double, on a ledger that may be shared: one
"daemon" of the queue tests (tests/unit/test_queue_*.py), without a process."""

from __future__ import annotations

from typing import Any

from ingestd.config import Watch
from ingestd.ledger import AsyncLedger, LedgerAt
from ingestd.pipeline.queue_hints import QueueHints
from ingestd.pipeline.runner import WatchRunner
from ingestd.sources.bucket_poll import StoreHandle
from ingestd.sources.bucket_source import BucketSource
from ingestd.sources.objects import MemoryObjectStore
from ingestd.sources.queues import QueueFeed

QUEUE_URL = "http://queue.invalid/1/q"


class QueueRunner:
    """Watch "b" on s3://bkt/pre with `queue` as its feed; `settings` add to the watch."""

    def __init__(self, at: LedgerAt, store: MemoryObjectStore, queue: Any, **settings: Any) -> None:
        watch = Watch.model_validate(
            {
                "name": "b",
                "source": "s3://bkt/pre",
                "dataset": "ds",
                "queue": {"url": QUEUE_URL},
                **settings,
            }
        )
        self.ledger = AsyncLedger(at)
        source = BucketSource(StoreHandle.of(store), watch.poll_interval, QueueFeed(queue, "b"))
        self.runner = WatchRunner(watch, self.ledger, lambda: None, source=source)

    @property
    def hints(self) -> QueueHints:
        assert self.runner.queue_hints is not None
        return self.runner.queue_hints
