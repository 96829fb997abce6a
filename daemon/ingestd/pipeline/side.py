"""What the sync step knows about one watch: where its items are read and how they go."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ingestd.core.source import Source
from ingestd.media.transform import MediaSettings

Transfer = Literal["copy", "register"]


@dataclass(frozen=True, slots=True)
class WatchSide:
    """What a worker needs to know about the watch an item came from."""

    # Where the items' files are read: the side's own source, handed in by whoever
    # opened it (the runtime), closed with the side.
    source: Source
    settle: float
    follow_symlinks: bool
    media: MediaSettings | None = None  # None: send files as they are
    # Sources without local paths: None follows the sink (register where it takes
    # remote URLs).
    transfer: Transfer | None = None
    on_delete: Literal["keep", "delete"] = "keep"  # also for an item an edit moved

    async def close(self) -> None:
        await self.source.close()
