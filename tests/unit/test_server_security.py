"""`ingestd serve` security: bearer tokens, paths that try to leave the store, body
limits, digest checks, tokens kept out of logs, and where the server may listen."""

from __future__ import annotations

import asyncio
import io
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import ingestd.server.routes as server_routes
import pytest
import structlog
from ingestd.server.app import STATE, serve
from ingestd.server.auth import (
    ServeError,
    TokenAuth,
    check_bind,
    is_loopback,
    load_tokens,
)

from tests.support.server_app import AUTH, TOKEN, item_url, running, sha, slots_for

OTHER_TOKEN = "second-token-9876543210"
WRONG_TOKEN = "wrong-token-not-configured-5555"


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime: a fingerprint of the filesystem."""
    out = {}
    for p in root.rglob("*"):
        if p.is_file() or p.is_symlink():
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


# --- tokens --------------------------------------------------------------------------


V1_REQUESTS = [
    ("PUT", "/v1/datasets/ds"),
    ("HEAD", "/v1/datasets/ds"),
    ("HEAD", f"/v1/blobs/{sha(b'x')}"),
    ("PUT", f"/v1/blobs/{sha(b'x')}"),
    ("POST", "/v1/uploads"),
    ("HEAD", "/v1/uploads/" + "0" * 32),
    ("PATCH", "/v1/uploads/" + "0" * 32),
    ("PUT", "/v1/uploads/" + "0" * 32),
    ("DELETE", "/v1/uploads/" + "0" * 32),
    ("GET", "/v1/datasets/ds/items"),
    ("PUT", "/v1/datasets/ds/items/a"),
    ("DELETE", "/v1/datasets/ds/items/a"),
    ("POST", "/v1/batch"),
    ("GET", "/v1/not-a-route"),
]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": f"Bearer {WRONG_TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer "},
    ],
    ids=["none", "wrong", "longer", "shorter", "basic", "no-scheme", "empty"],
)
async def test_every_v1_route_needs_a_right_token(tmp_path: Path, headers: dict[str, str]) -> None:
    store = tmp_path / "store"
    async with running(store, tokens=(TOKEN, OTHER_TOKEN)) as srv:
        for method, path in V1_REQUESTS:
            status, body, resp_headers = await srv.call(method, path, headers=headers, data=b"x")
            assert status == 401, (method, path)
            assert resp_headers["WWW-Authenticate"] == "Bearer"
            if method != "HEAD":
                assert body["code"] == "unauthorized"
        state = srv.app[STATE]
        assert state.store is not None and state.store.catalog.datasets() == []


async def test_any_configured_token_is_accepted(tmp_path: Path) -> None:
    async with running(tmp_path / "store", tokens=(TOKEN, OTHER_TOKEN)) as srv:
        for auth in (f"Bearer {TOKEN}", f"Bearer {OTHER_TOKEN}", f"bearer {OTHER_TOKEN}"):
            status, _, _ = await srv.call("PUT", "/v1/datasets/ds", headers={"Authorization": auth})
            assert status in (200, 201)


async def test_without_configured_tokens_the_api_is_open(tmp_path: Path) -> None:
    async with running(tmp_path / "store", tokens=()) as srv:
        assert (await srv.call("PUT", "/v1/datasets/ds", headers={}))[0] == 201


async def test_expect_continue_is_refused_before_the_body_is_sent(tmp_path: Path) -> None:
    async with running(tmp_path / "store", max_body=1000) as srv:
        digest = sha(b"x" * 500)

        def head(token: str, length: int) -> bytes:
            return (
                f"PUT /v1/blobs/{digest} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
            ).encode()

        async def first_line(request: bytes) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            try:
                writer.write(request)
                return await asyncio.wait_for(reader.readline(), 5)
            finally:
                writer.close()

        # Without sending a body: the final answer comes at once, not "100 Continue".
        assert (await first_line(head(WRONG_TOKEN, 500))).startswith(b"HTTP/1.1 401")
        assert (await first_line(head(TOKEN, 5000))).startswith(b"HTTP/1.1 413")
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        try:
            writer.write(head(TOKEN, 500))
            assert (await reader.readline()).startswith(b"HTTP/1.1 100")
            await reader.readline()
            writer.write(b"x" * 500)
            assert (await reader.readline()).startswith(b"HTTP/1.1 201")
        finally:
            writer.close()


# --- paths ---------------------------------------------------------------------------

BAD_ITEM_PATHS = [
    "/v1/datasets/ds/items/../../../../../etc/passwd",
    "/v1/datasets/ds/items/%2E%2E/%2E%2E/%2E%2E/escape",
    "/v1/datasets/ds/items/..%2F..%2F..%2Fescape",
    "/v1/datasets/ds/items//etc/passwd",
    "/v1/datasets/ds/items/%2Fetc%2Fpasswd",
    "/v1/datasets/ds/items/a/./b",
    "/v1/datasets/ds/items/a/",
    "/v1/datasets/ds/items/a%00b",
    "/v1/datasets/ds/items/a/b%00.png",
    "/v1/datasets/ds/items/" + "n" * 256,
    "/v1/datasets/ds/items/" + "/".join(["d" * 204] * 4 + ["d" * 205]),  # key of 1025 bytes
    "/v1/datasets/ds/items/" + quote("é" * 128),  # 256 bytes in UTF-8
    "/v1/datasets/ds/items/%C3%28",  # not UTF-8
]


async def test_bad_item_paths_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    store = tmp_path / "srv" / "store"
    outside = tmp_path / "srv" / "outside.txt"
    outside.parent.mkdir(parents=True)
    outside.write_text("keep me")
    data = b"blob"
    async with running(store) as srv:
        await srv.put_blob(data)
        before = tree(tmp_path)
        for raw in BAD_ITEM_PATHS:
            for method in ("PUT", "DELETE"):
                status, body, _ = await srv.call(
                    method, raw, json={"slots": slots_for(("f", data))}
                )
                assert (status, body["code"]) == (400, "bad_path"), (method, raw)
        state = srv.app[STATE]
        assert state.store is not None
        assert state.store.catalog.datasets() == []
        # The longest allowed key and segment still work.
        ok = "/".join(["d" * 204] * 5)  # 1024 bytes with the slashes
        assert (await srv.call("PUT", item_url("ds", *ok.split("/")), json={"slots": []}))[0] == 201
        assert (await srv.call("PUT", item_url("ds", "n" * 255), json={"slots": []}))[0] == 201
    after = tree(tmp_path)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert all(k.startswith("srv/store/catalog.sqlite") for k in changed), changed
    assert outside.read_text() == "keep me"
    assert sorted(os.listdir(tmp_path / "srv")) == ["outside.txt", "store"]


async def test_bad_digests_and_upload_ids_cannot_reach_files(tmp_path: Path) -> None:
    store = tmp_path / "store"
    data = b"precious"
    async with running(store) as srv:
        digest = await srv.put_blob(data)
        before = tree(tmp_path)
        for raw in ("..%2F..%2Fescape", "sha256:..%2F..%2Fescape", "%2E%2E", "sha256%3A%2E%2E"):
            status, _, _ = await srv.call("PUT", f"/v1/blobs/{raw}", data=b"x")
            assert status in (400, 404), raw
            status, _, _ = await srv.call("HEAD", f"/v1/blobs/{raw}")
            assert status in (400, 404), raw
        for raw in ("..", "%2E%2E", "..%2Fblobs", "%2E%2E%2F%2E%2E", "." * 32):
            for method in ("HEAD", "PATCH", "PUT", "DELETE"):
                status, _, _ = await srv.call(
                    method,
                    f"/v1/uploads/{raw}?digest={digest}",
                    data=b"x",
                    headers={**AUTH, "Content-Range": "bytes 0-0/*"},
                )
                assert status == 404, (method, raw)
        assert tree(tmp_path) == before
        assert (await srv.call("HEAD", f"/v1/blobs/{digest}"))[0] == 200
    assert (store / "uploads").is_dir() and (store / "blobs" / "sha256").is_dir()


# --- limits --------------------------------------------------------------------------


async def chunked(data: bytes, piece: int = 300) -> AsyncIterator[bytes]:
    for i in range(0, len(data), piece):
        yield data[i : i + piece]


async def test_oversize_bodies_get_413_and_store_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    big = os.urandom(2000)
    async with running(store, max_body=1000) as srv:
        status, body, _ = await srv.call("PUT", f"/v1/blobs/{sha(big)}", data=big)
        assert (status, body["code"]) == (413, "too_large")
        status, body, _ = await srv.call("PUT", f"/v1/blobs/{sha(big)}", data=chunked(big))
        assert (status, body["code"]) == (413, "too_large")
        assert (await srv.call("HEAD", f"/v1/blobs/{sha(big)}"))[0] == 404
        assert os.listdir(store / "tmp") == []
        # Exactly the limit is fine.
        status, _, _ = await srv.call("PUT", f"/v1/blobs/{sha(big[:1000])}", data=big[:1000])
        assert status == 201

        status, body, _ = await srv.call("POST", "/v1/uploads", json={"size": 2000})
        assert (status, body["code"]) == (413, "too_large")
        _, created, _ = await srv.call("POST", "/v1/uploads")
        uid = created["id"]
        status, body, _ = await srv.call(
            "PATCH",
            f"/v1/uploads/{uid}",
            data=big[:600],
            headers={**AUTH, "Content-Range": "bytes 0-599/*"},
        )
        assert status == 202
        status, body, _ = await srv.call(
            "PATCH",
            f"/v1/uploads/{uid}",
            data=big[600:1200],
            headers={**AUTH, "Content-Range": "bytes 600-1199/*"},
        )
        assert (status, body["code"]) == (413, "too_large")
        status, _, headers = await srv.call("HEAD", f"/v1/uploads/{uid}")
        assert headers["Upload-Offset"] == "600"


async def test_oversize_manifest_gets_413(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_routes, "MANIFEST_MAX", 2000)
    manifest = b'{"slots": [], "metadata": {"pad": "' + b"x" * 3000 + b'"}}'
    async with running(tmp_path / "store") as srv:
        for data in (manifest, chunked(manifest)):
            status, body, _ = await srv.call(
                "PUT",
                item_url("ds", "x"),
                data=data,
                headers={**AUTH, "Content-Type": "application/json"},
            )
            assert (status, body["code"]) == (413, "too_large")
        assert (await srv.call("GET", "/v1/datasets/ds/items"))[0] == 404


async def test_digest_mismatch_is_400_and_leaves_no_blob(tmp_path: Path) -> None:
    store = tmp_path / "store"
    async with running(store) as srv:
        status, body, _ = await srv.call("PUT", f"/v1/blobs/{sha(b'claimed')}", data=b"sent")
        assert (status, body["code"]) == (400, "digest_mismatch")
    assert not [p for p in (store / "blobs").rglob("*") if p.is_file()]
    assert os.listdir(store / "tmp") == []


# --- logs ----------------------------------------------------------------------------


async def exercise(srv: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests that log: good and bad tokens, an error, an internal failure."""
    await srv.call("PUT", "/v1/datasets/ds")
    await srv.call("PUT", "/v1/datasets/ds", headers={"Authorization": f"Bearer {WRONG_TOKEN}"})
    await srv.call("PUT", f"/v1/blobs/{sha(b'a')}", data=b"b")
    state = srv.app[STATE]

    def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("catalog exploded")

    monkeypatch.setattr(state.store.catalog, "has_dataset", broken)
    status, body, _ = await srv.call("HEAD", "/v1/datasets/ds")
    assert status == 500
    status, body, _ = await srv.call("GET", "/v1/datasets/ds/items")
    assert (status, body["code"]) == (500, "internal")


