"""`ingestd status` tells the truth about repairs, failures and live problems (issue 14,
point 7): the running daemon adds how each watch is watched, its last event overflow
and its last rescan with what that rescan repaired; every failed item can be listed,
page by page."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.daemon import Env
from tests.support.wait import wait_for


def _status(env: Env, *args: str) -> dict[str, Any]:
    return json.loads(env.cli("status", "--json", *args, check=True).stdout)


def _watch(data: dict[str, Any], name: str = "w") -> dict[str, Any]:
    return next(w for w in data["watches"] if w["name"] == name)


def test_an_event_overflow_and_its_repairing_rescan_show_in_status(env: Env) -> None:
    drop = env.drop()
    (drop / "noise").mkdir()  # watched (its events fill the queue) but excluded
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds", "exclude": ["noise/"]}])
    proc = env.start()
    live = wait_for(
        lambda: (d := _status(env))["daemon"]["live"] and _watch(d)["last_rescan"] and d,
        30,
        what="the live status with the start pass",
    )
    w = _watch(live)
    assert (w["mode"], w["last_overflow"]) == ("events", None)
    assert w["last_rescan"]["reason"] == "start"

    # The kernel queues events while the daemon is stopped; more than the queue holds
    # means an overflow, and the files written after it are announced by no event.
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        for n in range(limit // 2 + 1000):  # a create and a close-after-write each
            (drop / "noise" / f"{n}.tmp").write_bytes(b"")
        missed = {f"/missed{n}.dat" for n in range(5)}
        for key in missed:
            (drop / key.lstrip("/")).write_bytes(key.encode())
    finally:
        os.kill(proc.pid, signal.SIGCONT)

    w = wait_for(
        lambda: (
            (w := _watch(_status(env)))["last_overflow"]
            and w["last_rescan"]["reason"] == "overflow"
            and w
        ),
        60,
        what="an overflow and the rescan after it in status",
    )
    assert w["last_rescan"]["found"] == 5, w["last_rescan"]
    assert w["last_rescan"]["repaired"] == 5, w["last_rescan"]
    assert w["last_rescan"]["at"] >= w["last_overflow"]
    # One overflow is counted once (watchdog also logs a second warning per watch,
    # which used to count again).
    url = (env.state / "control.addr").read_text().strip()
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=10) as r:
        body = r.read().decode()
    assert 'ingestd_inotify_overflows_total{watch="w"} 1.0' in body.splitlines(), body
    wait_for(lambda: missed <= set(env.items_by_key()), 60, what="the missed files synced")
    assert env.stop() == 0

    # Without the daemon, status says the live part is unavailable and why.
    data = _status(env)
    assert data["daemon"]["live"] is False and data["daemon"]["live_unavailable"]
    assert _watch(data)["mode"] is None and _watch(data)["synced"] == 5
    text = env.cli("status", check=True).stdout
    assert "live status unavailable" in text


def _failing_items(env: Env, n: int) -> set[str]:
    """n items that fail at planning (a broken sidecar each), made by one `sync`."""
    drop = env.drop()
    env.write_config(
        [
            {
                "name": "w",
                "source": str(drop),
                "dataset": "ds",
                "metadata": {"sidecar": "{name}.json"},
            }
        ]
    )
    for i in range(n):
        (drop / f"bad{i:02}.dat.json").write_bytes(b'{"label": "cat",,}')
        (drop / f"bad{i:02}.dat").write_bytes(b"bad")
    proc = env.cli("sync", timeout=120)
    assert proc.returncode == 1, proc.stderr
    return {f"/bad{i:02}.dat" for i in range(n)}


def test_every_failed_item_is_listed_page_by_page(env: Env) -> None:
    expected = _failing_items(env, 25)
    data = _status(env)
    w = _watch(data)
    assert w["failed"] == 25 and len(w["last_errors"]) == 10
    text = env.cli("status", check=True).stdout
    assert "… and 15 more: ingestd status --failed w" in text, text

    seen: list[str] = []
    offset: int | None = 0
    pages = 0
    while offset is not None:
        page = _status(env, "--failed", "w", "--limit", "10", "--offset", str(offset))
        assert page["total"] == 25 and page["limit"] == 10
        assert all("sidecar" in it["error"] or ".json" in it["error"] for it in page["items"])
        seen += [it["item"] for it in page["items"]]
        offset = page["next_offset"]
        pages += 1
    assert pages == 3
    assert sorted(seen) == sorted(expected) and len(seen) == 25  # each exactly once
    third = _status(env, "--failed", "w", "--limit", "10", "--page", "3")
    assert [it["item"] for it in third["items"]] == seen[20:]
    # All watches, and the plain text form.
    assert _status(env, "--failed")["total"] == 25
    out = env.cli("status", "--failed", "w", "--limit", "10", check=True)
    assert len(out.stdout.splitlines()) == 10
    assert "--offset 10" in out.stderr
    assert env.cli("status", "--failed", "nope").returncode == 2
