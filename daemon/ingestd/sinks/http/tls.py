"""TLS for the http sink: whom the daemon trusts (the system's CAs, or `ca_file` alone),
its own certificate for mutual TLS, and certificate problems in words.

A certificate problem is the server's state, not an item's: it is reported like an
outage, so the gate (gate.py) probes one request at a time until it is fixed (the
server's certificate renewed, or the config's `ca_file` or URL corrected), nothing is
sent meanwhile, and no item is failed. To get there without a retry loop of its own,
the sink's session turns aiohttp's TLS exceptions into `TLS`, a connection error
whose message is the named problem: the kit client (sinks/kit/client.py) then marks
the server unreachable with that reason, exactly as for a refused connection.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from ingestd.sinks.kit.client import ApiClient

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
CONDITION = "tls"  # RetriableError.condition of a certificate problem

# OpenSSL's X509_V_ERR_* codes (ssl.SSLCertVerificationError.verify_code).
_EXPIRED, _NOT_YET_VALID, _HOSTNAME_MISMATCH, _IP_MISMATCH = 10, 9, 62, 64
_UNTRUSTED = frozenset({2, 18, 19, 20, 21, 27, 28})


def client_context(
    ca_file: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
) -> ssl.SSLContext:
    """Verify the server's certificate and host name, TLS 1.2 or newer. With `ca_file`
    only that CA is trusted (a private CA), not the system's."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = MINIMUM_VERSION
    if client_cert is not None:
        context.load_cert_chain(client_cert, client_key)
    return context


def certificate_problem(host: str, error: Exception) -> str:
    """A failed certificate check in words (without the "TLS: " the class adds)."""
    code = getattr(error, "verify_code", None)
    detail = getattr(error, "verify_message", None) or str(error)
    if code == _EXPIRED:
        return (
            f"certificate for {host} expired ({detail}); renew the server's certificate "
            "(`ingestd serve` re-reads it on SIGHUP)"
        )
    if code == _NOT_YET_VALID:
        return f"certificate for {host} is not valid yet ({detail}); check both clocks"
    if code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
        return (
            f"host name mismatch: the server's certificate is not valid for {host} "
            f"({detail}); use a backend.url with a name in its subjectAltName"
        )
    if code in _UNTRUSTED:
        return (
            f"certificate not trusted for {host}: {detail}; set backend.ca_file to the "
            "CA that signed the server's certificate"
        )
    return f"certificate check failed for {host}: {detail}"


class TLS(aiohttp.ClientConnectorError):
    """A TLS problem reaching the server. Named TLS so that the kit client's reason for
    a connection error, f"{type(e).__name__}: {e}", reads "TLS: <the problem>"."""

    def __init__(self, problem: str) -> None:
        # Not ClientConnectorError.__init__: the message is ours, no connection key.
        OSError.__init__(self, 0, problem)
        self.problem = problem
        self.args = (problem,)

    def __str__(self) -> str:
        return self.problem


def as_tls(host: str, e: BaseException) -> TLS | None:
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        return TLS(certificate_problem(host, e.certificate_error))
    if isinstance(e, aiohttp.ClientConnectorSSLError):
        why = getattr(e.os_error, "reason", None) or e.strerror or str(e)
        return TLS(
            f"handshake with {host} failed ({why}); is the server serving https, and "
            "does it want a client certificate (backend.client_cert, client_key)?"
        )
    return None


class _Request:
    """`session.request(...)` whose TLS exceptions come out as `TLS`."""

    def __init__(self, cm: Any, host: str) -> None:
        self._cm = cm
        self._host = host

    async def __aenter__(self) -> aiohttp.ClientResponse:
        try:
            return await self._cm.__aenter__()
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientConnectorSSLError) as e:
            raise as_tls(self._host, e) from e  # type: ignore[misc]

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._cm.__aexit__(exc_type, exc, tb)


class _Session:
    """The parts of aiohttp.ClientSession the kit client uses."""

    def __init__(self, session: aiohttp.ClientSession, host: str) -> None:
        self._session = session
        self._host = host

    @property
    def closed(self) -> bool:
        return self._session.closed

    async def close(self) -> None:
        await self._session.close()

    def request(self, method: str, url: Any, **kw: Any) -> _Request:
        return _Request(self._session.request(method, url, **kw), self._host)


class TlsApiClient(ApiClient):
    """The kit client with the sink's TLS context, naming certificate problems."""

    def __init__(
        self, *args: Any, ssl_context: ssl.SSLContext | None, host: str, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.ssl_context = ssl_context
        self.host = host

    def session(self) -> aiohttp.ClientSession:
        # The kit's session (same limits and timeouts) with this sink's TLS context,
        # wrapped so that TLS exceptions come out named.
        if self._session is None or self._session.closed:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.connections,
                    ssl=self.ssl_context if self.ssl_context is not None else True,
                ),
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=15, sock_connect=15, sock_read=self.timeout
                ),
            )
            self._session = _Session(session, self.host)  # type: ignore[assignment]
        return self._session  # type: ignore[return-value]
