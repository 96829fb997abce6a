"""The real CLI and daemon as subprocesses on real temporary folders (`Env`), and helpers
to read what they did (log lines, the local store). The `env` fixture is in
tests/e2e/conftest.py."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.wait import wait_for

INGESTD = [sys.executable, "-m", "ingestd.cli"]
REPO = Path(__file__).resolve().parents[2]


class Env:
    """A config file, its drop folders and state, and the CLI to drive them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config_path = root / "ingestd.yaml"
        self.state = root / "state"
        self.store = root / "store"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.log_path = root / "ingestd.log"

    def drop(self, name: str = "drop") -> Path:
        p = self.root / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def write_config(self, watches: list[dict[str, Any]], **top: Any) -> Path:
        data: dict[str, Any] = {
            "state_dir": str(self.state),
            "log": {"level": "debug", "format": "json"},
            # Tests run daemons side by side: each control endpoint takes a free port
            # (the daemon writes the one it got to state_dir/control.addr).
            "status": {"listen": "127.0.0.1:0"},
            "workers": 4,
            "backend": {"kind": "local", "path": str(self.store)},
            "watches": [{"settle": "0.5s", "rescan": "10m", **w} for w in watches],
        }
        data.update(top)
        self.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        return self.config_path

    def cli(
        self, *args: str, timeout: float = 120, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*INGESTD, *args, "-c", str(self.config_path)]
            if args[0] not in ("schema",)
            else [*INGESTD, *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"ingestd {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
            )
        return proc

    def items(self, dataset: str = "ds") -> list[dict[str, Any]]:
        out = self.cli("items", dataset, "--json", check=True)
        return json.loads(out.stdout)

    def items_by_key(self, dataset: str = "ds") -> dict[str, dict[str, Any]]:
        return {i["key"]: i for i in self.items(dataset)}

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json", check=True).stdout)

    def watch_status(self, name: str = "w") -> dict[str, Any]:
        return next(w for w in self.status()["watches"] if w["name"] == name)

    def start(
        self,
        *,
        extra_env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        **popen: Any,
    ) -> subprocess.Popen[bytes]:
        """`extra_env` adds to the daemon's environment (e.g. NOTIFY_SOCKET); `prefix` is
        a wrapper command the daemon's command line is appended to (e.g. a sandbox)."""
        assert self.daemon is None or self.daemon.poll() is not None, "daemon already running"
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.daemon = subprocess.Popen(
            [*(prefix or []), *INGESTD, "run", "-c", str(self.config_path)],
            cwd=REPO,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})},
            **popen,
        )
        wait_for(lambda: self._started(), 30, what="the daemon to log 'ingestd started'")
        return self.daemon

    def restart(self, **popen: Any) -> subprocess.Popen[bytes]:
        """Start the daemon again and wait for *this* run's "ingestd started" line
        (`start` alone returns at once when the log already holds an earlier run's)."""
        before = self.log().count("ingestd started")
        proc = self.start(**popen)
        wait_for(
            lambda: self._started() and self.log().count("ingestd started") > before,
            30,
            interval=0.02,
            what="the restarted daemon to log 'ingestd started'",
        )
        return proc

    def _started(self) -> bool:
        if self.daemon is not None and self.daemon.poll() is not None:
            raise AssertionError(f"daemon exited {self.daemon.returncode}:\n{self.log()}")
        return "ingestd started" in self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        assert self.daemon is not None
        if self.daemon.poll() is None:
            self.daemon.send_signal(sig)
        rc = self.daemon.wait(timeout=timeout)
        return rc

    def kill(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.kill()
            self.daemon.wait(timeout=10)


# --- helpers for the behaviour, bad-input and config-error tests ---------------------------


def sha256_digest(data: bytes) -> str:
    """The digest the store reports for these bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def log_lines(env: Env, event: str, **fields: Any) -> list[dict[str, Any]]:
    """The daemon's JSON log lines with this `event` whose fields equal `fields`
    (e.g. `log_lines(env, "synced", item="/a.dat")`)."""
    return [
        e
        for e in env.log_events()
        if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
    ]


def synced_lines(env: Env, item: str, watch: str | None = None) -> list[dict[str, Any]]:
    """The "synced" lines for one item (each is one put to the sink)."""
    fields: dict[str, Any] = {"item": item}
    if watch is not None:
        fields["watch"] = watch
    return log_lines(env, "synced", **fields)


# Root ignores file mode bits (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so a file with
# mode 000 is readable to a daemon running as root. Running it as another user is not
# possible here (the interpreter may live under a 0700 home), so instead the daemon is
# started with those two capabilities removed from its bounding set: after exec, uid 0
# then gets every capability but them, and mode bits apply to it like to anyone else.
_PR_CAPBSET_DROP = 24
_DAC_CAPS = (1, 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
_libc = ctypes.CDLL(None, use_errno=True)


def _drop_dac_capabilities() -> None:  # runs in the child between fork and exec
    for cap in _DAC_CAPS:
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(err)}")


def mode_bits_popen(tmp: Path) -> dict[str, Any]:
    """Popen keyword arguments under which a child process obeys file mode bits, for
    `Env.start(**mode_bits_popen(tmp))`. Skips the test when that cannot be arranged."""
    popen: dict[str, Any] = {}
    if os.geteuid() == 0:
        popen["preexec_fn"] = _drop_dac_capabilities
    probe = tmp / "mode-bits-probe"
    probe.write_bytes(b"x")
    probe.chmod(0)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", f"open({str(probe)!r}, 'rb')"],
            capture_output=True,
            text=True,
            timeout=30,
            **popen,
        )
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot start a process that obeys file mode bits: {e}")
    finally:
        probe.unlink()
    if proc.returncode == 0:
        pytest.skip("cannot start a process that obeys file mode bits (mode 000 stays readable)")
    return popen


def blob_path(env: Env, digest: str) -> Path:
    """Where the local store keeps the bytes with this `sha256:<hex>` digest."""
    algo, _, hexdigest = digest.partition(":")
    assert algo == "sha256" and len(hexdigest) == 64, digest
    return env.store / "blobs" / "sha256" / hexdigest[:2] / hexdigest
