"""Acceptance (issue 16, point 2, the listing variant): three daemons, three state dirs,
one PostgreSQL ledger, one S3 watch (moto) and one `ingestd serve` backend. A writer
puts objects, overwrites some and deletes some while the daemons run; one daemon is
SIGKILLed mid-way and a third starts later. At the end every live object is exactly one
item with the right digest, deleted ones are gone (on_delete: delete), and nothing was
sent twice beyond what the killed daemon had in flight.

Scaled down from the issue's 20,000 objects to N = 3,000 (81 s here): on this 2-core machine moto
writes and lists a few hundred objects a second while three daemons, the server and
PostgreSQL share the cores, and the whole test must stay within ~2-3 minutes.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Env, sha256_digest
from tests.support.emulators import Emulator
from tests.support.postgres import fresh_schema, pg_dsn
from tests.support.wait import wait_for

N = 3000  # objects written (see the module docstring)
OVERWRITTEN = 300
DELETED = 300
LEASE = "5s"  # short, so the killed daemon's claims and listing move on quickly
DEADLINE = 170.0
# What one daemon may have in flight when it is killed (workers × 2 plus two batch
# groups of the http sink): those items may be sent again, idempotently.
IN_FLIGHT_MAX = 4 * 2 + 2 * 256


def content(i: int, version: int = 1) -> bytes:
    return f"object {i} version {version} ".encode() * 8


def server_items(server: Any) -> dict[str, dict[str, Any]]:
    """The server's catalog of dataset ds, every page."""
    out: dict[str, dict[str, Any]] = {}
    cursor = ""
    while True:
        answer = server.request("GET", f"/v1/datasets/ds/items?limit=1000&cursor={cursor}")
        if answer.status == 404:
            return out
        assert answer.status == 200, answer
        page = answer.json()
        out.update((r["key"], r) for r in page["items"])
        cursor = page.get("next_cursor") or ""
        if not cursor:
            return out


def upserts(server: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in server.metrics().items():
        if k.startswith("ingestd_serve_items_total{"):
            out[k.split('result="', 1)[1].split('"', 1)[0]] = v
    return out


@pytest.mark.timeout(400)
def test_three_daemons_share_one_bucket_watch(
    tmp_path: Path, s3_emulator: Emulator, make_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in s3_emulator.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MANY_TEST_TOKEN", "tok-many-daemons-0123456789")
    server = make_server(token="tok-many-daemons-0123456789")
    bucket = s3_emulator.create_bucket()
    with fresh_schema(pg_dsn()) as dsn:
        envs = [Env(tmp_path / f"d{i}") for i in range(3)]
        for e in envs:
            e.root.mkdir()
            e.write_config(
                [
                    {
                        "name": "b",
                        "source": s3_emulator.url(bucket, "in"),
                        "source_options": s3_emulator.source_options,
                        "dataset": "ds",
                        "poll_interval": "1s",
                        "settle": "0.5s",
                        "transfer": "copy",
                        "on_delete": "delete",
                        "max_delete": "100%",
                    }
                ],
                state={"ledger": dsn, "lease": LEASE},
                backend={"kind": "http", "url": server.url, "token_env": "MANY_TEST_TOKEN"},
            )
        try:
            _run(envs, s3_emulator, bucket, server)
        finally:
            for e in envs:
                e.kill()


def _run(envs: list[Env], emu: Emulator, bucket: str, server: Any) -> None:
    first = N // 2
    emu.put_many(bucket, [(f"in/o{i:05}.bin", content(i)) for i in range(first)])
    envs[0].start()
    envs[1].start()
    # The rest arrives while they work, with overwrites and deletions.
    writer = threading.Thread(
        target=lambda: emu.put_many(
            bucket, [(f"in/o{i:05}.bin", content(i)) for i in range(first, N)]
        )
    )
    writer.start()
    wait_for(lambda: len(server_items(server)) >= N // 4, DEADLINE, what="a quarter synced")
    # The first daemon dies mid-way: its claims and (if it had it) the listing move on.
    envs[0].stop(signal.SIGKILL, timeout=10)
    writer.join(120)
    overwritten = range(0, OVERWRITTEN * 5, 5)
    deleted = range(1, DELETED * 5, 5)
    emu.put_many(bucket, [(f"in/o{i:05}.bin", content(i, 2)) for i in overwritten])
    client = emu.client()
    for i in deleted:
        client.delete_object(Bucket=bucket, Key=f"in/o{i:05}.bin")
    envs[2].start()  # a daemon joins later

    want = {
        f"/o{i:05}.bin": sha256_digest(content(i, 2 if i in overwritten else 1)) for i in range(N)
    }
    for i in deleted:
        del want[f"/o{i:05}.bin"]

    def converged() -> bool:
        have = server_items(server)
        if set(have) != set(want):
            return False
        return all(_digest(have[k]) == d for k, d in want.items())

    try:
        wait_for(converged, DEADLINE, interval=1.0, what="every live object synced, deleted gone")
    except AssertionError as e:
        have = server_items(server)
        bad = [k for k in want if k in have and _digest(have[k]) != want[k]]
        raise AssertionError(
            f"{e}\nmissing {sorted(set(want) - set(have))[:10]} ({len(set(want) - set(have))}),"
            f" extra {sorted(set(have) - set(want))[:10]} ({len(set(have) - set(want))}),"
            f" wrong digest {bad[:10]} ({len(bad)})\nstatus: {envs[1].status()}"
            f"\nlog tail d2: {envs[1].log()[-3000:]}"
        ) from None
    status = envs[1].status()
    w = next(x for x in status["watches"] if x["name"] == "b")
    assert w["synced"] == len(want) and w["pending"] == 0 and w["failed"] == 0, w
    hosts = {(d["host"], d["pid"]) for d in status["daemons"]}
    assert len(hosts) == 3, status["daemons"]
    counts = upserts(server)
    sends = counts.get("created", 0) + counts.get("changed", 0)
    # Each content version is sent at most once, except what the killed daemon had in
    # flight (sent again by another daemon: the server answers "unchanged").
    assert sends <= N + OVERWRITTEN, counts
    assert counts.get("unchanged", 0) <= IN_FLIGHT_MAX, counts
    # Each live item exactly once on the server (the catalog is keyed), with its digest.
    assert len(server_items(server)) == len(want)


def _digest(item: dict[str, Any]) -> str | None:
    files = [f for s in item.get("slots", []) for f in s.get("files", [])]
    return files[0].get("digest") if len(files) == 1 else None
