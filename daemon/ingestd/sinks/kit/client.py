"""One HTTP client for a platform sink: the platform's auth header, the key's request
budget (pacer.py), and one retry loop whose only per-backend part is the retry rule
(which answers are worth another attempt), as in Vector's sinks.

Every attempt builds a fresh body (`body=` is a factory: a consumed stream is never
re-sent), 429 and 5xx back off exponentially with full jitter honouring Retry-After
(which pauses every request of the key), and a wait longer than `backoff_cap` is handed
to the ledger (RetriableError) so the worker is free meanwhile. The API key is sent in
a header and never logged; a refused key names the setting that holds it.

A body that fails its own check while it streams (a VerifiedFile whose file changed,
or could not be read) ends the request with that error, not with the connection error
aiohttp wraps it in: the network is not at fault, and another attempt would not help.
An optional `gate` (see Gate) lets a sink share the news of an outage among all its
requests, e.g. one probe at a time while its server cannot be reached.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp
import structlog
from yarl import URL

from ingestd.core.backoff import full_jitter
from ingestd.core.errors import PermanentError, RetriableError, SyncError
from ingestd.sinks.kit.pacer import Pacer, parse_retry_after

log = structlog.get_logger("ingestd.sinks")

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 520, 522, 524})
# Failures to reach the backend at all (as opposed to a connection lost mid-request).
CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


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


Verdict = Literal["ok", "retry", "reject"]
RetryRule = Callable[[Answer], Verdict]
Body = Callable[[], Any]  # builds a fresh request body (bytes, FormData, async iterator)


class Gate(Protocol):
    """Optional, per client: what every request of a sink learns about reaching its
    backend at all. `admit` runs before each attempt: None lets it be sent; a reason
    makes it a failed attempt that sends nothing (the backend is known to be down and
    another request is probing it). `after` runs once per admitted attempt: reached
    True when the backend answered, False when it could not be connected to, None when
    neither is known (the attempt ended otherwise)."""

    async def admit(self) -> str | None: ...

    def after(self, reached: bool | None, reason: str) -> None: ...


def _local_failure(e: BaseException) -> SyncError | None:
    """The SyncError a request body raised, which aiohttp reports as the cause of a
    connection error."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, SyncError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def http_rule(answer: Answer) -> Verdict:
    """The default rule: 2xx is an answer, 408/429/5xx are worth another attempt."""
    if 200 <= answer.status < 300:
        return "ok"
    return "retry" if answer.status in RETRY_STATUSES else "reject"


class ApiClient:
    """One aiohttp session per sink. `name` and `key_hint` (e.g. "the V7_API_KEY
    environment variable (backend.api_key_env)") make auth errors actionable without
    showing the key. `rule` says which answers are retried; `reject` may put a
    platform's own error format into words."""

    def __init__(
        self,
        name: str,
        auth_headers: Mapping[str, str],
        *,
        per_minute: int | None,
        key_hint: str,
        rule: RetryRule = http_rule,
        reject: Callable[[Answer, str], Exception] | None = None,
        max_attempts: int = 6,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        timeout: float = 120.0,
        connections: int = 32,
        gate: Gate | None = None,
    ) -> None:
        self.name = name
        self._auth = dict(auth_headers)
        self.pacer = Pacer(per_minute)
        self.key_hint = key_hint
        self.rule = rule
        self._reject = reject
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.timeout = timeout
        self.connections = connections
        self.gate = gate
        self._session: aiohttp.ClientSession | None = None

    @property
    def requests(self) -> int:
        """Requests sent so far (each attempt counts): requests per item is throughput."""
        return self.pacer.sent

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

    async def request(
        self,
        method: str,
        url: str | URL,
        *,
        what: str,
        json_body: Any = None,
        body: Body | None = None,
        headers: Mapping[str, str] | None = None,
        params: Any = None,
        auth: bool = True,
        ok: frozenset[int] | None = None,
    ) -> Answer:
        """Send with retries; return the answer the rule calls "ok" (or whose status is
        in `ok`). Otherwise raise: PermanentError for a rejection, RetriableError when
        retries ran out or the platform asks for a long wait. `auth=False` for
        pre-signed URLs, which must not see the API key."""
        failures = 0
        while True:
            answer: Answer | None = None
            reason = await self.gate.admit() if self.gate is not None else None
            if reason is None:
                answer, reason = await self._attempt(
                    method, url, json_body, body, headers, params, auth
                )
            retry_after: float | None = None
            if answer is not None:
                if ok is not None and answer.status in ok:
                    return answer
                verdict = self.rule(answer)
                if verdict == "ok":
                    return answer
                if verdict == "reject":
                    raise self.rejection(answer, what)
                reason = f"HTTP {answer.status} ({answer.text(120) or 'no message'})"
                retry_after = parse_retry_after(answer.headers.get("Retry-After"))
                if retry_after is not None:
                    self.pacer.hold(min(retry_after, self.backoff_cap))
            failures += 1
            if retry_after is not None and retry_after > self.backoff_cap:
                raise RetriableError(f"{self.name} {what}: {reason}", retry_after)
            if failures >= self.max_attempts:
                raise RetriableError(
                    f"{self.name} {what}: {reason} (gave up after {failures} attempts)",
                    retry_after,
                )
            delay = full_jitter(failures - 1, self.backoff_base, self.backoff_cap, retry_after)
            log.debug("retrying", backend=self.name, what=what, reason=reason, wait=round(delay, 2))
            await asyncio.sleep(delay)

    async def _attempt(
        self,
        method: str,
        url: str | URL,
        json_body: Any,
        body: Body | None,
        headers: Mapping[str, str] | None,
        params: Any,
        auth: bool,
    ) -> tuple[Answer | None, str]:
        """One attempt: the answer, or None and why there was none."""
        reached: bool | None = None
        reason = ""
        try:
            await self.pacer.acquire()
            hdrs = {**(self._auth if auth else {}), **(headers or {})}
            data = body() if body is not None else None
            try:
                async with self.session().request(
                    method, url, json=json_body, data=data, headers=hdrs, params=params
                ) as resp:
                    answer = Answer(resp.status, dict(resp.headers), await resp.read())
                reached = True
                return answer, ""
            except aiohttp.ClientConnectorCertificateError as e:
                raise PermanentError(
                    f"{self.name}: TLS certificate check failed ({e.certificate_error})"
                ) from None
            except (aiohttp.ClientError, TimeoutError) as e:
                local = _local_failure(e)
                if local is not None:
                    raise local from None
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if isinstance(e, CONNECT_ERRORS):
                    reached = False
                return None, reason
        finally:
            if self.gate is not None:
                self.gate.after(reached, reason)

    def rejection(self, answer: Answer, what: str) -> Exception:
        """What a non-retriable answer means, in words a user can act on."""
        if self._reject is not None:
            return self._reject(answer, what)
        return auth_or_rejection(self.name, self.key_hint, answer, what)


def auth_or_rejection(name: str, key_hint: str, answer: Answer, what: str) -> PermanentError:
    """401 and 403 name the key's setting; anything else quotes the platform."""
    if answer.status == 401:
        return PermanentError(
            f"{name} {what}: the API key was refused (HTTP 401); check {key_hint}"
        )
    if answer.status == 403:
        return PermanentError(
            f"{name} {what}: the API key may not do this (HTTP 403: "
            f"{answer.text() or 'forbidden'}); check the key's role and {key_hint}"
        )
    return PermanentError(
        f"{name} {what}: rejected (HTTP {answer.status}): {answer.text() or 'no message'}"
    )
