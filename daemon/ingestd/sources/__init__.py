"""Where a watch's files come from: each kind of source implements core.source.Source.

- local.py: a folder on this machine (watchdog hints, scandir walks, os reads);
- bucket_source.py: a bucket prefix, polled, over an ObjectStore (objects.py), which
  bucket.py implements for S3, GCS and Azure and objects.MemoryObjectStore in memory;
  queues/: the bucket's event notifications from SQS or an Azure Storage queue, as
  durable hints (Features.queue);
- settle.py: when a hinted local file is complete; bucket_poll.py: the listing diff and
  the settle rule of objects;
- mounts.py: the mount holding a folder (a network or FUSE file system inotify cannot
  see into); local_poll.py: whether a folder is polled, and which folders a polled pass
  may skip.
"""

from __future__ import annotations

from ingestd.config import Watch
from ingestd.core.source import Source


def open_source(watch: Watch) -> Source:
    """The source of one configured watch. Opening a bucket's client is deferred to its
    first use, so missing credentials are a watch problem, not a failed start. A folder
    is polled on a network or FUSE mount, or as `watch_mode` says (local_poll.py);
    `Features.mode_reason` says which and why."""
    if watch.bucket is not None:
        from ingestd.sources.bucket_poll import StoreHandle
        from ingestd.sources.bucket_source import BucketSource
        from ingestd.sources.queues import open_feed

        return BucketSource(
            StoreHandle(watch.bucket, watch.source_options),
            poll_interval=watch.poll_interval,
            feed=open_feed(watch),
        )
    from ingestd.sources.local import LocalFolderSource
    from ingestd.sources.local_poll import choose_mode

    return LocalFolderSource(
        watch.source,
        follow_symlinks=watch.follow_symlinks,
        mode=choose_mode(watch),
        rescan=watch.rescan,
    )
