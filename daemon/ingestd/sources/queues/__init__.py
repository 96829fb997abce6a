"""A bucket's event notifications read from a queue, as durable hints (docs/bucket-events.md).

- feed.py: `QueueFeed` (what the runner drives), `QueueError`; here: `open_feed(watch)`;
- messages.py: the message formats, pure: S3 event notifications (direct or in an SNS
  envelope) and Event Grid blob events;
- sqs.py: S3 → SQS, on boto3; azure_queue.py: Azure Blob → Event Grid → Storage queue.

A consumer hands each batch's hints to the runner's `record`, which commits them to the
ledger; only then are the messages deleted (at-least-once: a crash in between means the
messages come back and are recorded again, harmlessly).
"""

from __future__ import annotations

from ingestd.config import Watch
from ingestd.sources.queues.feed import QueueError, QueueFeed, RecordHints
from ingestd.sources.queues.messages import Hint

__all__ = ["Hint", "QueueError", "QueueFeed", "RecordHints", "open_feed"]


def open_feed(watch: Watch) -> QueueFeed | None:
    """The feed of a bucket watch with a `queue`, or None. Nothing connects here: the
    client is made on the first receive, so a bad queue is a watch problem."""
    if watch.queue is None or watch.bucket is None:
        return None
    if watch.queue_kind == "azure_queue":
        from ingestd.sources.queues.azure_queue import AzureQueue

        return QueueFeed(
            AzureQueue(watch.queue.url, watch.bucket, watch.source_options), watch.name
        )
    from ingestd.sources.queues.sqs import SqsQueue

    return QueueFeed(SqsQueue(watch.queue.url, watch.bucket, watch.source_options), watch.name)
