"""Where a watch's files come from: each kind of source implements core.source.Source.

- local.py: a folder on this machine (watchdog hints, scandir walks, os reads);
- bucket_source.py: a bucket prefix, polled, over an ObjectStore (objects.py), which
  bucket.py implements for S3, GCS and Azure and objects.MemoryObjectStore in memory;
- settle.py: when a hinted local file is complete; bucket_poll.py: the listing diff and
  the settle rule of objects.
"""

from __future__ import annotations

from ingestd.config import Watch
from ingestd.core.source import Source


def open_source(watch: Watch) -> Source:
    """The source of one configured watch. Opening a bucket's client is deferred to its
    first use, so missing credentials are a watch problem, not a failed start."""
    if watch.bucket is not None:
        from ingestd.sources.bucket_poll import StoreHandle
        from ingestd.sources.bucket_source import BucketSource

        return BucketSource(StoreHandle(watch.bucket, watch.source_options))
    from ingestd.sources.local import LocalFolderSource

    return LocalFolderSource(watch.source, follow_symlinks=watch.follow_symlinks)
