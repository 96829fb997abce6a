"""The status report (`ingestd status --json`, the control endpoint's /api/status).

Two parts: the ledger's (counts, last errors, recorded watch problems), readable
whether or not the daemon runs, and the running daemon's live part (how each watch is
watched, its last overflow and rescan, problems only the process knows: a ledger it
cannot write, a sink that holds the work). `ingestd status` asks the daemon's control
endpoint for both and falls back to the ledger's part, saying that the live part is
unavailable and why."""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ingestd.config import Config, Problem
from ingestd.core.pidfile import running_pid
from ingestd.ledger import Ledger, LedgerAt
from ingestd.observe.listen import ADDR_FILE

REJECTED_FILE = "config-rejected.json"
LIVE_TIMEOUT = 2.0  # seconds `status` waits for the daemon before using the ledger alone

# The live fields of a watch, null when no running daemon answered.
LIVE_FIELDS = ("mode", "mode_reason", "last_overflow", "last_rescan")


def write_rejected(state_dir: Path, problems: Sequence[Problem]) -> None:
    """Record the problems of the config edit the running daemon refused ([] once a
    good config is in use), for `status` in another process."""
    path = Path(state_dir) / REJECTED_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"field": p.field, "error": p.error} for p in problems]))
    os.replace(tmp, path)


def read_rejected(state_dir: Path) -> list[dict[str, str]]:
    try:
        data = json.loads((Path(state_dir) / REJECTED_FILE).read_text())
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def ledger_at(config: Config) -> LedgerAt:
    """Where the config puts the ledger (its `state` key)."""
    s = config.state
    return LedgerAt(config.state_dir, dsn=s.dsn, password=s.password(), lease=s.lease)


def status_data(config: Config, path: Path) -> dict[str, Any]:
    return status_report(
        config.state_dir, path, [(w.name, w.dataset) for w in config.watches], ledger_at(config)
    )


def status_report(
    state_dir: Path,
    path: Path,
    watch_list: Sequence[tuple[str, str]],
    at: LedgerAt | None = None,
) -> dict[str, Any]:
    """The status of these (watch, dataset) pairs, from the ledger (under state_dir
    unless `at` says where). A shared ledger's counts are the whole watch's, whichever
    daemon did the work, and `daemons` lists every daemon using it."""
    at = at or LedgerAt(state_dir)
    pid = running_pid(state_dir)
    ledger = None
    unreachable = None
    if at.exists():  # no ledger yet: nothing happened
        try:
            ledger = Ledger(at, readonly=True)
        except Exception as e:
            if not at.shared:
                raise
            # The server is down: say so on every watch rather than fail `status`.
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            unreachable = f"ledger {at.describe()} unreachable: {first}"
    try:
        counts = ledger.counts() if ledger else {}
        problems = ledger.watch_problems() if ledger else {}
        daemons = ledger.daemons() if ledger else []
        watches = [
            {
                "name": name,
                "dataset": dataset,
                "synced": counts[name].synced if name in counts else 0,
                "pending": counts[name].pending if name in counts else 0,
                "failed": counts[name].failed if name in counts else 0,
                "last_errors": ledger.last_errors(name) if ledger else [],
                "problem": problems.get(name) or unreachable,
                **dict.fromkeys(LIVE_FIELDS),
            }
            for name, dataset in watch_list
        ]
    finally:
        if ledger is not None:
            ledger.close()
    return {
        "daemon": {"running": pid is not None, "pid": pid, "live": False},
        "ledger": at.describe(),
        "daemons": daemons,
        "config": {
            "path": str(path),
            "rejected": read_rejected(state_dir) if pid is not None else [],
        },
        "watches": watches,
    }


def raw_watches(path: Path) -> list[tuple[str, str]]:
    """(name, dataset) of each watch in a config file that does not validate, read
    leniently, so `status` still reports what it can next to the problems."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    watches = data.get("watches") if isinstance(data, dict) else None
    out = []
    for w in watches if isinstance(watches, list) else []:
        if isinstance(w, dict) and isinstance(w.get("name"), str):
            out.append((w["name"], str(w.get("dataset", ""))))
    return out


def state_dir_of(path: Path) -> Path:
    """The state_dir a config file names, even when the rest of it is invalid."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        raw = data.get("state_dir", "var/state") if isinstance(data, dict) else "var/state"
    except (OSError, yaml.YAMLError):
        raw = "var/state"
    state = Path(os.path.expanduser(str(raw)))
    return state if state.is_absolute() else Path(path).resolve().parent / state


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def live_status(
    state_dir: Path, timeout: float = LIVE_TIMEOUT
) -> tuple[dict[str, Any] | None, str]:
    """The running daemon's /api/status, found through state_dir/control.addr, or
    (None, why not) in words."""
    try:
        address = (Path(state_dir) / ADDR_FILE).read_text().strip()
    except FileNotFoundError:
        return None, "no control endpoint (the daemon is not running, or status.listen is null)"
    except OSError as e:
        return None, f"cannot read {ADDR_FILE}: {e.strerror}"
    conn: http.client.HTTPConnection
    if address.startswith("unix:"):
        conn = _UnixConnection(address[len("unix:") :], timeout)
    else:
        rest = address.removeprefix("http://")
        host, _, port = rest.rpartition(":")
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        # fresh: `status` right after `retry` or an edit must not read a dashboard's
        # cached second-old report.
        conn.request("GET", "/api/status?fresh=1", headers={"Accept": "application/json"})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            return None, f"the control endpoint at {address} answered HTTP {response.status}"
        data = json.loads(body)
    except (OSError, http.client.HTTPException, ValueError) as e:
        return None, f"the control endpoint at {address} did not answer ({e})"
    finally:
        conn.close()
    if not isinstance(data, dict) or not isinstance(data.get("watches"), list):
        return None, f"the control endpoint at {address} answered something else"
    return data, ""
