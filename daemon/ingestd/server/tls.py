"""TLS for `ingestd serve`: the server's certificate and key, optional client
certificates (mutual TLS), and rotation without a restart (docs/tls.md).

One `ssl.SSLContext` serves every connection. `reload()` (SIGHUP) loads the pair into
that same live context: OpenSSL copies a context's certificate into each connection
when the connection is made, so new handshakes get the new pair and connections
already open (an upload in flight) keep theirs. A pair that does not load is refused
whole: it is first loaded into a scratch context, and only a pair that loads there
touches the live one, so a half-copied key file never leaves the server with a
certificate and a key that do not match.

The key is a secret: a key file that the group or others may read is refused, naming
the file and the fix, before anything listens.
"""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

import structlog

from ingestd.server.auth import ServeError

log = structlog.get_logger("ingestd.serve")

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def check_key_file(path: Path) -> None:
    """Refuse a private key that anyone but its owner may read (or that is missing)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ServeError(f"cannot read TLS key {path}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise ServeError(f"TLS key {path} is not a regular file")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ServeError(
            f"TLS key {path} may be read by its group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): run `chmod 600 {path}`"
        )


def _load_pair(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    check_key_file(key)
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as e:
        raise ServeError(f"cannot read TLS certificate or key: {e.filename}: {e.strerror}") from e
    except (ssl.SSLError, OSError) as e:
        raise ServeError(
            f"TLS certificate {cert} and key {key} do not load as a matching PEM pair ({e})"
        ) from e


def _load_client_ca(context: ssl.SSLContext, client_ca: Path) -> None:
    try:
        context.load_verify_locations(cafile=client_ca)
    except (ssl.SSLError, OSError) as e:
        raise ServeError(f"cannot load client CA {client_ca} ({e})") from e


def _new_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    return context


class ServerTls:
    """The server's TLS settings and its one live context."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert = Path(cert)
        self.key = Path(key)
        self.client_ca = Path(client_ca) if client_ca is not None else None
        self.context = _new_context()
        _load_pair(self.context, self.cert, self.key)
        if self.client_ca is not None:
            _load_client_ca(self.context, self.client_ca)
            # Required, not optional: with --client-ca, no request of any route gets
            # past the handshake without a certificate the CA signed.
            self.context.verify_mode = ssl.CERT_REQUIRED

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def reload(self) -> bool:
        """Re-read the pair (and add the client CA file's certificates) for new
        handshakes. On any problem the running pair stays and the reason is logged;
        returns whether the new pair is in use."""
        try:
            _load_pair(_new_context(), self.cert, self.key)  # refuse before touching
            _load_pair(self.context, self.cert, self.key)
            if self.client_ca is not None:
                # Adds to the trusted set (OpenSSL cannot remove): a CA taken out of
                # the file stays trusted until the server restarts (docs/tls.md).
                _load_client_ca(self.context, self.client_ca)
        except ServeError as e:
            log.error("tls_reload_failed", error=str(e), keeping="the running certificate")
            return False
        log.info("tls_reloaded", cert=str(self.cert))
        return True

    def __repr__(self) -> str:
        return f"ServerTls(cert={str(self.cert)!r}, mutual={self.mutual})"
