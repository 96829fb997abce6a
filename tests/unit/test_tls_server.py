"""The server's TLS (server/tls.py), the transport rule (auth.check_transport) and the
http backend's TLS keys (config.HttpBackend), with certificates made in the test."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from ingestd.config import ConfigError, backend_identity, parse_config
from ingestd.server.app import make_app
from ingestd.server.auth import ServeError, check_transport
from ingestd.server.tls import ServerTls, check_key_file

from tests.support.need import need
from tests.support.syscall_sandbox import find_systemd_analyze, read_unit
from tests.support.tls import CA, listen_tls, peer_serial

TOKEN = "tok-unit-9a7f3c"


# --- the key file ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_key_the_group_or_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    pair = CA(tmp_path).issue("server")
    pair.key.chmod(mode)
    with pytest.raises(ServeError, match=f"chmod 600 {pair.key}"):
        ServerTls(pair.cert, pair.key)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_an_owner_only_key_is_taken(tmp_path: Path, mode: int) -> None:
    pair = CA(tmp_path).issue("server")
    pair.key.chmod(mode)
    tls = ServerTls(pair.cert, pair.key)
    assert tls.context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert tls.context.verify_mode == ssl.CERT_NONE and not tls.mutual


def test_missing_or_mismatched_files_are_refused(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    a, b = ca.issue("a"), ca.issue("b")
    with pytest.raises(ServeError, match="cannot read TLS key"):
        check_key_file(tmp_path / "missing.key")
    with pytest.raises(ServeError, match="matching PEM pair"):
        ServerTls(a.cert, b.key)


def test_client_ca_requires_client_certificates(tmp_path: Path) -> None:
    ca = CA(tmp_path / "ca")
    pair = ca.issue("server")
    tls = ServerTls(pair.cert, pair.key, ca.pem)
    assert tls.mutual and tls.context.verify_mode == ssl.CERT_REQUIRED


# --- rotation ------------------------------------------------------------------------------


async def test_reload_serves_new_connections_the_new_pair_and_refuses_a_bad_one(
    tmp_path: Path,
) -> None:
    ca = CA(tmp_path / "ca")
    pair = ca.issue("server")
    tls = ServerTls(pair.cert, pair.key)
    runner, port = await listen_tls(make_app(tmp_path / "store", [TOKEN]), tls.context)
    try:
        serial = await asyncio.to_thread(peer_serial, port, ca)
        assert serial == pair.serial
        # An open connection made before the rotation keeps working after it.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ssl.create_default_context(cafile=str(ca.pem))
        )
        new = ca.issue("new", folder=tmp_path / "new")
        shutil.copy(new.cert, pair.cert)
        shutil.copy(new.key, pair.key)
        assert tls.reload()
        assert await asyncio.to_thread(peer_serial, port, ca) == new.serial
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()

        # A half-written pair (a key that does not match) is refused whole: the
        # running pair stays.
        shutil.copy(ca.issue("other", folder=tmp_path / "o").key, pair.key)
        assert not tls.reload()
        assert await asyncio.to_thread(peer_serial, port, ca) == new.serial
        # So is a key whose mode went wrong on the way.
        shutil.copy(new.key, pair.key)
        pair.key.chmod(0o644)
        assert not tls.reload()
        pair.key.chmod(0o600)
        assert tls.reload()
    finally:
        await runner.cleanup()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_old_tls_versions_are_refused(tmp_path: Path) -> None:
    ca = CA(tmp_path / "ca")
    pair = ca.issue("server")
    tls = ServerTls(pair.cert, pair.key)
    runner, port = await listen_tls(make_app(tmp_path / "store", [TOKEN]), tls.context)

    def handshake(version: ssl.TLSVersion) -> str:
        ctx = ssl.create_default_context(cafile=str(ca.pem))
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = version
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.0/1.1
        import socket

        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
            ):
                return str(s.version())
        except (ssl.SSLError, OSError) as e:
            return f"refused: {e}"

    try:
        assert await asyncio.to_thread(handshake, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
        assert await asyncio.to_thread(handshake, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
        for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            assert (await asyncio.to_thread(handshake, old)).startswith("refused")
    finally:
        await runner.cleanup()


# --- the transport rule ---------------------------------------------------------------------


def test_tokens_off_loopback_need_tls_or_the_override() -> None:
    check_transport("127.0.0.1", [TOKEN], tls=False, client_certs=False, allow_plain_http=False)
    check_transport("0.0.0.0", [TOKEN], tls=True, client_certs=False, allow_plain_http=False)
    check_transport("0.0.0.0", [TOKEN], tls=False, client_certs=False, allow_plain_http=True)
    for host in ("0.0.0.0", "::", "10.0.0.5", ""):
        with pytest.raises(ServeError, match="plain HTTP"):
            check_transport(host, [TOKEN], tls=False, client_certs=False, allow_plain_http=False)


def test_client_certificates_are_a_credential_and_need_tls() -> None:
    check_transport("0.0.0.0", [], tls=True, client_certs=True, allow_plain_http=False)
    with pytest.raises(ServeError, match="without a token"):
        check_transport("0.0.0.0", [], tls=True, client_certs=False, allow_plain_http=False)
    with pytest.raises(ServeError, match="mutual TLS is TLS"):
        check_transport("127.0.0.1", [], tls=False, client_certs=True, allow_plain_http=False)


# --- the http backend's keys ----------------------------------------------------------------


def _config(tmp_path: Path, **backend: object) -> dict[str, object]:
    (tmp_path / "drop").mkdir(exist_ok=True)
    return {
        "state_dir": str(tmp_path / "state"),
        "backend": {"kind": "http", "url": "https://ingest.example:8750", **backend},
        "watches": [{"name": "w", "source": str(tmp_path / "drop"), "dataset": "ds"}],
    }


def _problems(tmp_path: Path, **backend: object) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(_config(tmp_path, **backend), tmp_path)
    return "\n".join(str(p) for p in e.value.problems)


def test_backend_tls_keys(tmp_path: Path) -> None:
    ca = CA(tmp_path / "ca")
    me = ca.issue("me", ["daemon-1"], client=True)
    config = parse_config(
        _config(
            tmp_path,
            ca_file="ca/ingestd-test-CA.pem",
            client_cert=str(me.cert),
            client_key=str(me.key),
        ),
        tmp_path,
    )
    b = config.backend
    assert b.ca_file == ca.pem  # relative to the config file  # type: ignore[union-attr]
    assert "client_cert and client_key go together" in _problems(tmp_path, client_cert=str(me.cert))
    http = _config(tmp_path, ca_file=str(ca.pem))
    http["backend"]["url"] = "http://ingest.example:8750"  # type: ignore[index]
    with pytest.raises(ConfigError, match="need an https:// url"):
        parse_config(http, tmp_path)
    assert "does not exist" in _problems(tmp_path, ca_file=str(tmp_path / "nope.pem"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    assert "do not load as PEM" in _problems(tmp_path, ca_file=str(garbage))


def test_tls_keys_are_not_part_of_the_backend_identity(tmp_path: Path) -> None:
    """Fixing ca_file must not re-send every item; it must still rebuild the sink."""
    ca, other = CA(tmp_path / "a"), CA(tmp_path / "b", "other CA")
    one = parse_config(_config(tmp_path, ca_file=str(ca.pem)), tmp_path)
    two = parse_config(_config(tmp_path, ca_file=str(other.pem)), tmp_path)
    assert backend_identity(one) == backend_identity(two)
    assert one.backend != two.backend


# --- the systemd unit -------------------------------------------------------------------------

SERVE_UNIT = Path(__file__).resolve().parents[2] / "systemd" / "ingestd-serve.service"


def test_the_serve_unit_hands_the_key_over_as_a_credential(tmp_path: Path) -> None:
    unit = read_unit(SERVE_UNIT)
    assert sorted(unit["LoadCredential"]) == [
        "tls.key:/etc/ingestd/server.key",
        "tls.pem:/etc/ingestd/server.pem",
    ]
    (exec_start,) = unit["ExecStart"]
    assert "--tls-cert %d/tls.pem --tls-key %d/tls.key" in exec_start
    assert "--allow-plain-http" not in exec_start
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # SIGHUP = rotate
    assert unit["RestartPreventExitStatus"] == ["2"]  # a refused configuration
    analyze, why = find_systemd_analyze()
    need(analyze is not None, why)
    assert analyze is not None
    copy = tmp_path / SERVE_UNIT.name
    script = Path(sys.executable).parent / "ingestd"
    copy.write_text(
        SERVE_UNIT.read_text().replace("ExecStart=/usr/local/bin/ingestd ", f"ExecStart={script} ")
    )
    proc = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=120
    )
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "ingestd" in line]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr
