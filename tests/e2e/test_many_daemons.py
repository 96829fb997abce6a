"""Acceptance (issue 16): three daemons, three state dirs, one PostgreSQL ledger, one S3
watch (moto) and one `ingestd serve` backend. A writer puts objects, overwrites some and
deletes some while the daemons run; one daemon is SIGKILLed mid-way and a third starts
later. At the end every live object is exactly one item with the right digest, deleted
ones are gone (on_delete: delete), and no object was uploaded twice: the server logs
each blob a request delivered (`blob_received`), and every digest was delivered once,
except those the killed daemon had sent and not yet recorded, delivered before its
death and again by another daemon (at most its in-flight items).

Two variants:
- listing: the watch is listed every second by whichever daemon holds its lease.
- queue (the acceptance's own): moto's S3 notifies moto's SQS, every daemon consumes
  the queue, and the listing runs only at start and when its lease moves (the default
  1 h interval otherwise), so what is written after the start arrives through messages
  spread over the daemons, their hint rows in the shared ledger.

Sizes: the queue variant runs at the issue's 20,000 objects, in CI too (~7 minutes on 2
cores: .ci/run's other pytest worker runs the rest of the suite beside it, the test is
collected first for that). The listing variant, which the issue does not ask for, runs
at 1,500. INGESTD_MANY_OBJECTS=N runs the queue variant at another size.

First run at 20,000, 2026-12-05 (commit d9f134a): 1,063 s, converged with uploads exact,
but FAILED the last check: status named the queue "not receiving" for 92 objects.
moto's SQS costs O(queue length) per receive and per delete, so messages lagged minutes
behind the writes; the one listing found objects older than the 30 s grace that no
daemon had planned yet, and by the time it judged, the daemon that got their messages
had planned them and deleted the hint rows.

The acceptance at 20,000, 2026-12-05 12:00 UTC, commit 8cb6510 (done hint rows kept
10 min, a suspect judged only once the queue was found empty after its event was due,
up to 4 receives in flight; with the lease fix of 06f70e0 and batched planning of
d28db67), `flock /tmp/heavy.lock`, load average ~5: PASSED in 419 s in all (35 s of it
writing the first 10,000 objects, ~370 s from the daemons' start to the last upload);
14,000 hints from the queue (every message: the queue kept up), 1 listing (350 s under
backpressure), 18,792 digests delivered, 2 of them twice (the killed daemon's in
flight), every message deleted, every hint row looked at, no problem in status. The
same tree with one receive in flight: 469 s, also passed. Not under 4 minutes: moto is
the bound (S3 puts, HEADs and GETs and SQS on one GIL: ~63 % of a core mid-run, by top
in the one-receive run), then `ingestd serve` (~34 %), the daemons ~23 % each.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.daemon import Env, log_lines, sha256_digest
from tests.support.emulators import Emulator, S3Emulator
from tests.support.notifications import notify_queue, visible_messages
from tests.support.postgres import fresh_schema, pg_dsn
from tests.support.wait import wait_for

N_LISTING = 1500
# The size. INGESTD_MANY_OBJECTS=1500 for a quick run by hand (~30 s).
N_QUEUE = int(os.environ.get("INGESTD_MANY_OBJECTS") or 20_000)
LEASE = "5s"  # short, so the killed daemon's claims and listing move on quickly
# The queue variant's: 5 s is shorter than a live daemon's stalls here (two cores, three
# daemons, moto, PostgreSQL, the server): a lease that lapsed while its item was in
# flight let another daemon send it too (78 of 3,000 delivered twice, the server's log
# showed). A lease must outlast the longest stall, or an upload may happen twice.
QUEUE_LEASE = "15s"
# What one daemon may have in flight when it is killed (workers × 2 plus two batch
# groups of the http sink): those items may be sent again, idempotently.
IN_FLIGHT_MAX = 4 * 2 + 2 * 256
TOKEN = "tok-many-daemons-0123456789"


@dataclass(frozen=True)
class Scale:
    n: int

    @property
    def overwritten(self) -> range:
        return range(0, self.n // 10 * 5, 5)

    @property
    def deleted(self) -> range:
        return range(1, self.n // 10 * 5, 5)

    @property
    def deadline(self) -> float:
        return 170.0 + self.n / 20  # seconds for the convergence after the last write


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


def _configure(
    envs: list[Env], emu: Emulator, bucket: str, server: Any, dsn: str, queue: str | None
) -> None:
    lease = LEASE if queue is None else QUEUE_LEASE
    for e in envs:
        e.root.mkdir()
        watch: dict[str, Any] = {
            "name": "b",
            "source": emu.url(bucket, "in"),
            "source_options": emu.source_options,
            "dataset": "ds",
            "settle": "0.5s",
            "transfer": "copy",
            "on_delete": "delete",
            "max_delete": "100%",
        }
        if queue is None:
            watch["poll_interval"] = "1s"
        else:
            watch["queue"] = {"url": queue}  # and the default listing interval, 1 h
        e.write_config(
            [watch],
            state={"ledger": dsn, "lease": lease},
            backend={"kind": "http", "url": server.url, "token_env": "MANY_TEST_TOKEN"},
        )


def _backend_and_bucket(
    s3_emulator: S3Emulator, make_server: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, str]:
    """The daemons' environment (the emulator's credentials, the server's token), the
    `ingestd serve` backend and a new bucket."""
    for k, v in s3_emulator.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MANY_TEST_TOKEN", TOKEN)
    return make_server(token=TOKEN), s3_emulator.create_bucket()


@pytest.mark.timeout(400)
def test_three_daemons_share_one_bucket_watch(
    tmp_path: Path, s3_emulator: S3Emulator, make_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, bucket = _backend_and_bucket(s3_emulator, make_server, monkeypatch)
    with fresh_schema(pg_dsn()) as dsn:
        envs = [Env(tmp_path / f"d{i}") for i in range(3)]

        def configure() -> None:
            _configure(envs, s3_emulator, bucket, server, dsn, None)

        try:
            _run(envs, s3_emulator, bucket, server, Scale(N_LISTING), configure)
        finally:
            for e in envs:
                e.kill()


# ~7 minutes on 2 cores: started first (tests/conftest.py), so that the rest of the
# suite runs beside it on the other pytest worker.
@pytest.mark.longest
@pytest.mark.timeout(400 + N_QUEUE // 10)
def test_three_daemons_share_one_bucket_watch_through_its_queue(
    tmp_path: Path, s3_emulator: S3Emulator, make_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, bucket = _backend_and_bucket(s3_emulator, make_server, monkeypatch)
    started = time.monotonic()
    url = ""
    with fresh_schema(pg_dsn()) as dsn:
        envs = [Env(tmp_path / f"d{i}") for i in range(3)]

        def configure() -> None:
            # The queue is set up on a prefix already holding objects (the start listing
            # takes those); a message the killed daemon had received comes back to
            # another after 5 s.
            nonlocal url
            url = notify_queue(s3_emulator, bucket, visibility=5)
            _configure(envs, s3_emulator, bucket, server, dsn, url)

        try:
            _run(envs, s3_emulator, bucket, server, Scale(N_QUEUE), configure)
            wait_for(
                lambda: visible_messages(s3_emulator, url) == 0, 60, what="every message deleted"
            )
            wait_for(lambda: _hint_rows(dsn) == 0, 60, what="every hint row looked at")
            live = [e for e in envs if e.daemon is not None and e.daemon.poll() is None]
            received = sum(len(log_lines(e, "queue hint")) for e in envs)
            listings = sum(len(log_lines(e, "scan done", watch="b")) for e in envs)
            print(
                f"\nqueue variant, {N_QUEUE} objects: {time.monotonic() - started:.0f} s;"
                f" {received} hints from the queue, {listings} listings, {len(live)} daemons left"
            )
            # The two daemons running while the objects were written both consumed the
            # queue: messages spread by themselves (the late one may find it empty).
            assert all(log_lines(e, "queue hint") for e in envs[:2]), "a daemon took none"
            assert envs[1].watch_status("b")["problem"] is None
        finally:
            for e in envs:
                e.kill()


def _hint_rows(dsn: str) -> int:
    """Live hint rows: keys named and not looked at yet (done rows are kept a while)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM hints WHERE watch = 'b' AND done IS NULL"
        ).fetchone()
        return int(row[0]) if row else 0


