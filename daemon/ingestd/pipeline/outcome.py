"""What became of an item the sync step worked on, and the ledger op that records it.

An exception raised while preparing or sending an item is classified here: a source
that changed waits for it to settle, a transient failure backs off, a rejection fails
the item, anything else is a bug in the sync step (kept, backed off, logged loudly).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import structlog

from ingestd.core.backoff import full_jitter
from ingestd.core.errors import (
    Abandoned,
    MediaError,
    PermanentError,
    RetriableError,
    SourceChangedError,
)
from ingestd.ledger import Claim, Ledger, LedgerOp
from ingestd.ledger.ops import op_retry_held

log = structlog.get_logger("ingestd.sync")

BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
# An item that failed for a sink condition (out of space) is due again this soon: the
# pool sends one such item a second as the probe, and wakes the rest when it succeeds.
HELD_RETRY = 1.0


def backoff_delay(attempts: int, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter, capped, honouring a server's Retry-After."""
    honoured = None if retry_after is None else min(retry_after, 3600.0)
    return max(full_jitter(attempts, BACKOFF_BASE, BACKOFF_CAP, honoured), 0.1)


@dataclass(frozen=True, slots=True)
class Outcome:
    claim: Claim
    result: str  # synced | unchanged | deleted | retry | failed | changed | abandoned
    bytes: int = 0
    error: str | None = None
    condition: str | None = None  # RetriableError.condition of the failure


class Conflict(PermanentError):
    """The item's key is another source's (recorded as a "conflict" failure)."""


def retry_op(claim: Claim, reason: str | None, delay: float, *, count: bool) -> LedgerOp:
    now = time.time()
    return Ledger.op_retry_later(claim, reason, now + delay, count_attempt=count, now=now)


def abandoned(claim: Claim) -> tuple[Outcome, LedgerOp]:
    """Left for later, untouched and not counted as an attempt (a removed watch, a
    shutdown): the item is due again at once."""
    return Outcome(claim, "abandoned"), retry_op(claim, None, 0.0, count=False)


def crashed(claim: Claim, e: Exception) -> tuple[Outcome, LedgerOp]:
    """A bug in the sync step: keep the item, back off, say so loudly."""
    log.error(
        "sync step crashed",
        watch=claim.watch,
        item=claim.key,
        exc_info=(type(e), e, e.__traceback__),
    )
    reason = f"internal error: {type(e).__name__}: {e}"
    op = retry_op(claim, reason, backoff_delay(claim.attempts), count=True)
    return Outcome(claim, "retry", error=reason), op


def failed(
    claim: Claim,
    e: Exception,
    *,
    settle: float,
    sink_reachable: bool,
    stopping: threading.Event,
    bound: structlog.typing.FilteringBoundLogger | None = None,
) -> tuple[Outcome, LedgerOp]:
    """The outcome of an item whose sync step raised `e`, and the op recording it.
    `settle` is its watch's; `stopping` is set once the pool gives up on its work."""
    if bound is None:
        bound = log.bind(watch=claim.watch, item=claim.key)
    if isinstance(e, SourceChangedError):
        # Not an attempt: the file is still moving. The source re-plans it once it
        # settles; the retry here is a backstop in case no event arrives.
        bound.info("file changed while syncing; waiting for it to settle", reason=e.reason)
        op = retry_op(claim, None, settle + 1.0, count=False)
        return Outcome(claim, "changed", error=e.reason), op
    if isinstance(e, Abandoned):
        return abandoned(claim)
    if isinstance(e, RetriableError) and e.condition is not None:
        # The pool says so once for all items (SyncPool.problem); not an attempt.
        bound.debug("sync held", reason=e.reason, condition=e.condition)
        now = time.time()
        op = op_retry_held(claim, e.reason, e.condition, now + HELD_RETRY, now)
        return Outcome(claim, "retry", error=e.reason, condition=e.condition), op
    if isinstance(e, RetriableError):
        delay = backoff_delay(claim.attempts, e.retry_after)
        # During an outage the sink logs it once; one line per item would flood.
        emit = bound.warning if sink_reachable else bound.debug
        emit("sync failed, will retry", reason=e.reason, retry_in=round(delay, 1))
        return Outcome(claim, "retry", error=e.reason), retry_op(claim, e.reason, delay, count=True)
    if isinstance(e, PermanentError):
        if isinstance(e, MediaError) and stopping.is_set():
            return abandoned(claim)
        kind = (
            "conflict"
            if isinstance(e, Conflict)
            else "media"
            if isinstance(e, MediaError)
            else "sink"
        )
        bound.error("item failed", reason=e.reason)
        return Outcome(claim, "failed", error=e.reason), Ledger.op_failed(
            claim, e.reason, kind, time.time()
        )
    return crashed(claim, e)
