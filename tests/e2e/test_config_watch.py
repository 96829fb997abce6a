"""The config watcher reacts to edits of its file only, not to reads of it (issue 14,
point 5): watchdog >= 4 reports opens and closes without a write, and the daemon's own
read of the file used to hint the next read, forever (65 opens in 20 s after one edit;
a `cat` of the file started the same loop).

The daemon's opens are counted with strace. Each strace window is a measurement period
of a fixed length (6 s), not a wait for something to happen: the loop this guards
against opened the file about three times a second, so a window that short sees it
many times over, while a fixed daemon opens the file not at all."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.support.daemon import Env, log_lines
from tests.support.wait import wait_for

WINDOW = 6.0  # seconds of strace per measurement

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")


def _traced(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    return any(
        line.split()[1:] != ["0"] for line in status.splitlines() if line.startswith("TracerPid:")
    )


class _Strace:
    """openat calls of a running process and all its threads, into a file."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            ["strace", "-f", "-qq", "-e", "trace=openat", "-o", str(out), "-p", str(pid)],
            stderr=subprocess.PIPE,
        )
        wait_for(lambda: self._attached(pid), 15, interval=0.05, what="strace to attach")

    def _attached(self, pid: int) -> bool:
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise AssertionError(f"strace exited {self.proc.returncode}: {err}")
        return _traced(pid)

    def opens_of(self, path: Path) -> list[str]:
        self.proc.terminate()  # strace detaches on SIGTERM and leaves the daemon running
        self.proc.wait(timeout=15)
        lines = self.out.read_text(errors="replace").splitlines()
        return [line for line in lines if "openat(" in line and f'"{path}"' in line]


def _set_workers(env: Env, n: int) -> None:
    data = yaml.safe_load(env.config_path.read_text())
    data["workers"] = n
    env.config_path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_reads_of_the_config_are_not_edits_and_an_edit_is_read_a_few_times(
    env: Env, tmp_path: Path
) -> None:
    env.write_config([{"name": "w", "source": str(env.drop()), "dataset": "ds"}])
    proc = env.start()
    # One real edit first: after it, the old watcher kept re-reading the file forever.
    _set_workers(env, 5)
    wait_for(lambda: log_lines(env, "config reloaded"), 30, what="the first edit's reload")
    requested = len(log_lines(env, "reload requested"))

    # Window 1: idle, while another program reads the file twice (a `cat`).
    trace = _Strace(proc.pid, tmp_path / "idle.strace")
    started = time.monotonic()
    for _ in range(2):
        assert env.config_path.read_bytes()
    time.sleep(max(0.0, WINDOW - (time.monotonic() - started)))  # the measurement period
    idle = trace.opens_of(env.config_path)
    assert idle == [], f"the idle daemon opened its config {len(idle)} times:\n" + "\n".join(idle)
    assert len(log_lines(env, "reload requested")) == requested

    # Window 2: one real edit is read once (the watcher's read is what the reload
    # parses), and reloaded once.
    reloads = len(log_lines(env, "config reloaded"))
    trace = _Strace(proc.pid, tmp_path / "edit.strace")
    started = time.monotonic()
    _set_workers(env, 6)
    wait_for(lambda: len(log_lines(env, "config reloaded")) > reloads, 30, what="the second reload")
    time.sleep(max(0.0, WINDOW - (time.monotonic() - started)))  # the measurement period
    edit = trace.opens_of(env.config_path)
    assert len(edit) == 1, f"one edit opened the config {len(edit)} times:\n" + "\n".join(edit)
    assert len(log_lines(env, "config reloaded")) == reloads + 1
    assert env.stop() == 0
