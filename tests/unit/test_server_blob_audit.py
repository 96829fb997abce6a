"""`ingestd serve` logs one `blob_received` line per blob a request delivered whole,
with `new` telling whether the store already held it: the per-digest upload count the
many-daemons acceptance (tests/e2e/test_many_daemons.py) holds the daemons to."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import structlog

from tests.support.server_app import AUTH, batch_body, batch_item, running, sha


async def test_each_delivered_blob_is_logged_once_with_whether_it_was_new(
    tmp_path: Path,
) -> None:
    a, b = os.urandom(2000), os.urandom(3000)
    with structlog.testing.capture_logs() as logs:
        async with running(tmp_path / "store") as srv:
            items = [batch_item("ds", "/", "a.bin", ("a.bin", a))]
            status, _, _ = await srv.call(
                "POST", "/v1/batch", data=batch_body(items, [a]), headers=AUTH
            )
            assert status == 200
            # The same bytes again (a client that did not ask first), then a PUT.
            status, _, _ = await srv.call(
                "POST", "/v1/batch", data=batch_body(items, [a]), headers=AUTH
            )
            assert status == 200
            status, _, _ = await srv.call("PUT", f"/v1/blobs/{sha(b)}", data=b, headers=AUTH)
            assert status == 201
            # A body that breaks off delivers nothing.
            status, _, _ = await srv.call(
                "PUT", f"/v1/blobs/{sha(b'x' * 10)}", data=b"y" * 10, headers=AUTH
            )
            assert status == 400
    got: list[tuple[Any, ...]] = [
        (e["route"], e["digest"], e["size"], e["new"])
        for e in logs
        if e["event"] == "blob_received"
    ]
    assert got == [
        ("/v1/batch", sha(a), 2000, True),
        ("/v1/batch", sha(a), 2000, False),
        ("/v1/blobs/{digest}", sha(b), 3000, True),
    ]
