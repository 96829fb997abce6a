"""What the sync step knows about one watch: where its items are read and how they go."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ingestd.config import Watch
from ingestd.media.transform import MediaSettings
from ingestd.sources.bucket_poll import StoreHandle

Transfer = Literal["copy", "register"]


@dataclass(frozen=True, slots=True)
class WatchSide:
    """What a worker needs to know about the watch an item came from."""

    root: str  # a folder, or the bucket URL
    settle: float
    follow_symlinks: bool
    media: MediaSettings | None = None  # None: send files as they are
    store: StoreHandle | None = None  # bucket watches: where the objects are read
    # Bucket watches: None follows the sink (register where it takes remote URLs).
    transfer: Transfer | None = None
    on_delete: Literal["keep", "delete"] = "keep"  # also for an item an edit moved

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()


def side_for(watch: Watch, deid_key: bytes | None) -> WatchSide:
    """What the workers need to know about one configured watch."""
    media = MediaSettings(
        watch.images, watch.video, watch.dicom, deid_key if watch.dicom.deidentify else None
    )
    url = watch.bucket
    if url is None:
        return WatchSide(
            watch.source, watch.settle, watch.follow_symlinks, media, on_delete=watch.on_delete
        )
    store = StoreHandle(url, watch.source_options)
    return WatchSide(
        str(url), watch.settle, False, media, store, watch.transfer, on_delete=watch.on_delete
    )
