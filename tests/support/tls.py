"""A test certificate authority made in the test (the `cryptography` package), and
`ingestd serve` over TLS as a subprocess (`TlsServer`) for the TLS tests.

Keys are EC P-256: made in about a millisecond, so every test gets its own CA and no
key or certificate is ever committed. Files are written the way docs/tls.md has an
operator write them: PEM, keys mode 600."""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
import os
import socket
import ssl
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.daemon import REPO
from tests.support.serve import SERVE, HttpAnswer, Server
from tests.support.wait import wait_for

__all__ = ["CA", "Handshakes", "Issued", "TlsServer", "listen_tls", "peer_serial"]

_DAY = dt.timedelta(days=1)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    out: list[x509.GeneralName] = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(out)


def write_key(key: ec.EllipticCurvePrivateKey, path: Path, mode: int = 0o600) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(mode)
    return path


@dataclass(frozen=True)
class Issued:
    """A certificate and its key on disk."""

    cert: Path
    key: Path
    serial: int


class CA:
    """A private certificate authority in `folder`: `ca.pem` is what clients trust."""

    def __init__(self, folder: Path, name: str = "ingestd test CA") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        safe = "".join(c if c.isalnum() else "-" for c in name)
        self.pem = folder / f"{safe}.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        stem: str,
        names: Sequence[str] = ("127.0.0.1", "localhost"),
        *,
        client: bool = False,
        expired: bool = False,
        folder: Path | None = None,
    ) -> Issued:
        """A leaf certificate for `names` (subjectAltName: IPs and DNS names), for a
        server or (client=True) a client; `expired` ended yesterday."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        start, end = (now - 10 * _DAY, now - _DAY) if expired else (now - _DAY, now + 10 * _DAY)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(_san(names), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        where = folder or self.folder
        where.mkdir(parents=True, exist_ok=True)
        cert_path = where / f"{stem}.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return Issued(cert_path, write_key(key, where / f"{stem}.key"), serial)


def client_context(
    ca: CA | None, client: Issued | None = None, *, check_hostname: bool = True
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.pem) if ca else None)
    ctx.check_hostname = check_hostname
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    return ctx


def peer_serial(port: int, ca: CA, host: str = "127.0.0.1") -> int:
    """The serial number of the certificate a new connection to `port` is shown. Not
    verified: what is asked is which certificate, and the one being replaced may be
    expired (a verifying handshake would raise until the renewal lands)."""
    ctx = client_context(ca, check_hostname=False)
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


class TlsServer(Server):
    """`ingestd serve --tls-cert … --tls-key …` (and `--client-ca`), with raw requests
    over https trusting `ca` (and showing `client` when the server asks for one)."""

    def __init__(
        self,
        root: Path,
        token: str | None,
        ca: CA,
        pair: Issued,
        *,
        client_ca: CA | None = None,
        client: Issued | None = None,
        extra: Sequence[str] = (),
        name: str = "server",
    ) -> None:
        super().__init__(root, token, name=name)
        self.ca = ca
        self.pair = pair
        self.client_ca = client_ca
        self.client = client
        self.extra = list(extra)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [*SERVE, "--store", str(self.store), "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--log-format", "json"]
        cmd += ["--tls-cert", str(self.pair.cert), "--tls-key", str(self.pair.key)]
        if self.client_ca is not None:
            cmd += ["--client-ca", str(self.client_ca.pem)]
        if self.token_file is not None:
            cmd += ["--token-file", str(self.token_file)]
        return cmd + self.extra

    def start(self) -> subprocess.Popen[bytes]:
        assert self.proc is None or self.proc.poll() is not None, "server already running"
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("INGESTD_SERVE_TOKENS", None)
        self.proc = subprocess.Popen(self.command(), cwd=REPO, stdout=log, stderr=log, env=env)
        log.close()
        wait_for(self._healthy, 30, interval=0.05, what="ingestd serve to answer /healthz")
        return self.proc

    def request(
        self,
        method: str,
        path: str,
        body: bytes | Iterable[bytes] | None = None,
        *,
        headers: dict[str, str] | None = None,
        token: str | bool | None = True,
        chunked: bool = False,
        timeout: float = 30,
    ) -> HttpAnswer:
        h = dict(headers or {})
        if token is True:
            token = self.token
        ctx = client_context(self.ca, self.client, check_hostname=False)
        if isinstance(token, str):
            h["Authorization"] = f"Bearer {token}"
        else:
            # Public routes (/healthz, /metrics) are read whatever the certificate, so
            # tests can watch a server whose certificate is the problem under test; a
            # token only ever goes to a certificate the test CA signed.
            ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=ctx)
        try:
            conn.request(method, path, body=body, headers=h, encode_chunked=chunked)
            resp = conn.getresponse()
            return HttpAnswer(resp.status, dict(resp.getheaders()), resp.read())
        finally:
            conn.close()


class Handshakes:
    """Counts the TLS handshakes a server context sees (its SNI callback runs once per
    ClientHello; clients send SNI for host names, so connect to `localhost`)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.count = 0
        context.sni_callback = self._hello

    def _hello(self, sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        self.count += 1


async def listen_tls(app: web.Application, context: ssl.SSLContext) -> tuple[web.AppRunner, int]:
    """`app` over TLS on 127.0.0.1, any free port: the runner (for cleanup) and port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    return runner, int(runner.addresses[0][1])