async def test_tokens_never_reach_the_logs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # 1. structlog's default console output (with its tracebacks), on stdout.
    async with running(tmp_path / "a") as srv:
        await exercise(srv, monkeypatch)
    console = capsys.readouterr()
    # 2. JSON lines, as a service logs.
    buf = io.StringIO()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(file=buf),
    )
    try:
        with structlog.testing.capture_logs() as captured:
            async with running(tmp_path / "b") as srv:
                await exercise(srv, monkeypatch)
        async with running(tmp_path / "c") as srv:
            await exercise(srv, monkeypatch)
    finally:
        structlog.reset_defaults()
    texts = [console.out, console.err, caplog.text, buf.getvalue(), repr(captured)]
    for text in texts:
        assert TOKEN not in text and WRONG_TOKEN not in text
    # The log does say what happened.
    requests = [e for e in captured if e["event"] == "request"]
    assert {(e["method"], e["route"], e["status"]) for e in requests} >= {
        ("PUT", "/v1/datasets/{dataset}", 201),
        ("PUT", "/v1/datasets/{dataset}", 401),
        ("PUT", "/v1/blobs/{digest}", 400),
        ("GET", "/v1/datasets/{dataset}/items", 500),
    }
    assert all(isinstance(e["duration_ms"], float) for e in requests)
    failures = [e for e in captured if e["event"] == "request_failed"]
    assert failures and "catalog exploded" in failures[0]["error"]
    assert "catalog exploded" in buf.getvalue() and "Authorization" not in buf.getvalue()


