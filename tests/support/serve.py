"""`ingestd serve` as a subprocess on a loopback port (`Server`: start, SIGKILL, restart,
raw requests, metrics), and the fault proxy in front of it (`Proxy`), for the HTTP
end-to-end tests. The `make_server` fixture is in tests/e2e/conftest.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.support.daemon import INGESTD, REPO
from tests.support.ports import free_port
from tests.support.wait import wait_for

__all__ = ["PROXY", "SERVE", "HttpAnswer", "Proxy", "Server", "free_port", "vm_hwm_kb"]

SERVE = [*INGESTD, "serve"]


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


PROXY = [sys.executable, "-m", "tests.support.fault_proxy"]


class Proxy:
    """tests/support/fault_proxy.py as a subprocess in front of a Server."""

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
