"""A daemon whose shared ledger's PostgreSQL is down when it starts (issue 16, point 2):
it stays up, `status --json` names the unreachable ledger on every watch (live, from the
daemon's control endpoint), and once the server answers it opens the ledger, starts its
watches and syncs. And `sync --dry-run` compares with the configured ledger."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import INGESTD, REPO, Env
from tests.support.need import need
from tests.support.postgres import PostgresServer, pg_bin
from tests.support.wait import wait_for


@pytest.fixture
def server() -> Iterator[PostgresServer]:
    """A server of this test's own: it is stopped and started again."""
    need(pg_bin() is not None, "no PostgreSQL server (Debian's postgresql package)")
    pg = PostgresServer()
    try:
        yield pg
    finally:
        pg.remove()


def config(env: Env, dsn: str) -> None:
    env.write_config(
        [
            {"name": "a", "source": str(env.drop("a")), "dataset": "ds"},
            {"name": "b", "source": str(env.drop("b")), "dataset": "ds2"},
        ],
        state={"ledger": dsn, "lease": "5s"},
    )


def start_daemon(env: Env) -> subprocess.Popen[bytes]:
    """The daemon, without waiting for "ingestd started" (Env.start does): that line
    comes only once the ledger is open."""
    log = open(env.log_path, "ab")  # noqa: SIM115 - closed with the process
    env.daemon = subprocess.Popen(
        [*INGESTD, "run", "-c", str(env.config_path)],
        cwd=REPO,
        stdout=log,
        stderr=log,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return env.daemon


def live_problems(env: Env) -> dict[str, Any] | None:
    """Each watch's problem as the running daemon reports it, or None until its control
    endpoint answers."""
    assert env.daemon is not None and env.daemon.poll() is None, env.log()
    data = env.status()
    if not data["daemon"]["live"]:
        return None
    return {w["name"]: w["problem"] for w in data["watches"]}


def control_call(base: str, method: str, path: str) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        base + path,
        method=method,
        data=b"{}" if method == "POST" else None,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.timeout(240)
def test_a_daemon_started_before_its_postgresql_waits_for_it_and_syncs(
    tmp_path: Path, server: PostgresServer
) -> None:
    env = Env(tmp_path)
    env.root.mkdir(exist_ok=True)
    config(env, server.dsn)
    (env.drop("a") / "early.txt").write_bytes(b"written while the ledger was down\n")
    # The server was never started: nothing answers on its port.
    start_daemon(env)
    try:
        problems = wait_for(lambda: live_problems(env), 60, what="the live status")
        for name in ("a", "b"):
            p = problems[name]
            assert p is not None, problems
            assert f"ledger postgresql://ingestd@127.0.0.1:{server.port}/postgres unreachable" in p
            assert "retried every few seconds" in p
        assert "ingestd started" not in env.log()
        assert env.daemon is not None and env.daemon.poll() is None, "it did not exit"
        # The dashboard's other routes say the same, not "internal error".
        base = (env.state / "control.addr").read_text().strip()
        for method, path in (("GET", "/api/items?status=failed"), ("POST", "/api/retry")):
            code, body = control_call(base, method, path)
            assert code == 503 and "unreachable" in body["error"], (path, code, body)

        server.start()
        wait_for(lambda: "ingestd started" in env.log(), 60, what="the daemon to start")
        items = wait_for(lambda: env.items_by_key("ds"), 90, what="the early file synced")
        assert list(items) == ["/early.txt"]
        (env.drop("b") / "later.txt").write_bytes(b"after\n")
        wait_for(lambda: env.items_by_key("ds2"), 90, what="a later file synced")
        wait_for(
            lambda: all(p is None for p in (live_problems(env) or {"x": 1}).values()),
            30,
            what="the problem to clear",
        )
    finally:
        env.stop()


@pytest.mark.timeout(240)
def test_dry_run_compares_with_the_configured_ledger(
    tmp_path: Path, server: PostgresServer
) -> None:
    server.start()
    env = Env(tmp_path)
    env.root.mkdir(exist_ok=True)
    config(env, server.dsn)
    (env.drop("a") / "synced.txt").write_bytes(b"one\n")
    env.cli("sync", check=True)
    assert not (env.state / "ledger.sqlite").exists(), "the items are in PostgreSQL"
    (env.drop("a") / "new.txt").write_bytes(b"two\n")
    out = env.cli("sync", "--dry-run", check=True)
    lines = out.stdout.splitlines()
    assert "create  ds /new.txt" in lines, out.stdout
    assert not any("synced.txt" in line for line in lines), "already synced, per PostgreSQL"
