"""The http sink over TLS against the real server app (in-process, on a loopback TLS
socket) with a CA made in the test: a private CA and mutual TLS work; a wrong CA, an
expired certificate and a host-name mismatch are named problems that are retried like
an outage (one probe at a time, `reachable` False, `problem` set, condition "tls"),
send nothing, and clear once the certificate is fixed."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ingestd.config import HttpBackend
from ingestd.core.errors import RetriableError
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
from ingestd.server.app import make_app
from ingestd.server.tls import ServerTls
from ingestd.sinks.base import PutResult
from ingestd.sinks.http import HttpSink
from ingestd.store.catalog import Catalog

from tests.support.tls import CA, Handshakes, Issued, listen_tls
from tests.support.wait import wait_until

TOKEN = "tok-tls-5b1e0c"
TOKEN_ENV = "INGESTD_TLS_TEST_TOKEN"
MiB = 1 << 20


def item_of(path: Path, name: str) -> ItemPayload:
    data = path.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    f = FilePayload(path.name, str(path), len(data), digest)
    return ItemPayload("/", name, (SlotPayload("0", "file", (f,)),), {})


@dataclass
class Tls:
    ca: CA
    pair: Issued
    tls: ServerTls
    handshakes: Handshakes
    port: int
    store: Path


@pytest.fixture(autouse=True)
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Tls]:
    ca = CA(tmp_path / "ca")
    pair = ca.issue("server", ["localhost", "127.0.0.1"])
    tls = ServerTls(pair.cert, pair.key)
    handshakes = Handshakes(tls.context)
    store = tmp_path / "store"
    runner, port = await listen_tls(make_app(store, [TOKEN]), tls.context)
    try:
        yield Tls(ca, pair, tls, handshakes, port, store)
    finally:
        await runner.cleanup()


def served(store: Path) -> list[str]:
    """The keys of dataset ds in a server's store (read from its catalog file)."""
    if not (store / "catalog.sqlite").exists():
        return []
    catalog = Catalog(store / "catalog.sqlite")
    try:
        return [i["key"] for i in catalog.list_items("ds")]
    finally:
        catalog.close()


def sink_for(url: str, **backend: object) -> HttpSink:
    b = HttpBackend.model_validate(
        {"kind": "http", "url": url, "token_env": TOKEN_ENV, **backend},
        context={"base_dir": Path("/")},
    )
    sink = HttpSink.from_backend(b, workers=8)
    sink.max_attempts = 3
    sink.backoff_base = 0.01  # probes milliseconds apart: the shape is what is tested
    sink.backoff_cap = 0.05
    return sink


def files(tmp_path: Path, n: int, size: int = 2048) -> list[Path]:
    out = []
    for i in range(n):
        p = tmp_path / "src" / f"{i:03}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"{i}\n".encode() + os.urandom(size))
        out.append(p)
    return out


async def test_private_ca_small_and_big_items(server: Tls, tmp_path: Path) -> None:
    sink = sink_for(f"https://localhost:{server.port}", ca_file=str(server.ca.pem))
    sink.blobs.resumable_threshold = 1 * MiB  # the big one goes as a resumable upload
    sink.blobs.chunk_size = 512 * 1024
    small = files(tmp_path, 20)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * MiB))
    try:
        await sink.ensure_dataset("ds")
        results = [await sink.put_item("ds", item_of(p, p.name)) for p in small[:1]]
        results += await asyncio.gather(*(sink.put_item("ds", item_of(p, p.name)) for p in small))
        results.append(await sink.put_item("ds", item_of(big, "big.bin")))
    finally:
        await sink.close()
    assert all(isinstance(r, PutResult) for r in results)
    assert len(served(server.store)) == 21
    assert server.handshakes.count >= 1


