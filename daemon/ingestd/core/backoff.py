"""Exponential backoff with full jitter, shared by the sync step and the sinks.

At the bottom of the import graph (like model.py and errors.py) so that sinks, which
never import the sync step, use the same rule."""

from __future__ import annotations

import random


def full_jitter(failures: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Uniform in [0, min(cap, base·2^failures)] (AWS architecture blog), and never less
    than a server's Retry-After."""
    delay = random.uniform(0, min(cap, base * 2 ** min(failures, 30)))
    return delay if retry_after is None else max(delay, retry_after)
