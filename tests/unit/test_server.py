"""`ingestd serve` over real HTTP on 127.0.0.1: every route of API.md, resumable uploads
across disconnects, restarts and SIGKILL, items and paging, metrics."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from ingestd.server.app import STATE
from ingestd.store import Store

from tests.support.server_app import (
    AUTH,
    TOKEN,
    Running,
    batch_body,
    batch_item,
    item_url,
    running,
    sha,
    slots_for,
)
from tests.support.wait import wait_until

REPO = Path(__file__).resolve().parents[2]


async def raw_request(
    port: int, head: bytes, body: bytes = b"", *, close_early: bool = False
) -> bytes:
    """Send bytes on a fresh connection; with close_early, hang up without reading."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        if close_early:
            await asyncio.sleep(0.1)
            return b""
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def metric(text: bytes, series: str) -> float:
    """The value of one series in Prometheus text output."""
    for line in text.decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    raise AssertionError(f"{series} not in metrics")


def temps(store: Path) -> list[str]:
    return os.listdir(store / "tmp")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


# --- service -------------------------------------------------------------------------


async def test_healthz_and_metrics_need_no_token(store: Path) -> None:
    async with running(store) as srv:
        status, body, _ = await srv.call("GET", "/healthz", headers={})
        assert (status, body) == (200, {"ok": True})
        status, _, headers = await srv.call("GET", "/metrics", headers={})
        assert status == 200 and headers["Content-Type"].startswith("text/plain")


async def test_metrics_count_requests_bytes_errors_and_latency(store: Path) -> None:
    async with running(store) as srv:
        await srv.put_blob(b"x" * 1000)
        await srv.call("PUT", f"/v1/blobs/{sha(b'y')}", data=b"z")  # mismatch
        await srv.call("HEAD", "/v1/datasets/none")
        _, text, _ = await srv.call("GET", "/metrics")
    text = text.decode()
    assert (
        'ingestd_serve_requests_total{method="PUT",route="/v1/blobs/{digest}",status="201"} 1.0'
        in text
    )
    assert (
        'ingestd_serve_requests_total{method="HEAD",route="/v1/datasets/{dataset}",status="404"} 1.0'
        in text
    )
    assert 'ingestd_serve_bytes_received_total{route="/v1/blobs/{digest}"} 1001.0' in text
    assert 'ingestd_serve_errors_total{code="digest_mismatch"} 1.0' in text
    assert (
        'ingestd_serve_request_seconds_count{method="PUT",route="/v1/blobs/{digest}"} 2.0' in text
    )


async def test_each_app_has_its_own_metrics(store: Path, tmp_path: Path) -> None:
    async with running(store) as a, running(tmp_path / "other") as b:
        await a.call("PUT", "/v1/datasets/ds")
        _, text, _ = await b.call("GET", "/metrics")
        assert b"/v1/datasets/{dataset}" not in text


async def test_unknown_route_and_method_give_the_json_error_shape(store: Path) -> None:
    async with running(store) as srv:
        status, body, _ = await srv.call("GET", "/v1/nothing-here")
        assert status == 404 and body["code"] == "not_found" and "error" in body
        status, body, headers = await srv.call("POST", f"/v1/blobs/{sha(b'')}")
        assert status == 405 and body["code"] == "method_not_allowed"
        assert "PUT" in headers["Allow"]


# --- datasets ------------------------------------------------------------------------


async def test_datasets_create_idempotently_and_exist(store: Path) -> None:
    async with running(store) as srv:
        assert (await srv.call("HEAD", "/v1/datasets/photos"))[0] == 404
        status, body, _ = await srv.call("PUT", "/v1/datasets/photos")
        assert (status, body) == (201, {"dataset": "photos", "created": True})
        status, body, _ = await srv.call("PUT", "/v1/datasets/photos")
        assert (status, body) == (200, {"dataset": "photos", "created": False})
        assert (await srv.call("HEAD", "/v1/datasets/photos"))[0] == 200
        # Any characters but '/' and NUL, percent-encoded.
        name = "scans 2024 #1 é"
        assert (await srv.call("PUT", f"/v1/datasets/{quote(name, safe='')}"))[0] == 201
    with Store.open(store) as s:
        assert s.catalog.datasets() == ["photos", name]


@pytest.mark.parametrize("raw", ["%2E%2E", "%2E", "a%2Fb", "a%00b", "x" * 129, "%FF"])
async def test_bad_dataset_names(store: Path, raw: str) -> None:
    async with running(store) as srv:
        status, body, _ = await srv.call("PUT", f"/v1/datasets/{raw}")
        assert status == 400 and body["code"] == "bad_name"
        status, body, _ = await srv.call("PUT", f"/v1/datasets/{raw}/items/x", json={"slots": []})
        assert status == 400 and body["code"] == "bad_name"