def _run(
    envs: list[Env],
    emu: Emulator,
    bucket: str,
    server: Any,
    scale: Scale,
    configure: Callable[[], None],
) -> None:
    """Half the objects are there before the daemons are configured and start; the
    rest arrives while they run."""
    n = scale.n
    first = n // 2
    emu.put_many(bucket, [(f"in/o{i:05}.bin", content(i)) for i in range(first)])
    configure()
    envs[0].start()
    envs[1].start()
    # The rest arrives while they work, with overwrites and deletions.
    writer = threading.Thread(
        target=lambda: emu.put_many(
            bucket, [(f"in/o{i:05}.bin", content(i)) for i in range(first, n)]
        )
    )
    writer.start()
    wait_for(lambda: len(server_items(server)) >= n // 4, scale.deadline, what="a quarter synced")
    # The first daemon dies mid-way: its claims and (if it had it) the listing move on.
    killed_at = time.time()
    envs[0].stop(signal.SIGKILL, timeout=10)
    writer.join(scale.deadline)
    overwritten, deleted = scale.overwritten, scale.deleted
    emu.put_many(bucket, [(f"in/o{i:05}.bin", content(i, 2)) for i in overwritten])
    client = emu.client()
    for i in deleted:
        client.delete_object(Bucket=bucket, Key=f"in/o{i:05}.bin")
    envs[2].start()  # a daemon joins later

    want = {
        f"/o{i:05}.bin": sha256_digest(content(i, 2 if i in overwritten else 1)) for i in range(n)
    }
    for i in deleted:
        del want[f"/o{i:05}.bin"]

    def converged() -> bool:
        have = server_items(server)
        if set(have) != set(want):
            return False
        return all(_digest(have[k]) == d for k, d in want.items())

    try:
        wait_for(
            converged, scale.deadline, interval=2.0, what="every live object synced, deleted gone"
        )
    except AssertionError as e:
        have = server_items(server)
        bad = [k for k in want if k in have and _digest(have[k]) != want[k]]
        raise AssertionError(
            f"{e}\nmissing {sorted(set(want) - set(have))[:10]} ({len(set(want) - set(have))}),"
            f" extra {sorted(set(have) - set(want))[:10]} ({len(set(have) - set(want))}),"
            f" wrong digest {bad[:10]} ({len(bad)})\nstatus: {envs[1].status()}"
            f"\nlog tail d2: {envs[1].log()[-3000:]}"
        ) from None

    # The store converged; the ledger records the last outcomes (and deletions of items
    # already gone from the store) a moment later.
    def ledger_settled() -> dict[str, Any] | None:
        st = envs[1].status()
        w = next(x for x in st["watches"] if x["name"] == "b")
        done = w["synced"] == len(want) and w["pending"] == 0 and w["failed"] == 0
        return st if done else None

    status = wait_for(ledger_settled, 60, interval=1.0, what="the ledger to settle")
    hosts = {(d["host"], d["pid"]) for d in status["daemons"]}
    assert len(hosts) == 3, status["daemons"]
    counts = upserts(server)
    sends = counts.get("created", 0) + counts.get("changed", 0)
    # Each content version is put at most once, except what the killed daemon had in
    # flight (put again by another daemon: the server answers "unchanged").
    assert sends <= n + len(overwritten), counts
    assert counts.get("unchanged", 0) <= IN_FLIGHT_MAX, counts
    _uploaded_once(server, killed_at, set(want.values()))
    # Each live item exactly once on the server (the catalog is keyed), with its digest.
    assert len(server_items(server)) == len(want)


def _uploaded_once(server: Any, killed_at: float, live: set[str]) -> None:
    """Per digest, the deliveries the server logged: each live digest at least once,
    none more than once except digests the killed daemon delivered before it died
    (sent, not yet recorded: another daemon sends them again), at most twice, and no
    more of those than one daemon has in flight."""
    at: dict[str, list[float]] = defaultdict(list)
    for line in server.log().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == "blob_received":
            ts = datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
            at[e["digest"]].append(ts)
    assert not live - set(at), f"{len(live - set(at))} live digests never delivered"
    twice = {d: sorted(t) for d, t in at.items() if len(t) > 1}
    late = {d: t for d, t in twice.items() if len(t) > 2 or t[0] > killed_at + 2.0}
    assert not late, (
        f"{len(late)} digests uploaded twice outside the killed daemon's in-flight items, "
        f"e.g. {list(late.items())[:3]} (killed at {killed_at})"
    )
    assert len(twice) <= IN_FLIGHT_MAX, len(twice)
    print(f"\nuploads: {len(at)} digests, {len(twice)} delivered twice (the killed daemon's)")


def _digest(item: dict[str, Any]) -> str | None:
    files = [f for s in item.get("slots", []) for f in s.get("files", [])]
    return files[0].get("digest") if len(files) == 1 else None