# --- where the server listens ----------------------------------------------------------


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.2") and is_loopback("::1")
    assert is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("")
    assert not is_loopback("10.1.2.3") and not is_loopback("192.168.0.10")


def test_non_loopback_bind_needs_a_token() -> None:
    check_bind("127.0.0.1", [])
    check_bind("0.0.0.0", [TOKEN])
    for host in ("0.0.0.0", "", "::", "10.0.0.5"):
        with pytest.raises(ServeError, match="without a token"):
            check_bind(host, [])


async def test_serve_refuses_before_binding_or_touching_the_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with pytest.raises(ServeError):
        await serve(store, "0.0.0.0", 0, [])
    assert not store.exists()


async def test_serve_defaults_to_loopback(tmp_path: Path) -> None:
    bound: list[tuple[str, int]] = []
    task = asyncio.create_task(
        serve(tmp_path / "store", port=0, ready=lambda h, p: bound.append((h, p)))
    )
    try:
        for _ in range(200):
            if bound or task.done():
                break
            await asyncio.sleep(0.02)
        assert bound and bound[0][0] == "127.0.0.1"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_tokens_from_file_and_environment(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"# team tokens\n{TOKEN}\n\n  {OTHER_TOKEN}  # lab pc\n")
    env = f"env-one, env-two\nenv-three {TOKEN}"
    assert load_tokens(str(f), env) == [TOKEN, OTHER_TOKEN, "env-one", "env-two", "env-three"]
    assert load_tokens(None, None) == [] and load_tokens(None, " , ") == []
    with pytest.raises(ServeError, match="cannot read token file"):
        load_tokens(tmp_path / "missing", None)


def test_token_auth_hides_tokens_and_refuses_odd_ones() -> None:
    auth = TokenAuth([TOKEN])
    assert TOKEN not in repr(auth) and TOKEN not in str(auth)
    assert auth.allows(f"Bearer {TOKEN}") and not auth.allows(None)
    assert not auth.allows("Bearer \udcff")
    with pytest.raises(ServeError):
        TokenAuth(["has space"])
