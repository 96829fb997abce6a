"""What the three platform sinks (V7 Darwin, Labelbox, Scale Nucleus) share: a request
budget per API key, and one way to send a request with our own retries.

The platforms' SDKs retry too little (no 429) or re-send consumed streams; here every
attempt builds a fresh body (`body=` is a factory), 429 and 5xx back off exponentially
with full jitter honouring Retry-After, and a wait longer than `backoff_cap` is handed
to the ledger (RetriableError) so the worker is free meanwhile. The API key is sent in
a header and never logged.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from ingestd.core.backoff import full_jitter
from ingestd.core.errors import PermanentError, RetriableError
from ingestd.sinks.http import parse_retry_after

log = structlog.get_logger("ingestd.sinks")

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 520, 522, 524})


class RateLimiter:
    """A token bucket: at most `per_minute` requests a minute, in bursts of up to
    `burst`. Waiters are served in arrival order."""

    def __init__(self, per_minute: int, burst: int | None = None) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(burst if burst is not None else max(1, per_minute // 20))
        self.tokens = self.capacity
        self.updated = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self.tokens) / self.rate)


@dataclass(frozen=True, slots=True)
class Answer:
    """A platform's response, read whole (API answers are small JSON documents)."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def text(self, limit: int = 300) -> str:
        return self.body[:limit].decode("utf-8", "replace").strip()


Body = Callable[[], Any]  # builds a fresh request body (bytes, FormData, async iterator)


class PlatformClient:
    """One aiohttp session per sink, with the platform's auth header, a rate limit and
    our retries. `name` and `key_hint` (e.g. "backend.api_key_env V7_API_KEY") make
    auth errors actionable without showing the key."""

    def __init__(
        self,
        name: str,
        auth_headers: Mapping[str, str],
        *,
        per_minute: int,
        key_hint: str,
        max_attempts: int = 6,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        timeout: float = 120.0,
        connections: int = 16,
    ) -> None:
        self.name = name
        self._auth = dict(auth_headers)
        self.limiter = RateLimiter(per_minute)
        self.key_hint = key_hint
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.timeout = timeout
        self.connections = connections
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connections),
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=15, sock_connect=15, sock_read=self.timeout
                ),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _delay(self, failures: int, retry_after: float | None) -> float:
        return full_jitter(failures - 1, self.backoff_base, self.backoff_cap, retry_after)

    async def request(
        self,
        method: str,
        url: str,
        *,
        what: str,
        json_body: Any = None,
        body: Body | None = None,
        headers: Mapping[str, str] | None = None,
        params: Any = None,
        auth: bool = True,
        ok: frozenset[int] | None = None,
    ) -> Answer:
        """Send with retries; return the answer when its status is 2xx or in `ok`.
        Other statuses raise: PermanentError for a rejection (4xx), RetriableError when
        retries ran out or the platform asks for a long wait. `auth=False` for
        pre-signed URLs, which must not see the API key."""
        failures = 0
        while True:
            await self.limiter.acquire()
            hdrs = {**(self._auth if auth else {}), **(headers or {})}
            data = body() if body is not None else None
            try:
                async with self.session().request(
                    method, url, json=json_body, data=data, headers=hdrs, params=params
                ) as resp:
                    answer = Answer(resp.status, dict(resp.headers), await resp.read())
            except (aiohttp.ClientError, TimeoutError) as e:
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                answer = None
            if answer is not None:
                if 200 <= answer.status < 300 or (ok is not None and answer.status in ok):
                    return answer
                if answer.status not in RETRY_STATUSES:
                    raise self.rejection(answer, what)
                reason = f"HTTP {answer.status} ({answer.text(120) or 'no message'})"
            failures += 1
            retry_after = parse_retry_after(answer.headers.get("Retry-After")) if answer else None
            if retry_after is not None and retry_after > self.backoff_cap:
                raise RetriableError(f"{self.name} {what}: {reason}", retry_after)
            if failures >= self.max_attempts:
                raise RetriableError(
                    f"{self.name} {what}: {reason} (gave up after {failures} attempts)",
                    retry_after,
                )
            delay = self._delay(failures, retry_after)
            log.debug("retrying", backend=self.name, what=what, reason=reason, wait=round(delay, 2))
            await asyncio.sleep(delay)

    def rejection(self, answer: Answer, what: str) -> PermanentError:
        """What a non-retriable answer means, in words a user can act on."""
        if answer.status == 401:
            return PermanentError(
                f"{self.name} {what}: the API key was refused (HTTP 401); check {self.key_hint}"
            )
        if answer.status == 403:
            return PermanentError(
                f"{self.name} {what}: the API key may not do this (HTTP 403: "
                f"{answer.text() or 'forbidden'}); check the key's role and {self.key_hint}"
            )
        return PermanentError(
            f"{self.name} {what}: rejected (HTTP {answer.status}): {answer.text() or 'no message'}"
        )
