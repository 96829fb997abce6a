"""Waiting for a platform's async job (a Labelbox import task, a Nucleus append job):
poll with a growing interval until the job reaches *any* terminal state, or give up
after `timeout` with a RetriableError (the items are then sent again later, and the
platform's idempotent keys make that safe).

The platform's own words for states are mapped by the sink (`state_of`): every state
that is not "still running" ends the wait, so a CANCELED or an unknown state is never
polled for the whole timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ingestd.core.errors import RetriableError


class JobState(Enum):
    RUNNING = "running"
    DONE = "done"  # finished; its per-item errors may still name items
    FAILED = "failed"  # the job as a whole failed (the platform's trouble, or ours)
    CANCELED = "canceled"
    UNKNOWN = "unknown"  # a state this version of ingestd does not know: terminal


@dataclass(frozen=True, slots=True)
class JobEnd:
    state: JobState
    status: str  # the platform's own word, for messages
    body: Any  # the last answer, for the sink to read results or errors from
    polls: int


async def poll_job(
    fetch: Callable[[], Awaitable[Any]],
    state_of: Callable[[Any], tuple[JobState, str]],
    *,
    what: str,
    first: float = 0.05,
    most: float = 2.0,
    timeout: float = 900.0,
) -> JobEnd:
    """Call `fetch()` (one status request) until `state_of(answer)` is terminal. The
    first poll comes after `first` seconds, then each wait doubles up to `most`: small
    jobs end in one or two polls, long ones cost a poll every `most` seconds."""
    deadline = time.monotonic() + timeout
    wait = first
    polls = 0
    while True:
        await asyncio.sleep(wait)
        body = await fetch()
        polls += 1
        state, status = state_of(body)
        if state is not JobState.RUNNING:
            return JobEnd(state, status, body, polls)
        if time.monotonic() + wait > deadline:
            raise RetriableError(
                f"{what}: still {status or 'running'} after {timeout:.0f} s; sent again later"
            )
        wait = min(most, wait * 2)