# --- blobs ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 10, 3 * 1024 * 1024 + 5])
async def test_blob_put_verifies_and_head_reports_the_size(store: Path, size: int) -> None:
    data = os.urandom(size)
    digest = sha(data)
    async with running(store) as srv:
        assert (await srv.call("HEAD", f"/v1/blobs/{digest}"))[0] == 404
        status, body, _ = await srv.call("PUT", f"/v1/blobs/{digest}", data=data)
        assert (status, body) == (201, {"digest": digest, "size": size, "created": True})
        status, _, headers = await srv.call("HEAD", f"/v1/blobs/{digest}")
        assert status == 200 and headers["Content-Length"] == str(size)
        status, body, _ = await srv.call("PUT", f"/v1/blobs/{digest}", data=data)
        assert (status, body) == (200, {"digest": digest, "size": size, "created": False})
        assert temps(store) == []
    with Store.open(store) as s:
        assert s.blobs.path(digest).read_bytes() == data


async def test_blob_put_accepts_a_chunked_body(store: Path) -> None:
    parts = [os.urandom(700_000) for _ in range(5)]
    data = b"".join(parts)

    async def gen() -> AsyncIterator[bytes]:
        for p in parts:
            yield p

    async with running(store) as srv:
        status, body, _ = await srv.call("PUT", f"/v1/blobs/{sha(data)}", data=gen())
        assert status == 201 and body["size"] == len(data)
    with Store.open(store) as s:
        assert s.blobs.path(sha(data)).read_bytes() == data


@pytest.mark.parametrize("size", [10, 3 * 1024 * 1024])
async def test_blob_digest_mismatch_stores_nothing(store: Path, size: int) -> None:
    data = os.urandom(size)
    claimed = sha(b"something else")
    async with running(store) as srv:
        status, body, _ = await srv.call("PUT", f"/v1/blobs/{claimed}", data=data)
        assert status == 400
        assert body["code"] == "digest_mismatch"
        assert (body["expected"], body["actual"]) == (claimed, sha(data))
        assert (await srv.call("HEAD", f"/v1/blobs/{claimed}"))[0] == 404
        assert (await srv.call("HEAD", f"/v1/blobs/{sha(data)}"))[0] == 404
        assert temps(store) == []
    assert not [p for p in (store / "blobs").rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    "digest",
    ["sha256:" + "A" * 64, "sha256:" + "a" * 63, "md5:" + "a" * 32, "a" * 64, "sha256:..%2Fx"],
)
async def test_malformed_digests_are_refused(store: Path, digest: str) -> None:
    async with running(store) as srv:
        for method in ("HEAD", "PUT"):
            status, body, _ = await srv.call(method, f"/v1/blobs/{digest}", data=b"x")
            assert status == 400
            if method == "PUT":
                assert body["code"] == "bad_digest"


