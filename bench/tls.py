"""`ingestd serve` over TLS against plain HTTP (issue 15): `ingestd sync` of the same tree
into a fresh server store, once over https (a private CA made here, EC P-256, TLS 1.3)
and once over http, in the same run, order alternating per run; medians of --runs.

- 200 x 10 MB: bytes dominate (AES-GCM on the stream, both ends).
- 5,000 x 10 KB: requests dominate (small items travel in batches, POST /v1/batch).

Every measurement is a whole `ingestd sync` process from start to exit (scan, hash,
ledger, upload) against a server started beforehand (outside the timing) on loopback.

    .venv/bin/python bench/tls.py [--runs N] [--small N] [--big N]
"""

from __future__ import annotations

import os
import secrets
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from common import (
    ENV,
    INGESTD,
    REPO,
    Workspace,
    machine_md,
    make_tree,
    median,
    runs_arg,
    spread,
    table,
)

CONCURRENCY = 8
SMALL = (5_000, 10 * 1024)
BIG = (200, 10 * 1024 * 1024)
TOKEN_ENV = "INGESTD_BENCH_TOKEN"


def _arg(name: str, default: int) -> int:
    args = sys.argv[1:]
    return int(args[args.index(name) + 1]) if name in args else default


def make_ca(folder: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1: (ca.pem, cert, key)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("bench CA"))
        .issuer_name(name("bench CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(cert.public_bytes(pem))
    key_path = folder / "server.key"
    key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return folder / "ca.pem", folder / "server.pem", key_path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """`ingestd serve` on loopback, plain or with --tls-cert/--tls-key."""

    def __init__(self, root: Path, token: str, tls: tuple[Path, Path, Path] | None) -> None:
        self.port = free_port()
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        (root / "tokens").write_text(token + "\n")
        cmd = [*INGESTD, "serve", "--store", str(root / "store"), "--port", str(self.port)]
        cmd += ["--token-file", str(root / "tokens"), "--log-format", "json"]
        self.context: ssl.SSLContext | None = None
        if tls:
            ca, cert, key = tls
            cmd += ["--tls-cert", str(cert), "--tls-key", str(key)]
            self.context = ssl.create_default_context(cafile=str(ca))
        self.log = open(root / "serve.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2, context=self.context):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("ingestd serve did not start") from None
                time.sleep(0.05)

    def items(self, token: str) -> int:
        n, cursor = 0, None
        while True:
            q = "?limit=5000" + (f"&cursor={cursor}" if cursor else "")
            req = urllib.request.Request(
                f"{self.url}/v1/datasets/ds/items{q}",
                headers={"Authorization": f"Bearer {token}"},
            )
            with urllib.request.urlopen(req, timeout=60, context=self.context) as r:
                import json

                page = json.loads(r.read())
            n += len(page["items"])
            cursor = page["next_cursor"]
            if not cursor:
                return n

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def sync(run: Path, src: Path, backend: dict[str, Any]) -> float:
    cfg = run / "ingestd.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(run / "state"),
                "log": {"level": "warning", "format": "json"},
                "workers": CONCURRENCY,
                "backend": backend,
                "watches": [{"name": "w", "source": str(src), "dataset": "ds", "settle": "0s"}],
            },
            sort_keys=False,
        )
    )
    t = time.perf_counter()
    with open(run / "stderr.log", "wb") as err:
        rc = subprocess.run(
            [*INGESTD, "sync", "-c", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=ENV,
            cwd=REPO,
            timeout=3600,
        ).returncode
    dt = time.perf_counter() - t
    if rc != 0:
        tail = (run / "stderr.log").read_text(errors="replace").splitlines()[-5:]
        raise RuntimeError(f"ingestd sync exited {rc}: {tail}")
    return dt


def measure(
    ws: Workspace,
    secs: dict[tuple[str, str], list[float]],
    kind: str,
    i: int,
    files: int,
    size: int,
    token: str,
    tls: tuple[Path, Path, Path],
) -> None:
    src = ws.fresh(f"src-{kind}")
    make_tree(src, files, size, seed=3000 + 10 * i + (kind == "big"))
    os.sync()  # the tree's writeback must not land inside a measurement
    modes = ["https", "http"] if i % 2 == 0 else ["http", "https"]
    for mode in modes:
        server = Serve(ws.fresh(f"serve-{mode}"), token, tls if mode == "https" else None)
        try:
            backend: dict[str, Any] = {"kind": "http", "url": server.url, "token_env": TOKEN_ENV}
            if mode == "https":
                backend["ca_file"] = str(tls[0])
            dt = sync(ws.fresh(f"{kind}-{mode}"), src, backend)
            got = server.items(token)
        finally:
            server.stop()
        if got != files:
            raise RuntimeError(f"{kind} {mode}: {got} items, expected {files}")
        secs.setdefault((kind, mode), []).append(dt)
        print(
            f"run {i + 1} {files} x {size // 1024} KB {mode}: {dt:.2f}s "
            f"({files / dt:,.0f} files/s, {files * size / dt / 1e6:,.1f} MB/s)",
            file=sys.stderr,
        )


def main() -> str:
    runs = runs_arg(3)
    small = (_arg("--small", SMALL[0]), SMALL[1])
    big = (_arg("--big", BIG[0]), BIG[1])
    token = secrets.token_hex(24)
    ENV[TOKEN_ENV] = token
    secs: dict[tuple[str, str], list[float]] = {}
    with Workspace("tls") as ws:
        tls = make_ca(ws.fresh("ca"))
        for i in range(runs):
            if big[0]:
                measure(ws, secs, "big", i, *big, token, tls)
            measure(ws, secs, "small", i, *small, token, tls)
    rows = []
    ratios = []
    for kind, (files, size) in (("big", big), ("small", small)):
        if (kind, "http") not in secs:
            continue
        unit = f"{size >> 20} MB" if size >= 1 << 20 else f"{size >> 10} KB"
        fps = {}
        for mode in ("http", "https"):
            s = secs[(kind, mode)]
            per = [files / x for x in s]
            fps[mode] = median(per)
            rows.append(
                [
                    f"{files:,} × {unit}",
                    mode,
                    f"{median(s):.2f}",
                    f"{median(per):,.0f}",
                    spread(per),
                    f"{median([files * size / x / 1e6 for x in s]):,.1f}",
                ]
            )
        ratios.append(f"- {files:,} × {unit}: https / http = {fps['https'] / fps['http']:.2f}")
    return "\n".join(
        [
            f"`.venv/bin/python bench/tls.py --runs {runs}` (concurrency {CONCURRENCY}; each"
            " measurement a whole `ingestd sync` process into a fresh server store; the same"
            " tree for https and http within a run, order alternating)",
            "",
            table(
                [
                    "files",
                    "transport",
                    "seconds (median)",
                    "files/s (median)",
                    "files/s (spread)",
                    "MB/s (median)",
                ],
                rows,
            ),
            "",
            f"- {runs} runs; medians, spread = min–max.",
            *ratios,
        ]
    )


if __name__ == "__main__":
    md = main()
    print(md)
    print()
    print(machine_md())