@pytest.mark.parametrize("problem", ["wrong CA", "expired", "host name mismatch"])
async def test_certificate_problems_are_named_outages_that_send_nothing(
    server: Tls, tmp_path: Path, problem: str
) -> None:
    ca_file = server.ca.pem
    if problem == "wrong CA":
        ca_file = CA(tmp_path / "other", "another CA").pem
        expected = "TLS: certificate not trusted for localhost"
    elif problem == "expired":
        old = server.ca.issue("old", ["localhost"], expired=True, folder=tmp_path / "old")
        shutil.copy(old.cert, server.pair.cert)
        shutil.copy(old.key, server.pair.key)
        assert server.tls.reload()
        expected = "TLS: certificate for localhost expired"
    else:  # the certificate names another host than the URL
        shutil.copy(
            server.ca.issue("named", ["ingest.example"], folder=tmp_path / "n").cert,
            server.pair.cert,
        )
        named = tmp_path / "n" / "named.key"
        shutil.copy(named, server.pair.key)
        assert server.tls.reload()
        expected = "TLS: host name mismatch"
    sink = sink_for(f"https://localhost:{server.port}", ca_file=str(ca_file))
    small = files(tmp_path, 8)
    try:
        outcomes = await asyncio.gather(
            *(sink.put_item("ds", item_of(p, p.name)) for p in small), return_exceptions=True
        )
        assert all(isinstance(e, RetriableError) for e in outcomes), outcomes
        assert all(getattr(e, "condition", None) == "tls" for e in outcomes), outcomes
        assert all(expected in str(e) for e in outcomes), outcomes[0]
        assert not sink.reachable
        assert sink.problem is not None and expected in sink.problem
        assert served(server.store) == []
        # 8 items x 3 attempts each would be 24 handshakes without the gate: after the
        # first wave, one probe at a time.
        assert 1 <= server.handshakes.count <= 8 + 3, server.handshakes.count
    finally:
        await sink.close()


async def test_a_fixed_certificate_ends_the_outage(server: Tls, tmp_path: Path) -> None:
    """Expired, then renewed on the server (reload): the next probe goes through."""
    good = server.ca.issue("good", ["localhost"], folder=tmp_path / "good")
    old = server.ca.issue("old", ["localhost"], expired=True, folder=tmp_path / "old")
    shutil.copy(old.cert, server.pair.cert)
    shutil.copy(old.key, server.pair.key)
    assert server.tls.reload()
    sink = sink_for(f"https://localhost:{server.port}", ca_file=str(server.ca.pem))
    (p,) = files(tmp_path, 1)
    try:
        with pytest.raises(RetriableError, match="expired"):
            await sink.put_item("ds", item_of(p, p.name))
        assert sink.problem is not None
        shutil.copy(good.cert, server.pair.cert)
        shutil.copy(good.key, server.pair.key)
        assert server.tls.reload()

        async def put() -> PutResult | None:
            # As the sync pool does while held: the item again until it goes through
            # (before the gate's next probe, an attempt fails at once, sending nothing).
            try:
                return await sink.put_item("ds", item_of(p, p.name))
            except RetriableError as e:
                assert getattr(e, "condition", None) == "tls", e
                return None

        result = await wait_until(put, 10, what="the renewed certificate to be taken")
    finally:
        await sink.close()
    assert isinstance(result, PutResult) and sink.reachable and sink.problem is None
    assert served(server.store) == ["/000.bin"]


async def test_mutual_tls(tmp_path: Path) -> None:
    ca = CA(tmp_path / "ca")
    clients = CA(tmp_path / "clients", "client CA")
    pair = ca.issue("server", ["localhost"])
    tls = ServerTls(pair.cert, pair.key, clients.pem)
    me = clients.issue("daemon", ["daemon-1"], client=True)
    stranger = CA(tmp_path / "x", "stranger CA").issue("daemon", ["daemon-1"], client=True)
    runner, port = await listen_tls(make_app(tmp_path / "store", []), tls.context)
    url = f"https://localhost:{port}"
    p1, p2 = files(tmp_path, 2)
    try:
        ok = sink_for(url, ca_file=str(ca.pem), client_cert=str(me.cert), client_key=str(me.key))
        try:
            assert isinstance(await ok.put_item("ds", item_of(p1, "a")), PutResult)
        finally:
            await ok.close()
        for bad in (
            sink_for(url, ca_file=str(ca.pem)),
            sink_for(
                url,
                ca_file=str(ca.pem),
                client_cert=str(stranger.cert),
                client_key=str(stranger.key),
            ),
        ):
            try:
                with pytest.raises(RetriableError):
                    await bad.put_item("ds", item_of(p2, "b"))
            finally:
                await bad.close()
    finally:
        await runner.cleanup()
    assert served(tmp_path / "store") == ["/a"]


def test_plain_http_urls_need_no_tls_settings() -> None:
    sink = HttpSink.from_backend(HttpBackend(kind="http", url="http://127.0.0.1:1"))
    assert sink.client.ssl_context is None  # type: ignore[attr-defined]
