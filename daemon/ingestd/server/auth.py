"""Bearer tokens for `ingestd serve`: where they come from, how requests are checked,
which addresses the server may bind without them, and where they may travel without
TLS.

Tokens are secrets: nothing here puts them in a message, a repr or a log line.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import socket
from collections.abc import Sequence
from pathlib import Path

TOKENS_ENV = "INGESTD_SERVE_TOKENS"

_ENV_SPLIT = re.compile(r"[\s,]+")


class ServeError(ValueError):
    """The server cannot start as configured (the CLI exits 2 with this message)."""


def parse_token_file(text: str) -> list[str]:
    """One token per line; blank lines and `#` comments are skipped."""
    tokens = []
    for line in text.splitlines():
        token = line.split("#", 1)[0].strip()
        if token:
            tokens.append(token)
    return tokens


def load_tokens(token_file: str | Path | None = None, env_value: str | None = None) -> list[str]:
    """Tokens from `--token-file` and from the value of $INGESTD_SERVE_TOKENS (comma- or
    whitespace-separated; the caller passes it, so tests need not touch os.environ),
    in that order, without duplicates."""
    tokens: list[str] = []
    if token_file is not None:
        try:
            text = Path(token_file).read_text(encoding="utf-8")
        except OSError as e:
            raise ServeError(f"cannot read token file {token_file}: {e.strerror}") from e
        tokens += parse_token_file(text)
    tokens += [t for t in _ENV_SPLIT.split(env_value or "") if t]
    return list(dict.fromkeys(tokens))


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address. Unresolvable names
    and the wildcard ('' / 0.0.0.0 / ::) are not loopback."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(a).split("%", 1)[0]).is_loopback for a in addresses
    )


def check_bind(host: str, tokens: Sequence[str]) -> None:
    """An unauthenticated server is only safe where only this machine can reach it."""
    if not tokens and not is_loopback(host):
        raise ServeError(
            f"refusing to listen on {host or 'all interfaces'} without a token: "
            f"use --token-file or ${TOKENS_ENV}, or bind to 127.0.0.1"
        )


def check_transport(
    host: str, tokens: Sequence[str], *, tls: bool, client_certs: bool, allow_plain_http: bool
) -> None:
    """Who may reach the server, and whether its secrets cross the network in clear.

    Off loopback the server needs a credential: tokens, or client certificates (mutual
    TLS, which needs TLS). Tokens off loopback need TLS, since a bearer token seen on
    the wire is a token anyone can use; `allow_plain_http` is the operator saying the
    network in between is private or a TLS proxy terminates in front of the server."""
    if client_certs and not tls:
        raise ServeError("--client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)")
    if not client_certs:
        check_bind(host, tokens)
    if tokens and not tls and not allow_plain_http and not is_loopback(host):
        raise ServeError(
            f"refusing to listen on {host or 'all interfaces'} with bearer tokens over "
            "plain HTTP: anyone on the network path could read a token and use it. Use "
            "--tls-cert and --tls-key (docs/tls.md), or --allow-plain-http when a TLS "
            "proxy in front of the server or a private network protects the traffic"
        )


class TokenAuth:
    """Checks `Authorization: Bearer <token>` against the configured tokens."""

    def __init__(self, tokens: Sequence[str]) -> None:
        for t in tokens:
            if not t or any(c.isspace() for c in t):
                raise ServeError("a token must be non-empty and contain no whitespace")
        self._tokens = [t.encode("utf-8") for t in tokens]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def allows(self, authorization: str | None) -> bool:
        if not self._tokens:
            return True
        if not authorization:
            return False
        scheme, _, given = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        candidate = given.strip().encode("utf-8", "surrogateescape")
        # Compare against every token without stopping at a match, so the time taken
        # says nothing about which token (or how much of one) was right.
        ok = False
        for token in self._tokens:
            ok |= hmac.compare_digest(candidate, token)
        return ok

    def __repr__(self) -> str:  # never show the tokens, e.g. in a traceback's locals
        return f"TokenAuth(<{len(self._tokens)} tokens>)"
