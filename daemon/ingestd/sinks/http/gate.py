"""Whether the ingestion server takes connections at all, shared by every request of
one sink: the kit ApiClient's Gate (sinks/kit/client.py) for the http sink.

A request that cannot connect marks the server down (one warning). While it is down,
requests do not connect on their own: one of them at a time, the probe, may try once
the shared backoff allows it, and the rest wait for its news; a probe that fails
counts as a failed attempt for every waiter, which then backs off by its own retry
rule (and gives up to the ledger when its attempts run out). N workers then cost one
connection attempt per backoff step, not N. The first answer of any kind marks the
server up again (one info line with how long it was down).

Once the sink is closed, every attempt ends at the gate (a retry must not open a new
connection pool behind a closed sink).

A certificate problem (tls.py: the reason starts with "TLS: ") is an outage too: it
lasts until someone fixes a certificate or the config, so one probe at a time (at most
5 s apart) tells when, and nothing else is sent meanwhile. Requests do not wait for
the probe's news, though: they fail at once, and the sink hands the item back to the
sync pool as held for condition "tls" (not an attempt), which re-sends one item a
second. `problem` is what status shows.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import structlog

from ingestd.core.errors import RetriableError

log = structlog.get_logger("ingestd.sink.http")

TLS_PREFIX = "TLS: "  # how a certificate problem's reason starts (tls.TLS)
TLS_PROBE_CAP = 5.0  # seconds between probes at most during a certificate problem


class OutageGate:
    """`backoff()` gives the current (base, cap) of the retry rule: the probes are
    spaced by the same exponential steps, so they follow the sink's tuning."""

    def __init__(self, where: str, backoff: Callable[[], tuple[float, float]]) -> None:
        self.where = where
        self._backoff = backoff
        self.down = False
        self.reason = ""
        self._since = 0.0
        self._failures = 0  # failed probes in this outage
        self._next_probe = 0.0
        self._probe: asyncio.Task[object] | None = None
        self._news = asyncio.Event()
        self.closed = False

    def close(self) -> None:
        self.closed = True
        news, self._news = self._news, asyncio.Event()
        news.set()

    @property
    def tls(self) -> bool:
        """The server cannot be reached because of a TLS (certificate) problem."""
        return self.down and self.reason.startswith(TLS_PREFIX)

    @property
    def problem(self) -> str | None:
        """The outage in words while there is one (for status), else None."""
        if not self.down:
            return None
        if self.tls:
            return f"{self.reason} (ingestion server {self.where})"
        return self._refusal()

    def _refusal(self) -> str:
        return f"ingestion server {self.where} unreachable ({self.reason})"

    async def admit(self) -> str | None:
        if self.closed:
            raise RetriableError("the http sink is closed")
        if not self.down:
            return None
        loop = asyncio.get_running_loop()
        while self.down and not self.closed:
            now = loop.time()
            if self._probe is None and now >= self._next_probe:
                self._probe = asyncio.current_task()
                return None
            if self.tls:
                # No waiting out a certificate problem here: the item goes back to the
                # sync pool at once (condition "tls"), which holds every item and sends
                # one a second; only a probe slot here makes a handshake. Waiting would
                # keep a retired sink's items (a reload that fixed the config) for
                # minutes.
                raise RetriableError(self.reason)
            news = self._news
            # With a probe under way only its result can help; otherwise the next probe
            # slot may be ours.
            wait = None if self._probe is not None else self._next_probe - now
            try:
                await asyncio.wait_for(news.wait(), wait)
            except TimeoutError:
                continue
            if self.down:
                return self._refusal()
        if self.closed:
            raise RetriableError("the http sink is closed")
        return None

    def after(self, reached: bool | None, reason: str) -> None:
        probe = self._probe is not None and self._probe is asyncio.current_task()
        if probe:
            self._probe = None
        if reached is True:
            self._reached()
        elif reached is False:
            self._unreachable(reason, probe)
        if probe or reached is True:
            # Wake the waiters; each later wait gets a fresh event.
            news, self._news = self._news, asyncio.Event()
            news.set()

    def _reached(self) -> None:
        if not self.down:
            return
        down_for = time.monotonic() - self._since
        self.down = False
        self._failures = 0
        log.info("ingestion server reachable again", url=self.where, down_for=round(down_for, 1))

    def _unreachable(self, reason: str, probe: bool) -> None:
        tls = reason.startswith(TLS_PREFIX)
        # One warning an outage, and one more when a certificate problem replaces
        # another cause (e.g. the server came back with an expired certificate).
        news = not self.down or (tls and reason != self.reason)
        self.reason = reason
        if news:
            what = "TLS problem" if tls else "unreachable"
            log.warning(f"ingestion server {what}", url=self.where, reason=reason)
        if not self.down:
            self.down = True
            self._since = time.monotonic()
            self._failures = 1
        elif probe:
            # Failed probes only: requests already under way when the outage began
            # must not push the next probe minutes away.
            self._failures += 1
        base, cap = self._backoff()
        if tls:
            # A handshake is cheap and the fix (a renewed certificate) is noticed only
            # by a probe: not minutes apart.
            cap = min(cap, TLS_PROBE_CAP)
        step = min(cap, base * 2 ** min(self._failures, 30))
        self._next_probe = asyncio.get_running_loop().time() + random.uniform(step / 2, step)
