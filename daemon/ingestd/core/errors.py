"""Failure kinds that cross layers: the sync step decides what to do by their class."""

from __future__ import annotations


class SyncError(Exception):
    """Base of errors a sink or the prepare step raises about one item."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# RetriableError.condition: a state of the whole sink or spool, not of the item, that a
# probe of one item tells the end of (the sync pool holds, then wakes all at once).
SPACE = "space"  # out of disk space (ENOSPC, EDQUOT, HTTP 507)


class RetriableError(SyncError):
    """Try again later: network trouble, 429, 5xx, a busy disk. `condition` (e.g.
    SPACE) when the cause is the sink's, shared by every item, not this item's."""

    def __init__(
        self, reason: str, retry_after: float | None = None, *, condition: str | None = None
    ) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.condition = condition


class PermanentError(SyncError):
    """Will fail the same way until the input changes or an operator runs `ingestd retry`."""


class SourceChangedError(SyncError):
    """The file changed while it was read: the half-read version is discarded and the
    item waits for the file to settle again. Not counted as a failed attempt."""


class MediaError(PermanentError):
    """A file's content cannot be used as its type says (corrupt image, unreadable video,
    not DICOM). The reason names the file and what is wrong with it."""


class Abandoned(Exception):
    """The daemon is stopping and gave up this work between chunks; the item stays
    pending in the ledger and is redone on the next start."""


class LeaseLost(Abandoned):
    """With a shared ledger: the item's lease ran out while this daemon stalled and
    another daemon claimed it, so this one does not send it (pipeline/leases.py)."""
