"""The status report (`ingestd status --json`, the control endpoint's /api/status):
read from the ledger, so it works whether or not the daemon runs."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.config import Config, Problem
from daemon.ledger import LEDGER_FILE, Ledger
from daemon.service import running_pid

REJECTED_FILE = "config-rejected.json"


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


def status_data(config: Config, path: Path) -> dict[str, Any]:
    pid = running_pid(config.state_dir)
    ledger = None
    if (config.state_dir / LEDGER_FILE).exists():  # no ledger yet: nothing happened
        ledger = Ledger(config.state_dir, readonly=True)
    try:
        counts = ledger.counts() if ledger else {}
        problems = ledger.watch_problems() if ledger else {}
        watches = [
            {
                "name": w.name,
                "dataset": w.dataset,
                "synced": counts[w.name].synced if w.name in counts else 0,
                "pending": counts[w.name].pending if w.name in counts else 0,
                "failed": counts[w.name].failed if w.name in counts else 0,
                "last_errors": ledger.last_errors(w.name) if ledger else [],
                "problem": problems.get(w.name),
            }
            for w in config.watches
        ]
    finally:
        if ledger is not None:
            ledger.close()
    return {
        "daemon": {"running": pid is not None, "pid": pid},
        "config": {
            "path": str(path),
            "rejected": read_rejected(config.state_dir) if pid is not None else [],
        },
        "watches": watches,
    }
