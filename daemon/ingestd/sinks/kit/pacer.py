"""The request budget of one API key, shared by every request of a sink (rclone's
`pacer`): a token bucket of `per_minute` requests, and a pause for *every* caller when
the platform answers 429 with Retry-After, so that one throttled request does not leave
the other workers to hit the same wall."""

from __future__ import annotations

import asyncio
import email.utils
import time
from datetime import UTC


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP dates are GMT; a naive parse means the zone was missing
        when = when.replace(tzinfo=UTC)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


class Pacer:
    """At most `per_minute` requests a minute in bursts of up to `burst` (None: no
    limit), served in arrival order; `hold(seconds)` makes every request wait that long."""

    def __init__(self, per_minute: int | None, burst: int | None = None) -> None:
        self.rate = None if not per_minute else per_minute / 60.0
        self.capacity = float(burst if burst is not None else max(1, (per_minute or 20) // 20))
        self.tokens = self.capacity
        self.updated = time.monotonic()
        self.paused_until = 0.0
        self.sent = 0  # requests let through: requests per item is throughput
        self._lock = asyncio.Lock()

    def hold(self, seconds: float) -> None:
        """The platform asked everyone to wait (429 with Retry-After)."""
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                if now < self.paused_until:
                    await asyncio.sleep(self.paused_until - now)
                    continue
                if self.rate is None:
                    break
                self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    break
                await asyncio.sleep((1.0 - self.tokens) / self.rate)
        self.sent += 1
