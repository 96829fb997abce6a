"""`ingestd serve` over TLS with a daemon syncing to it, end to end (issue 15): the real
CLI as subprocesses on loopback, with a CA and certificates made in the test.

1. A daemon syncs through https:// trusting a private CA (backend.ca_file); the same
   with mutual TLS (client certificates instead of tokens).
2. A wrong CA, an expired server certificate and a host-name mismatch: each is a named
   problem (the daemon's log, the items' last error in `ingestd status`), nothing
   reaches the server, the daemon stays up; after the fix (a config edit the daemon
   reloads, or the server's certificate renewed and SIGHUP) every item arrives once.
3. The server's certificate is rotated by SIGHUP while a 1 GiB upload is in flight:
   new connections get the new certificate, the upload completes, nothing is lost.
4. Safe by default: tokens on a non-loopback address without TLS are refused (exit 2,
   with why) unless --allow-plain-http; a group-readable key is refused naming
   `chmod 600`; `ingestd serve --help` documents every TLS option.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import INGESTD, REPO, Env, log_lines
from tests.support.ports import free_port
from tests.support.serve import SERVE
from tests.support.tls import CA, Issued, TlsServer, peer_serial
from tests.support.wait import wait_for

TOKEN_ENV = "INGESTD_E2E_TLS_TOKEN"
MiB = 1 << 20
GIB = 1 << 30


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    t = "tok-" + secrets.token_hex(24)
    monkeypatch.setenv(TOKEN_ENV, t)
    return t


@pytest.fixture
def servers() -> Any:
    started: list[TlsServer] = []
    yield started
    for s in started:
        s.kill()


def start(servers: list[TlsServer], server: TlsServer) -> TlsServer:
    servers.append(server)
    server.start()
    return server


def write_files(drop: Path, small: int = 12, big: int = 3 * MiB) -> dict[str, str]:
    """Small files (batched) and one big one (blob by blob): key -> digest."""
    expected = {}
    for i in range(small):
        data = f"small {i}\n".encode() + os.urandom(4096)
        (drop / f"s{i:02d}.bin").write_bytes(data)
        expected[f"/s{i:02d}.bin"] = "sha256:" + hashlib.sha256(data).hexdigest()
    data = b"big\n" + os.urandom(big)
    (drop / "big.bin").write_bytes(data)
    expected["/big.bin"] = "sha256:" + hashlib.sha256(data).hexdigest()
    return expected


def configure(env: Env, drop: Path, backend: dict[str, Any]) -> None:
    env.write_config(
        [{"name": "w", "source": str(drop), "dataset": "ds", "path": "/", "settle": "0.3s"}],
        backend={"kind": "http", **backend},
    )


def synced(env: Env, total: int) -> bool:
    w = env.watch_status("w")
    return w["synced"] == total and w["pending"] == 0 and w["failed"] == 0


def assert_arrived_once(server: TlsServer, expected: dict[str, str]) -> None:
    ans = server.request("GET", "/v1/datasets/ds/items?limit=1000")
    assert ans.status == 200, ans
    items = ans.json()["items"]
    got = {i["key"]: i["slots"][0]["files"][0]["digest"] for i in items}
    assert got == expected
    assert all(i["version"] == 1 for i in items), "an item was stored twice"


def api_requests(server: TlsServer) -> float:
    """Requests the server answered on /v1 routes in this life."""
    return sum(
        v
        for k, v in server.metrics().items()
        if k.startswith("ingestd_serve_requests_total{") and 'route="/v1/' in k
    )


# --- 1. https with a private CA, and mutual TLS ------------------------------------------


def test_daemon_syncs_over_https_with_a_private_ca(
    env: Env, servers: list[TlsServer], tmp_path: Path, token: str
) -> None:
    ca = CA(tmp_path / "ca")
    server = start(servers, TlsServer(tmp_path, token, ca, ca.issue("server")))
    drop = env.drop()
    expected = write_files(drop)
    backend = {"url": server.url, "token_env": TOKEN_ENV, "ca_file": str(ca.pem)}
    configure(env, drop, backend)
    env.start()
    wait_for(lambda: synced(env, len(expected)), 180, 0.3, "every item synced over https")
    assert env.stop() == 0
    assert_arrived_once(server, expected)
    assert token not in env.log() and token not in server.log()


def test_daemon_syncs_over_mutual_tls(env: Env, servers: list[TlsServer], tmp_path: Path) -> None:
    ca = CA(tmp_path / "ca")
    clients = CA(tmp_path / "clients", "client CA")
    me = clients.issue("daemon", ["daemon-1"], client=True)
    # No tokens: the client certificate is the credential.
    server = TlsServer(tmp_path, None, ca, ca.issue("server"), client_ca=clients, client=me)
    start(servers, server)
    drop = env.drop()
    expected = write_files(drop)
    backend = {
        "url": server.url,
        "ca_file": str(ca.pem),
        "client_cert": str(me.cert),
        "client_key": str(me.key),
    }
    configure(env, drop, backend)
    env.start()
    wait_for(lambda: synced(env, len(expected)), 180, 0.3, "every item synced over mutual TLS")
    assert env.stop() == 0
    assert_arrived_once(server, expected)
    # And a client without a certificate gets nowhere, not even /healthz.
    server.client = None
    with pytest.raises(OSError):
        server.request("GET", "/healthz", token=None, timeout=10)


# --- 2. named certificate problems, fixed live ---------------------------------------------

PROBLEMS = {
    "wrong CA": "TLS: certificate not trusted for 127.0.0.1",
    "expired": "TLS: certificate for 127.0.0.1 expired",
    "host name mismatch": "TLS: host name mismatch",
}


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_certificate_problem_is_named_sends_nothing_and_heals(
    env: Env, servers: list[TlsServer], tmp_path: Path, token: str, problem: str
) -> None:
    ca = CA(tmp_path / "ca")
    names = ["localhost"] if problem == "host name mismatch" else ["127.0.0.1", "localhost"]
    pair = ca.issue("server", names, expired=problem == "expired")
    server = start(servers, TlsServer(tmp_path, token, ca, pair))
    drop = env.drop()
    expected = write_files(drop)
    trusted = CA(tmp_path / "other", "another CA").pem if problem == "wrong CA" else ca.pem
    backend = {"url": server.url, "token_env": TOKEN_ENV, "ca_file": str(trusted)}
    configure(env, drop, backend)
    env.start()

    named = PROBLEMS[problem]
    warned = wait_for(
        lambda: [e for e in log_lines(env, "ingestion server TLS problem") if named in e["reason"]],
        60,
        0.2,
        f"the daemon to log {named!r}",
    )
    assert len(warned) == 1, "one warning for the outage, not one per request"
    wait_for(
        lambda: any(named in e["error"] for e in env.watch_status("w")["last_errors"]),
        60,
        0.3,
        "the items' last error to name the problem",
    )
    # `status` names it as the watch's problem (the held pool's, from the live part).
    w = wait_for(
        lambda: (w := env.watch_status("w"))["problem"] and named in w["problem"] and w,
        60,
        0.3,
        "status to name the problem as the watch's",
    )
    assert w["failed"] == 0 and w["synced"] == 0, w
    assert env.daemon is not None and env.daemon.poll() is None, "the daemon stopped"
    assert api_requests(server) == 0, "something was sent despite the certificate problem"
    assert server.blob_digests() == set()

    # The fix: the config (the daemon notices the edit and reloads), or the server's
    # certificate (renewed, then SIGHUP).
    if problem == "wrong CA":
        configure(env, drop, {**backend, "ca_file": str(ca.pem)})
    elif problem == "host name mismatch":
        configure(env, drop, {**backend, "url": f"https://localhost:{server.port}"})
    else:
        renewed = ca.issue("renewed", ["127.0.0.1"], folder=tmp_path / "renewed")
        renew(server, renewed)
    wait_for(lambda: synced(env, len(expected)), 120, 0.3, "every item synced after the fix")
    wait_for(lambda: env.watch_status("w")["problem"] is None, 30, 0.3, "the problem cleared")
    assert env.stop() == 0
    assert_arrived_once(server, expected)


def renew(server: TlsServer, new: Issued) -> None:
    """Install a new pair where the server reads its own, then SIGHUP; wait until new
    connections are shown it."""
    server.pair.cert.write_bytes(new.cert.read_bytes())
    server.pair.key.write_bytes(new.key.read_bytes())
    assert server.proc is not None
    server.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: peer_serial(server.port, server.ca) == new.serial,
        30,
        0.05,
        "the server to show the renewed certificate",
    )


# --- 3. rotation during a 1 GiB upload --------------------------------------------------------


def test_rotation_by_sighup_during_a_1gib_upload(
    env: Env, servers: list[TlsServer], tmp_path: Path, token: str
) -> None:
    ca = CA(tmp_path / "ca")
    server = start(servers, TlsServer(tmp_path, token, ca, ca.issue("server")))
    pid = server.proc.pid if server.proc else None
    drop = env.drop()
    huge = drop / "huge.bin"
    # Sparse: 1 GiB that costs the drop folder no disk. A unique first block gives it a
    # digest of its own.
    with open(huge, "wb") as fh:
        fh.write(secrets.token_bytes(4096))
        fh.truncate(GIB)
    h = hashlib.sha256()
    with open(huge, "rb") as fh:
        while chunk := fh.read(8 * MiB):
            h.update(chunk)
    expected = {"/huge.bin": "sha256:" + h.hexdigest()}
    backend = {"url": server.url, "token_env": TOKEN_ENV, "ca_file": str(ca.pem)}
    configure(env, drop, backend)
    env.start()
    wait_for(
        lambda: server.bytes_received() >= GIB // 4,
        120,
        0.05,
        "a quarter of the upload at the server",
    )
    renewed = ca.issue("renewed", ["127.0.0.1", "localhost"], folder=tmp_path / "renewed")
    renew(server, renewed)
    at_rotation = server.bytes_received()
    assert at_rotation < 0.9 * GIB, f"the upload was nearly done at the rotation: {at_rotation}"
    wait_for(lambda: synced(env, 1), 240, 0.5, "the 1 GiB item synced")
    total = server.bytes_received()
    assert env.stop() == 0
    assert server.proc is not None and server.proc.pid == pid and server.proc.poll() is None
    assert_arrived_once(server, expected)
    assert total < 1.5 * GIB, f"{total / MiB:.0f} MiB received: the upload started over"
    assert any('"tls_reloaded"' in line for line in server.log().splitlines())


# --- 4. safe by default ----------------------------------------------------------------------


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`ingestd serve ARGS` that is expected to exit by itself (a refusal)."""
    return subprocess.run(
        [*SERVE, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


def test_tokens_over_plain_http_off_loopback_are_refused(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-" + secrets.token_hex(16) + "\n")
    store = tmp_path / "store"
    out = serve("--store", str(store), "--host", "0.0.0.0", "--token-file", str(tokens))
    assert out.returncode == 2, out
    assert "plain HTTP" in out.stderr and "--tls-cert" in out.stderr, out.stderr
    assert "--allow-plain-http" in out.stderr
    assert not store.exists(), "the store was touched before the refusal"


def test_allow_plain_http_overrides_the_refusal(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-" + secrets.token_hex(16) + "\n")
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            *SERVE,
            "--store",
            str(tmp_path / "store"),
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            "--token-file",
            str(tokens),
            "--allow-plain-http",
            "--log-format",
            "json",
        ],
        cwd=REPO,
        stdout=log,
        stderr=log,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    log.close()
    try:

        def healthy() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(healthy, 30, 0.05, "the plain-HTTP server with --allow-plain-http")
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_tls_on_a_public_address_needs_no_override(tmp_path: Path) -> None:
    """The refusal is about plain HTTP: the same address with TLS starts."""
    ca = CA(tmp_path / "ca")
    server = TlsServer(tmp_path, "tok-" + secrets.token_hex(8), ca, ca.issue("server"))
    cmd = server.command()
    cmd[cmd.index("--host") + 1] = "0.0.0.0"
    server.command = lambda: cmd  # type: ignore[method-assign]
    try:
        server.start()
    finally:
        server.kill()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_key_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    ca = CA(tmp_path / "ca")
    pair = ca.issue("server")
    pair.key.chmod(mode)
    out = serve(
        "--store",
        str(tmp_path / "store"),
        "--port",
        str(free_port()),
        "--tls-cert",
        str(pair.cert),
        "--tls-key",
        str(pair.key),
    )
    assert out.returncode == 2, out
    assert str(pair.key) in out.stderr and f"chmod 600 {pair.key}" in out.stderr, out.stderr


def test_serve_help_documents_tls() -> None:
    out = subprocess.run(
        [*INGESTD, "serve", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for needle in (
        "--tls-cert FILE",
        "--tls-key FILE",
        "--client-ca FILE",
        "--allow-plain-http",
        "TLS 1.2 or newer",
        "SIGHUP",
        "chmod 600",
        "mutual TLS",
        "plain HTTP",
        "docs/tls.md",
    ):
        assert needle in text, f"`ingestd serve --help` does not mention {needle!r}"


def test_no_plain_http_refusal_on_loopback(tmp_path: Path) -> None:
    """Loopback stays as it was: tokens over plain HTTP on 127.0.0.1 are fine (nothing
    crosses a network)."""
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-" + secrets.token_hex(16) + "\n")
    port = free_port()
    proc = subprocess.Popen(
        [
            *SERVE,
            "--store",
            str(tmp_path / "store"),
            "--port",
            str(port),
            "--token-file",
            str(tokens),
            "--log-format",
            "json",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:

        def listening() -> bool:
            assert proc.poll() is None, "serve exited on loopback"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(listening, 30, 0.05, "serve on loopback")
    finally:
        proc.terminate()
        proc.wait(timeout=15)