async def test_client_gone_mid_blob_leaves_no_blob_and_no_temp(store: Path) -> None:
    data = os.urandom(3 << 20)
    async with running(store) as srv:
        head = (
            f"PUT /v1/blobs/{sha(data)} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        await raw_request(srv.port, head, data[: 2 << 20], close_early=True)

        async def settled() -> bool:
            return temps(store) == []

        await wait_until(settled)
        assert (await srv.call("HEAD", f"/v1/blobs/{sha(data)}"))[0] == 404


# --- resumable uploads ---------------------------------------------------------------


async def start_upload(srv: Running, **declared: Any) -> str:
    status, body, headers = await srv.call("POST", "/v1/uploads", json=declared or None)
    assert status == 201 and body["offset"] == 0
    assert headers["Location"] == f"/v1/uploads/{body['id']}"
    return str(body["id"])


async def patch(srv: Running, upload_id: str, start: int, chunk: bytes) -> tuple[int, Any]:
    status, body, headers = await srv.call(
        "PATCH",
        f"/v1/uploads/{upload_id}",
        data=chunk,
        headers={**AUTH, "Content-Range": f"bytes {start}-{start + len(chunk) - 1}/*"},
    )
    if status == 202:
        assert headers["Upload-Offset"] == str(body["offset"])
    return status, body


async def offset_of(srv: Running, upload_id: str) -> int:
    status, _, headers = await srv.call("HEAD", f"/v1/uploads/{upload_id}")
    assert status == 200
    return int(headers["Upload-Offset"])


async def test_upload_in_three_patches_then_complete(store: Path) -> None:
    data = os.urandom(5_000_000)
    a, b = 1_000_000, 3_500_000
    async with running(store) as srv:
        uid = await start_upload(srv)
        assert await offset_of(srv, uid) == 0
        assert await patch(srv, uid, 0, data[:a]) == (202, {"offset": a})
        assert await offset_of(srv, uid) == a
        # A retry of a chunk already held, and a gap: both 416 with the real offset.
        status, body = await patch(srv, uid, 0, data[:a])
        assert (status, body["code"], body["offset"]) == (416, "bad_offset", a)
        status, body = await patch(srv, uid, a + 1, data[a + 1 : b])
        assert (status, body["offset"]) == (416, a)
        assert await patch(srv, uid, a, data[a:b]) == (202, {"offset": b})
        assert await patch(srv, uid, b, data[b:]) == (202, {"offset": len(data)})
        status, body, _ = await srv.call("PUT", f"/v1/uploads/{uid}?digest={sha(data)}")
        assert (status, body) == (201, {"digest": sha(data), "size": len(data), "created": True})
        assert (await srv.call("HEAD", f"/v1/uploads/{uid}"))[0] == 404
        status, _, headers = await srv.call("HEAD", f"/v1/blobs/{sha(data)}")
        assert status == 200 and headers["Content-Length"] == str(len(data))
    assert os.listdir(store / "uploads") == []
    with Store.open(store) as s:
        assert s.blobs.path(sha(data)).read_bytes() == data


async def test_upload_final_chunk_in_the_completing_put(store: Path) -> None:
    data = os.urandom(300_000)
    async with running(store) as srv:
        uid = await start_upload(srv, digest=sha(data), size=len(data))
        await patch(srv, uid, 0, data[:100_000])
        status, body, _ = await srv.call(
            "PUT",
            f"/v1/uploads/{uid}?digest={sha(data)}",
            data=data[100_000:],
            headers={**AUTH, "Content-Range": f"bytes 100000-{len(data) - 1}/{len(data)}"},
        )
        assert status == 201 and body["size"] == len(data)


async def test_upload_of_a_blob_already_stored(store: Path) -> None:
    data = b"already here"
    async with running(store) as srv:
        await srv.put_blob(data)
        uid = await start_upload(srv)
        await patch(srv, uid, 0, data)
        status, body, _ = await srv.call("PUT", f"/v1/uploads/{uid}?digest={sha(data)}")
        assert (status, body["created"]) == (201, False)
    assert os.listdir(store / "uploads") == []


async def test_upload_digest_mismatch_discards_the_upload(store: Path) -> None:
    async with running(store) as srv:
        uid = await start_upload(srv)
        await patch(srv, uid, 0, b"abc")
        wrong = sha(b"abd")
        status, body, _ = await srv.call("PUT", f"/v1/uploads/{uid}?digest={wrong}")
        assert status == 400 and body["code"] == "digest_mismatch"
        assert (body["expected"], body["actual"]) == (wrong, sha(b"abc"))
        assert (await srv.call("HEAD", f"/v1/uploads/{uid}"))[0] == 404
        assert (await srv.call("HEAD", f"/v1/blobs/{wrong}"))[0] == 404
    assert os.listdir(store / "uploads") == []


async def test_upload_errors(store: Path) -> None:
    async with running(store) as srv:
        uid = await start_upload(srv)
        # No Content-Range, a malformed one, one that disagrees with the body.
        status, body, _ = await srv.call("PATCH", f"/v1/uploads/{uid}", data=b"abc")
        assert (status, body["code"]) == (400, "bad_range")
        status, body, _ = await srv.call(
            "PATCH", f"/v1/uploads/{uid}", data=b"abc", headers={**AUTH, "Content-Range": "0-2"}
        )
        assert (status, body["code"]) == (400, "bad_range")
        status, body, _ = await srv.call(
            "PATCH",
            f"/v1/uploads/{uid}",
            data=b"abc",
            headers={**AUTH, "Content-Range": "bytes 0-9/*"},
        )
        assert (status, body["code"]) == (400, "bad_range")
        assert await offset_of(srv, uid) == 0
        # Completing without any digest, or with a body but no Content-Range.
        status, body, _ = await srv.call("PUT", f"/v1/uploads/{uid}")
        assert (status, body["code"]) == (400, "bad_digest")
        status, body, _ = await srv.call("PUT", f"/v1/uploads/{uid}?digest={sha(b'x')}", data=b"x")
        assert (status, body["code"]) == (400, "bad_range")
        # Unknown ids, including ones shaped like paths.
        for bad in ("0" * 32, "nope", "..", "%2E%2E%2Fblobs"):
            assert (await srv.call("HEAD", f"/v1/uploads/{bad}"))[0] == 404
            status, body = await patch(srv, bad, 0, b"x")
            assert (status, body["code"]) == (404, "not_found")
        status, body, _ = await srv.call("POST", "/v1/uploads", json={"digest": "md5:x"})
        assert (status, body["code"]) == (400, "bad_digest")


async def test_upload_delete(store: Path) -> None:
    async with running(store) as srv:
        uid = await start_upload(srv)
        await patch(srv, uid, 0, b"abc")
        assert (await srv.call("DELETE", f"/v1/uploads/{uid}"))[0] == 204
        assert (await srv.call("HEAD", f"/v1/uploads/{uid}"))[0] == 404
        assert (await srv.call("DELETE", f"/v1/uploads/{uid}"))[0] == 404
    assert os.listdir(store / "uploads") == []


@pytest.mark.parametrize("cancel_on_disconnect", [False, True])
async def test_interrupted_patch_keeps_what_arrived_and_resumes(
    store: Path, cancel_on_disconnect: bool
) -> None:
    data = os.urandom(6_000_000)
    sent = 2_500_000
    async with running(store, cancel_on_disconnect=cancel_on_disconnect) as srv:
        uid = await start_upload(srv)
        head = (
            f"PATCH /v1/uploads/{uid} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Range: bytes 0-{len(data) - 1}/*\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode()
        await raw_request(srv.port, head, data[:sent], close_early=True)

        async def all_held() -> bool:
            return await offset_of(srv, uid) == sent

        await wait_until(all_held)
        assert await patch(srv, uid, sent, data[sent:]) == (202, {"offset": len(data)})
        status, body, _ = await srv.call("PUT", f"/v1/uploads/{uid}?digest={sha(data)}")
        assert status == 201 and body["size"] == len(data)
        _, text, _ = await srv.call("GET", "/metrics")
    # The interrupted bytes were received once and not sent again.
    received = metric(text, 'ingestd_serve_bytes_received_total{route="/v1/uploads/{upload_id}"}')
    assert received == len(data)


async def test_upload_resumes_after_the_server_is_recreated(store: Path) -> None:
    data = os.urandom(3_000_000)
    async with running(store) as srv:
        uid = await start_upload(srv)
        await patch(srv, uid, 0, data[:1_000_000])
        await patch(srv, uid, 1_000_000, data[1_000_000:2_000_000])
    # Bytes past the durable offset (a write the crash tore) must not count.
    with open(store / "uploads" / uid / "data", "ab") as f:
        f.write(b"torn write")
    async with running(store) as srv:
        assert await offset_of(srv, uid) == 2_000_000
        status, body = await patch(srv, uid, 2_000_000, data[2_000_000:])
        assert (status, body) == (202, {"offset": len(data)})
        status, body, _ = await srv.call("PUT", f"/v1/uploads/{uid}?digest={sha(data)}")
        assert status == 201, body
    with Store.open(store) as s:
        assert s.blobs.path(sha(data)).read_bytes() == data


async def test_completing_right_after_a_restart_ignores_a_torn_tail(store: Path) -> None:
    data = os.urandom(100_000)
    async with running(store) as srv:
        uid = await start_upload(srv)
        await patch(srv, uid, 0, data)
    with open(store / "uploads" / uid / "data", "ab") as f:
        f.write(b"junk")
    async with running(store) as srv:
        status, body, _ = await srv.call("PUT", f"/v1/uploads/{uid}?digest={sha(data)}")
        assert (status, body["size"]) == (201, len(data))


async def test_idle_uploads_expire(store: Path) -> None:
    async with running(store) as srv:
        uid = await start_upload(srv)
        old = time.time() - 25 * 3600
        os.utime(store / "uploads" / uid / "offset", (old, old))
        uploads = srv.app[STATE].uploads
        assert uploads is not None
        assert await uploads.expire(max_idle=3600) == 0  # touched just now, in this process
        uploads._live.clear()  # as after a restart
        assert await uploads.expire(max_idle=3600) == 1
        assert (await srv.call("HEAD", f"/v1/uploads/{uid}"))[0] == 404


SERVER_SCRIPT = """
import asyncio, sys
from pathlib import Path
import ingestd.server.uploads as uploads
from ingestd.runtime.logs import setup
from ingestd.server.app import serve
setup("info", "json")  # logs to stderr; stdout carries only the port
uploads.CHECKPOINT = int(sys.argv[2])
asyncio.run(serve(Path(sys.argv[1]), "127.0.0.1", 0, [],
                  ready=lambda host, port: print(port, flush=True)))
"""


def start_server_process(store: Path, checkpoint: int) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(store), str(checkpoint)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip().isdigit(), f"server did not start: {line!r}"
    return proc, int(line)


async def test_upload_resumes_after_the_server_is_sigkilled_mid_patch(store: Path) -> None:
    checkpoint = 4 << 20
    data = os.urandom(12 << 20)
    sent = 10 << 20
    proc, port = start_server_process(store, checkpoint)
    try:
        async with aiohttp.ClientSession() as session:
            srv = Running(web.Application(), session, port, store)
            uid = await start_upload(srv)
            head = (
                f"PATCH /v1/uploads/{uid} HTTP/1.1\r\nHost: x\r\n"
                f"Content-Range: bytes 0-{len(data) - 1}/*\r\nContent-Length: {len(data)}\r\n\r\n"
            ).encode()
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + data[:sent])
            await writer.drain()
            data_file = store / "uploads" / uid / "data"

            async def written() -> bool:
                # The server keeps up to ~1 MiB in its buffer before writing it.
                return data_file.stat().st_size >= sent - (2 << 20)

            await wait_until(written)
            # Mid-PATCH, the connection still open: bytes past the last checkpoint are
            # in the file but not vouched for.
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            writer.close()
            on_disk = data_file.stat().st_size
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc, port = start_server_process(store, checkpoint)
    try:
        async with aiohttp.ClientSession() as session:
            srv = Running(web.Application(), session, port, store)
            offset = await offset_of(srv, uid)
            # Resumes from the last checkpoint before the kill, not from zero and not
            # from the end of the file (which held bytes never fsynced and acknowledged).
            assert checkpoint <= offset <= on_disk and on_disk - offset < checkpoint + (2 << 20)
            assert await patch(srv, uid, offset, data[offset:]) == (202, {"offset": len(data)})
            status, body, _ = await srv.call("PUT", f"/v1/uploads/{uid}?digest={sha(data)}")
            assert (status, body["size"]) == (201, len(data))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0  # SIGTERM stops the server cleanly


async def test_streaming_keeps_memory_small(store: Path) -> None:
    piece = os.urandom(1 << 20)
    n = 48
    h = hashlib.sha256()
    for _ in range(n):
        h.update(piece)
    digest = "sha256:" + h.hexdigest()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(n):
            yield piece

    async with running(store) as srv:
        tracemalloc.start()
        try:
            status, _, _ = await srv.call("PUT", f"/v1/blobs/{digest}", data=body())
            uid = await start_upload(srv)
            await srv.call(
                "PATCH",
                f"/v1/uploads/{uid}",
                data=body(),
                headers={**AUTH, "Content-Range": f"bytes 0-{n * len(piece) - 1}/*"},
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert status == 201
    # Two 48 MiB bodies went through; client and server together held a few buffers.
    assert peak < 12 << 20, peak


# --- items ---------------------------------------------------------------------------


async def test_item_upsert_unchanged_changed_and_delete(store: Path) -> None:
    a, b = b"image a", b"image b"
    async with running(store) as srv:
        await srv.put_blob(a)
        await srv.put_blob(b)
        url = item_url("ds", "cams", "north", "a.jpg")
        manifest = {"slots": slots_for(("a.jpg", a)), "metadata": {"camera": "north"}}
        status, body, _ = await srv.call("PUT", url, json=manifest)
        expect = {"key": "/cams/north/a.jpg", "path": "/cams/north", "name": "a.jpg"}
        assert (status, body) == (201, {**expect, "version": 1, "changed": True})
        status, body, _ = await srv.call("PUT", url, json=manifest)
        assert (status, body) == (200, {**expect, "version": 1, "changed": False})
        manifest["slots"] = slots_for(("a.jpg", b))
        status, body, _ = await srv.call("PUT", url, json=manifest)
        assert (status, body) == (200, {**expect, "version": 2, "changed": True})
        status, body, _ = await srv.call("GET", "/v1/datasets/ds/items")
        assert body == {
            "items": [
                {
                    **expect,
                    "version": 2,
                    "slots": manifest["slots"],
                    "metadata": {"camera": "north"},
                }
            ],
            "next_cursor": None,
        }
        assert (await srv.call("DELETE", url))[0] == 204
        status, body, _ = await srv.call("DELETE", url)
        assert (status, body["code"]) == (404, "not_found")
        status, body, _ = await srv.call("GET", "/v1/datasets/ds/items")
        assert body == {"items": [], "next_cursor": None}


async def test_item_at_the_root_with_remote_urls_and_extra_slot_keys(store: Path) -> None:
    frame = b"frame"
    async with running(store) as srv:
        await srv.put_blob(frame)
        slots = [
            {
                "name": "v",
                "type": "frames",
                "timestamps": [0.0],
                "files": [{"name": "0.jpg", "digest": sha(frame), "size": len(frame)}],
            },
            {"name": "r", "type": "image", "files": [{"name": "x.png", "url": "s3://b/x.png"}]},
        ]
        status, body, _ = await srv.call("PUT", item_url("ds", "clip"), json={"slots": slots})
        assert status == 201 and (body["key"], body["path"]) == ("/clip", "/")
    with Store.open(store) as s:
        item = s.catalog.get_item("ds", "/", "clip")
        assert item is not None and item["slots"] == slots and item["metadata"] == {}


async def test_item_names_with_odd_characters_round_trip(store: Path) -> None:
    data = b"x"
    names = ["with space.png", "hash#1.png", "new\nline.png", "ünï 🙂.png", "100%.png", "q?.png"]
    async with running(store) as srv:
        await srv.put_blob(data)
        for name in names:
            status, body, _ = await srv.call(
                "PUT", item_url("ds", "dir one", name), json={"slots": slots_for((name, data))}
            )
            assert status == 201 and body["name"] == name, body
        _, body, _ = await srv.call("GET", "/v1/datasets/ds/items")
    assert sorted(i["name"] for i in body["items"]) == sorted(names)
    assert {i["path"] for i in body["items"]} == {"/dir one"}


async def test_item_with_missing_blobs_is_refused_naming_them(store: Path) -> None:
    held, gone1, gone2 = b"held", b"gone 1", b"gone 2"
    async with running(store) as srv:
        await srv.put_blob(held)
        manifest = {"slots": slots_for(("a", held), ("b", gone1), ("c", gone2))}
        status, body, _ = await srv.call("PUT", item_url("ds", "x"), json=manifest)
        assert status == 409 and body["code"] == "missing_blobs"
        assert body["missing"] == sorted([sha(gone1), sha(gone2)])
        status, _, _ = await srv.call("GET", "/v1/datasets/ds/items")
        # Nothing was written, not even the dataset.
        assert status == 404


async def test_item_size_must_match_the_stored_blob(store: Path) -> None:
    data = b"12345"
    async with running(store) as srv:
        await srv.put_blob(data)
        manifest = {
            "slots": [
                {
                    "name": "0",
                    "type": "file",
                    "files": [{"name": "f", "digest": sha(data), "size": 4}],
                }
            ]
        }
        status, body, _ = await srv.call("PUT", item_url("ds", "x"), json=manifest)
        assert (status, body["code"]) == (400, "size_mismatch")


@pytest.mark.parametrize(
    "manifest",
    [
        [],
        {"slots": "x"},
        {"slots": [], "metadata": []},
        {"slots": [{"name": "0", "type": "hologram", "files": []}]},
        {"slots": [{"type": "image", "files": []}]},
        {"slots": [{"name": "0", "type": "image", "files": [{"name": "f"}]}]},
        {
            "slots": [
                {
                    "name": "0",
                    "type": "image",
                    "files": [{"name": "f", "digest": sha(b""), "size": -1}],
                }
            ]
        },
    ],
)
async def test_bad_manifests(store: Path, manifest: Any) -> None:
    async with running(store) as srv:
        status, body, _ = await srv.call("PUT", item_url("ds", "x"), json=manifest)
        assert (status, body["code"]) == (400, "bad_manifest")


async def test_manifest_that_is_not_json(store: Path) -> None:
    async with running(store) as srv:
        for raw in (b"{", b'{"slots": [], "metadata": {"x": NaN}}', b"\xff"):
            status, body, _ = await srv.call(
                "PUT",
                item_url("ds", "x"),
                data=raw,
                headers={**AUTH, "Content-Type": "application/json"},
            )
            assert (status, body["code"]) == (400, "bad_json"), raw


async def test_items_page_with_a_cursor_and_prefix(store: Path) -> None:
    data = b"d"
    async with running(store) as srv:
        await srv.put_blob(data)
        keys = []
        for i in range(23):
            folder = "a" if i % 2 else "b"
            name = f"item{i:02d}"
            keys.append(f"/{folder}/{name}")
            await srv.call(
                "PUT", item_url("ds", folder, name), json={"slots": slots_for((name, data))}
            )
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            query = "limit=5" + (f"&cursor={cursor}" if cursor else "")
            status, body, _ = await srv.call("GET", f"/v1/datasets/ds/items?{query}")
            assert status == 200 and len(body["items"]) <= 5
            seen += [i["key"] for i in body["items"]]
            pages += 1
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert seen == sorted(keys) and pages == 5
        _, body, _ = await srv.call("GET", "/v1/datasets/ds/items?prefix=/a/&limit=5000")
        assert [i["key"] for i in body["items"]] == sorted(k for k in keys if k.startswith("/a/"))
        # Exactly `limit` items left: no further (empty) page is announced.
        _, body, _ = await srv.call("GET", "/v1/datasets/ds/items?limit=23")
        assert len(body["items"]) == 23 and body["next_cursor"] is None


async def test_items_listing_errors(store: Path) -> None:
    async with running(store) as srv:
        status, body, _ = await srv.call("GET", "/v1/datasets/none/items")
        assert (status, body["code"]) == (404, "not_found")
        await srv.call("PUT", "/v1/datasets/ds")
        for query, code in (
            ("limit=0", "bad_limit"),
            ("limit=x", "bad_limit"),
            ("cursor=%FF%FE", "bad_cursor"),
        ):
            status, body, _ = await srv.call("GET", f"/v1/datasets/ds/items?{query}")
            assert (status, body["code"]) == (400, code), query


async def test_catalog_work_stays_off_the_event_loop(store: Path) -> None:
    async with running(store) as srv:
        state = srv.app[STATE]
        assert state.store is not None
        catalog = state.store.catalog
        threads: list[bool] = []
        for name in ("ensure_dataset", "upsert_item", "list_items", "delete_item", "has_dataset"):
            original = getattr(catalog, name)

            def spy(*args: Any, _original: Any = original, **kw: Any) -> Any:
                threads.append(threading.current_thread() is threading.main_thread())
                return _original(*args, **kw)

            setattr(catalog, name, spy)
        await srv.call("PUT", "/v1/datasets/ds")
        await srv.call("HEAD", "/v1/datasets/ds")
        await srv.call("PUT", item_url("ds", "x"), json={"slots": []})
        await srv.call("GET", "/v1/datasets/ds/items")
        await srv.call("DELETE", item_url("ds", "x"))
    assert len(threads) >= 5 and not any(threads)


# --- batches --------------------------------------------------------------------------

BATCH = {**AUTH, "Content-Type": "application/x-ingestd-batch"}


async def post_batch(srv: Running, body: bytes, **kw: Any) -> tuple[int, Any]:
    kw.setdefault("headers", BATCH)
    status, answer, _ = await srv.call("POST", "/v1/batch", data=body, **kw)
    return status, answer


def held(srv: Running, dataset: str) -> dict[str, dict[str, Any]]:
    state = srv.app[STATE]
    assert state.store is not None
    return {i["key"]: i for i in state.store.catalog.list_items(dataset)}


async def test_batch_stores_a_group_in_one_request(store: Path) -> None:
    a, b, shared = os.urandom(10_000), os.urandom(5_000), b"the same bytes twice"
    items = [
        batch_item("ds", "/", "a.png", ("a.png", a), camera="north"),
        batch_item("ds", "/scans/x", "b.png", ("b.png", b)),
        batch_item("ds", "/", "c.png", ("c.png", shared)),
        batch_item("other", "/", "d.png", ("d.png", shared)),  # one blob, two items
        {
            "dataset": "ds",
            "path": "/refs",
            "name": "e.jpg",
            "slots": [
                {"name": "0", "type": "image", "files": [{"name": "e.jpg", "url": "s3://b/e.jpg"}]}
            ],
        },
    ]
    async with running(store) as srv:
        status, body = await post_batch(srv, batch_body(items, [a, b, shared]))
        assert status == 200, body
        assert body["results"] == [
            {"status": 201, "key": key, "version": 1, "changed": True}
            for key in ("/a.png", "/scans/x/b.png", "/c.png", "/d.png", "/refs/e.jpg")
        ]
        stored = held(srv, "ds")
        assert set(stored) == {"/a.png", "/scans/x/b.png", "/c.png", "/refs/e.jpg"}
        assert stored["/a.png"]["metadata"] == {"camera": "north"}
        assert set(held(srv, "other")) == {"/d.png"}
        for data in (a, b, shared):
            status, _, headers = await srv.call("HEAD", f"/v1/blobs/{sha(data)}")
            assert (status, headers["Content-Length"]) == (200, str(len(data)))
        assert temps(store) == []
        # The same batch again (an answer lost on the way): nothing changes.
        status, body = await post_batch(srv, batch_body(items, [a, b, shared]))
        assert [(r["status"], r["version"], r["changed"]) for r in body["results"]] == [
            (200, 1, False)
        ] * 5
        # Blobs the server holds need not be sent again; a changed item is a new version.
        items[0]["metadata"] = {"camera": "south"}
        status, body = await post_batch(srv, batch_body(items[:1], []))
        assert body["results"] == [{"status": 200, "key": "/a.png", "version": 2, "changed": True}]
        _, metrics, _ = await srv.call("GET", "/metrics", headers={})
        assert metric(metrics, 'ingestd_serve_items_total{result="created"}') == 5
        assert metric(metrics, 'ingestd_serve_items_total{result="unchanged"}') == 5
        assert metric(metrics, 'ingestd_serve_items_total{result="changed"}') == 1


async def test_batch_fails_a_bad_item_alone(store: Path) -> None:
    good, changed, absent = os.urandom(3000), os.urandom(3000), os.urandom(100)
    items = [
        batch_item("ds", "/", "good.png", ("good.png", good)),
        batch_item("ds", "/", "changed.png", ("changed.png", changed)),
        batch_item("ds", "/", "absent.png", ("absent.png", absent)),  # its bytes never sent
        batch_item("ds", "/a", "..", ("x", good)),
        batch_item("bad/name", "/", "y.png", ("y.png", good)),
        {**batch_item("ds", "/", "z.png", ("z.png", good)), "metadata": []},
        {**batch_item("ds", "/", "size.png", ("size.png", good))},
    ]
    items[-1]["slots"][0]["files"][0]["size"] = len(good) + 1
    body = bytearray(batch_body(items, [good, changed]))
    body[-1] ^= 0xFF  # the last blob's bytes are not those its digest names
    async with running(store) as srv:
        status, answer = await post_batch(srv, bytes(body))
        assert status == 200, answer
        results = answer["results"]
        assert results[0] == {"status": 201, "key": "/good.png", "version": 1, "changed": True}
        bad = results[1]
        assert (bad["status"], bad["code"], bad["key"]) == (400, "digest_mismatch", "/changed.png")
        assert bad["expected"] == sha(changed) and bad["actual"] != sha(changed)
        assert (results[2]["status"], results[2]["code"]) == (409, "missing_blobs")
        assert results[2]["missing"] == [sha(absent)]
        assert [(r["status"], r["code"]) for r in results[3:]] == [
            (400, "bad_path"),
            (400, "bad_name"),
            (400, "bad_manifest"),
            (400, "size_mismatch"),
        ]
        assert set(held(srv, "ds")) == {"/good.png"}
        assert (await srv.call("HEAD", f"/v1/blobs/{sha(changed)}"))[0] == 404
        assert temps(store) == []


@pytest.mark.parametrize(
    ("mangle", "code"),
    [
        (lambda b: b"IDB9" + b[4:], "bad_batch"),  # not the format
        (lambda b: b[:4] + (10).to_bytes(4, "big") + b"not json!!" + b[8:], "bad_batch"),
        (lambda b: b + b"trailing", "bad_batch"),  # more bytes than the header lists
        (lambda b: b[:-10], "bad_batch"),  # fewer (Content-Length says so up front)
        (lambda b: b[:4] + (1 << 30).to_bytes(4, "big") + b[8:], "too_large"),
    ],
    ids=["magic", "header-not-json", "longer", "shorter", "huge-header"],
)
async def test_batch_with_broken_framing_stores_nothing(
    store: Path, mangle: Any, code: str
) -> None:
    a = os.urandom(5000)
    body = mangle(batch_body([batch_item("ds", "/", "a.png", ("a.png", a))], [a]))
    async with running(store) as srv:
        status, answer = await post_batch(srv, body)
        assert (status // 100, answer["code"]) == (4, code), answer
        assert (await srv.call("GET", "/v1/datasets/ds/items"))[0] == 404
        assert (await srv.call("HEAD", f"/v1/blobs/{sha(a)}"))[0] == 404
        assert temps(store) == []


async def test_batch_header_errors(store: Path) -> None:
    a = os.urandom(100)
    item = batch_item("ds", "/", "a", ("a", a))
    async with running(store) as srv:
        for header, code in (
            ([1, 2], "bad_batch"),
            ({"items": "x", "blobs": []}, "bad_batch"),
            ({"items": [item], "blobs": [{"digest": "md5:x", "size": 1}]}, "bad_digest"),
            ({"items": [item], "blobs": [{"digest": sha(a), "size": -1}]}, "bad_batch"),
            ({"items": [item], "blobs": [{"digest": sha(a), "size": 100}] * 2}, "bad_batch"),
            ({"items": [item] * 1001, "blobs": []}, "too_large"),
        ):
            raw = json.dumps(header).encode()
            body = b"IDB1" + len(raw).to_bytes(4, "big") + raw
            status, answer = await post_batch(srv, body)
            assert (status // 100, answer["code"]) == (4, code), (header, answer)
        assert (await srv.call("GET", "/v1/datasets/ds/items"))[0] == 404


async def test_batch_over_the_limits_gets_413(store: Path) -> None:
    a, big = os.urandom(800), os.urandom(5 << 20)
    async with running(store, max_body=2000) as srv:
        items = [batch_item("ds", "/", f"{i}", (f"{i}", a)) for i in range(3)]
        body = batch_body(items, [a, os.urandom(1500)])
        status, answer = await post_batch(srv, body)
        assert (status, answer["code"]) == (413, "too_large")
    async with running(store) as srv:  # a blob over the batch's per-blob limit
        body = batch_body([batch_item("ds", "/", "big", ("big", big))], [big])
        status, answer = await post_batch(srv, body)
        assert (status, answer["code"]) == (413, "too_large")
        assert "PUT /v1/blobs" in answer["error"]
        assert temps(store) == []


async def test_batch_needs_the_token(store: Path) -> None:
    a = os.urandom(100)
    body = batch_body([batch_item("ds", "/", "a", ("a", a))], [a])
    async with running(store) as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, answer = await post_batch(srv, body, headers=headers)
            assert (status, answer["code"]) == (401, "unauthorized")
        assert (await srv.call("HEAD", f"/v1/blobs/{sha(a)}"))[0] == 404
        assert (await srv.call("GET", "/v1/datasets/ds/items"))[0] == 404


@pytest.mark.parametrize("cancel_on_disconnect", [False, True])
async def test_batch_cut_mid_body_commits_nothing(store: Path, cancel_on_disconnect: bool) -> None:
    blobs = [os.urandom(400_000) for _ in range(6)]
    items = [batch_item("ds", "/", f"{i}", (f"{i}", b)) for i, b in enumerate(blobs)]
    body = batch_body(items, blobs)
    async with running(store, cancel_on_disconnect=cancel_on_disconnect) as srv:
        head = (
            f"POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        # Four of six blobs arrive (two trips to the writer thread), then the client is gone.
        await raw_request(srv.port, head, body[: len(body) - 900_000], close_early=True)

        async def answered() -> bool:
            # 400 interrupted, or 499 when the server cancels the handler itself.
            _, text, _ = await srv.call("GET", "/metrics", headers={})
            return b'ingestd_serve_requests_total{method="POST",route="/v1/batch"' in text

        await wait_until(answered, what="the server to see the body end early")
        assert (await srv.call("GET", "/v1/datasets/ds/items"))[0] == 404
        for b in blobs:
            assert (await srv.call("HEAD", f"/v1/blobs/{sha(b)}"))[0] == 404
        await wait_until(lambda: temps(store) == [], what="temp files removed")


# --- the store additions the server streams through ------------------------------------


def test_blob_writer_streams_pieces_and_commits_atomically(tmp_path: Path) -> None:
    from ingestd.store import BlobStore, DigestMismatch

    blobs = BlobStore(tmp_path)
    parts = [b"a" * 10, b"", bytearray(b"b" * 5000), memoryview(b"c" * 3)]
    data = b"".join(bytes(p) for p in parts)
    w = blobs.begin()
    assert not w.tmp.exists()  # nothing on disk before the first write
    w.write_many(parts[:2])
    w.write(parts[2])
    w.write_many(parts[3:])
    written = w.commit(sha(data), len(data))
    assert (written.digest, written.size, written.created) == (sha(data), len(data), True)
    assert blobs.path(sha(data)).read_bytes() == data and w.done
    again = blobs.begin()
    again.write(data)
    assert again.commit().created is False
    bad = blobs.begin()
    bad.write(b"x")
    with pytest.raises(DigestMismatch):
        bad.commit(sha(b"y"))
    empty = blobs.begin()
    assert empty.commit(sha(b"")).size == 0
    aborted = blobs.begin()
    aborted.write(b"z")
    aborted.abort()
    aborted.abort()
    assert os.listdir(tmp_path / "tmp") == []
    assert not blobs.has(sha(b"x")) and not blobs.has(sha(b"z"))
    blobs.close()


def test_blob_adopt_moves_a_staged_file_into_place(tmp_path: Path) -> None:
    from ingestd.store import BlobStore, DigestMismatch

    blobs = BlobStore(tmp_path / "store")
    staged = tmp_path / "store" / "staged"
    staged.write_bytes(b"payload")
    with pytest.raises(DigestMismatch):
        blobs.adopt(staged, sha(b"other"))
    assert staged.exists()  # left for the caller to decide
    written = blobs.adopt(staged, sha(b"payload"), actual_digest=sha(b"payload"))
    assert written.created and not staged.exists()
    assert blobs.path(sha(b"payload")).read_bytes() == b"payload"
    assert blobs.path(sha(b"payload")).stat().st_mode & 0o777 == 0o444  # as put_file makes them
    staged.write_bytes(b"payload")
    assert blobs.adopt(staged, sha(b"payload")).created is False and not staged.exists()
    blobs.close()
