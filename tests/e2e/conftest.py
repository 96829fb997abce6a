"""End-to-end helpers: the real CLI as a subprocess on real temporary folders."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

INGESTD = [sys.executable, "-m", "ingestd.cli"]
REPO = Path(__file__).resolve().parents[2]


def wait_for(
    cond: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll until cond() is truthy; fail with `what` after a generous deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}; last={last!r}")


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


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.kill()


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


# --- `ingestd serve` and the fault proxy, for the HTTP tests --------------------------------

SERVE = [*INGESTD, "serve"]


def free_port() -> int:
    """A TCP port nobody listens on right now (kept for the server's restarts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vm_hwm_kb(pid: int) -> int:
    """Peak resident set size (VmHWM, kB) of a running process."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


class HttpAnswer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"HttpAnswer({self.status}, {self.body[:300]!r})"


class Server:
    """`ingestd serve` as a subprocess on a fixed loopback port: start, SIGKILL, restart."""

    def __init__(
        self,
        root: Path,
        token: str | None,
        *,
        max_body: int | None = None,
        name: str = "server",
    ) -> None:
        self.root = root
        self.store = root / f"{name}-store"
        self.log_path = root / f"{name}.log"
        self.token = token
        self.token_file: Path | None = None
        if token is not None:
            self.token_file = root / f"{name}-tokens"
            self.token_file.write_text(f"# tokens of the test server\n{token}\n")
        self.max_body = max_body
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> subprocess.Popen[bytes]:
        assert self.proc is None or self.proc.poll() is not None, "server already running"
        cmd = [*SERVE, "--store", str(self.store), "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--log-format", "json"]
        if self.token_file is not None:
            cmd += ["--token-file", str(self.token_file)]
        if self.max_body is not None:
            cmd += ["--max-body", str(self.max_body)]
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("INGESTD_SERVE_TOKENS", None)
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log, env=env)
        log.close()
        wait_for(self._healthy, 30, interval=0.05, what="ingestd serve to answer /healthz")
        return self.proc

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"ingestd serve exited {self.proc.returncode}:\n{self.log()}")
        try:
            return self.request("GET", "/healthz", token=None, timeout=2).status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no cleanup, no flush, like a power cut for the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def restart(self) -> subprocess.Popen[bytes]:
        self.kill()
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(
        self,
        method: str,
        path: str,
        body: bytes | Iterable[bytes] | None = None,
        *,
        headers: dict[str, str] | None = None,
        token: str | bool | None = True,
        chunked: bool = False,
        timeout: float = 30,
    ) -> HttpAnswer:
        """One raw request (http.client sends the path exactly as given: `../` stays).
        token=True sends the server's token, None sends none, a string sends that;
        chunked=True sends an iterable body with Transfer-Encoding: chunked."""
        import http.client

        h = dict(headers or {})
        if token is True:
            token = self.token
        if isinstance(token, str):
            h["Authorization"] = f"Bearer {token}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=h, encode_chunked=chunked)
            resp = conn.getresponse()
            data = resp.read()
            return HttpAnswer(resp.status, dict(resp.getheaders()), data)
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as {'name{labels}': value}."""
        text = self.request("GET", "/metrics", token=None).body.decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def bytes_received(self) -> float:
        """ingestd_serve_bytes_received_total summed over routes, in this server's life."""
        return sum(
            v
            for k, v in self.metrics().items()
            if k.split("{", 1)[0] == "ingestd_serve_bytes_received_total"
        )

    def blob_digests(self) -> set[str]:
        """Digests of the blobs in the server's store (by file name)."""
        root = self.store / "blobs" / "sha256"
        if not root.is_dir():
            return set()
        return {"sha256:" + b.name for shard in root.iterdir() for b in shard.iterdir()}


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Factory: make_server(token=..., max_body=..., name=...) -> a started Server."""
    servers: list[Server] = []

    def make(token: str | None = "test-token-0123456789abcdef", **kw: Any) -> Server:
        s = Server(tmp_path, token, **kw)
        servers.append(s)
        s.start()
        return s

    yield make
    for s in servers:
        s.kill()


PROXY = [sys.executable, "-m", "tests.e2e.fault_proxy"]


class Proxy:
    """tests/e2e/fault_proxy.py as a subprocess in front of a Server."""

    def __init__(self, root: Path, upstream: str, **faults: float) -> None:
        self.port = free_port()
        self.log_path = root / "proxy.log"
        args = [f"--{k.replace('_', '-')}={v}" for k, v in faults.items()]
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [*PROXY, "--port", str(self.port), "--upstream", upstream, *args],
            cwd=REPO,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        log.close()
        wait_for(self._up, 30, interval=0.05, what="the fault proxy to listen")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"fault proxy exited {self.proc.returncode}:\n{self.log()}")
        try:
            return bool(self.stats())
        except OSError:
            return False

    def stats(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/_proxy/stats", timeout=5) as r:
            return json.loads(r.read())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
