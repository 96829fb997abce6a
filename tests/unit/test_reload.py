"""The pieces of live reload: the config diff by watch name and the config file watcher."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from ingestd.config import backend_identity, diff_config, parse_config
from ingestd.runtime.config_watch import ConfigWatcher, content_digest


def _config(tmp_path: Path, **top: Any) -> Any:
    for d in ("a", "b", "c"):
        (tmp_path / d).mkdir(exist_ok=True)
    data = {
        "watches": [
            {"name": "a", "source": "a", "dataset": "d"},
            {"name": "b", "source": "b", "dataset": "d", "include": ["*.png"]},
        ],
        **top,
    }
    return parse_config(data, tmp_path)


def test_diff_by_watch_name(tmp_path: Path) -> None:
    old = _config(tmp_path)
    assert diff_config(old, _config(tmp_path)).empty
    new = parse_config(
        {
            "workers": 3,
            "watches": [
                {"name": "b", "source": "b", "dataset": "d", "include": ["*.jpg"]},
                {"name": "c", "source": "c", "dataset": "d"},
            ],
        },
        tmp_path,
    )
    diff = diff_config(old, new)
    assert (diff.added, diff.removed, diff.changed, diff.unchanged) == (("c",), ("a",), ("b",), ())
    assert diff.workers and not diff.backend and not diff.state_dir
    assert diff.summary() == {"added": ["c"], "removed": ["a"], "changed": ["b"], "workers": True}


def test_reordering_watches_changes_nothing(tmp_path: Path) -> None:
    old = _config(tmp_path)
    data = {
        "watches": [
            {"name": "b", "source": "b", "dataset": "d", "include": ["*.png"]},
            {"name": "a", "source": "a", "dataset": "d"},
        ]
    }
    assert diff_config(old, parse_config(data, tmp_path)).empty


def test_backend_identity_ignores_credentials(tmp_path: Path) -> None:
    os.environ["TEST_RELOAD_TOKEN"] = "x"
    base = {"kind": "http", "url": "http://h:1"}
    one = _config(tmp_path, backend={**base, "token_env": "TEST_RELOAD_TOKEN"})
    two = _config(tmp_path, backend=base)
    other = _config(tmp_path, backend={"kind": "http", "url": "http://h:2"})
    assert backend_identity(one) == backend_identity(two)
    assert backend_identity(one) != backend_identity(other)
    assert "TEST_RELOAD_TOKEN" not in backend_identity(one)


async def _wait(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_config_watcher_sees_renames_and_in_place_writes(tmp_path: Path) -> None:
    cfg = tmp_path / "ingestd.yaml"
    cfg.write_text("workers: 1\n")
    changes: list[float] = []
    watcher = ConfigWatcher(
        cfg, lambda _content: changes.append(time.monotonic()), content_digest(cfg)
    )
    await watcher.start()
    try:
        # an editor's save: a new file renamed over the old one
        tmp = tmp_path / ".ingestd.yaml.swp"
        tmp.write_text("workers: 2\n")
        os.replace(tmp, cfg)
        await _wait(lambda: len(changes) == 1)
        watcher.mark_loaded(content_digest(cfg))  # what the daemon then read
        # an in-place edit; other files in the folder do not count
        (tmp_path / "other.yaml").write_text("x")
        cfg.write_text("workers: 3\n")
        await _wait(lambda: len(changes) == 2)
    finally:
        await watcher.stop()
    assert len(changes) == 2


async def test_config_watcher_ignores_content_already_loaded(tmp_path: Path) -> None:
    cfg = tmp_path / "ingestd.yaml"
    cfg.write_text("workers: 1\n")
    changes: list[str] = []
    watcher = ConfigWatcher(
        cfg, lambda content: changes.append(content.decode()), content_digest(cfg)
    )
    await watcher.start()
    try:
        # A touch and a rewrite of the same bytes come first; the only change reported
        # is the last, different content.
        os.utime(cfg)
        cfg.write_text("workers: 1\n")
        cfg.write_text("workers: 5\n")
        await _wait(lambda: changes)
    finally:
        await watcher.stop()
    assert changes == ["workers: 5\n"]


async def test_an_edit_before_the_watcher_started_is_seen(tmp_path: Path) -> None:
    """The daemon loaded the file, then (while it started: a ledger to wait for, a
    slow first pass) the file was edited, before the watcher was there to hear it."""
    cfg = tmp_path / "ingestd.yaml"
    cfg.write_text("workers: 1\n")
    loaded = content_digest(cfg)
    cfg.write_text("workers: 6\n")
    changes: list[str] = []
    watcher = ConfigWatcher(cfg, lambda content: changes.append(content.decode()), loaded)
    await watcher.start()
    try:
        await _wait(lambda: changes)
    finally:
        await watcher.stop()
    assert changes == ["workers: 6\n"]
