"""A real PostgreSQL server for the shared-ledger tests, from Debian's `postgresql`
package (`initdb` and `postgres` under /usr/lib/postgresql/<version>/bin; `.ci/run`
installs the package).

`PostgresServer` makes a cluster in a fresh temp dir with `initdb` and runs `postgres`
on a free loopback port (and a unix socket in the data dir), stopped with a fast
shutdown. PostgreSQL refuses to run as root: as root both run as `nobody`, with the
data dir handed to it. It can be stopped and started again on the same port and data
(the outage tests do). `start_postgres` wraps it as a services.py `Service`, which
exports INGESTD_TEST_POSTGRES_DSN.

For the tests: `pg_dsn()` is that DSN (or a skip, a failure under CI), and
`fresh_schema(dsn)` a context manager giving a DSN whose tables live in a schema of
their own, dropped afterwards, so tests never see each other's rows.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.support.need import need
from tests.support.ports import free_port

ENV_POSTGRES_DSN = "INGESTD_TEST_POSTGRES_DSN"  # postgresql://ingestd@127.0.0.1:PORT/postgres
USER = "ingestd"


def pg_bin() -> Path | None:
    """The newest installed server's bin folder, or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    return Path(found[-1]).parent if found else None


def _as_nobody() -> tuple[Callable[[], None] | None, int | None]:
    """preexec_fn dropping root to nobody (PostgreSQL will not run as root), and its uid."""
    if os.geteuid() != 0:
        return None, None
    pw = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)

    return drop, pw.pw_uid


class PostgresServer:
    """One cluster in a temp dir; `start`/`stop` as often as wanted (same port, same data)."""

    def __init__(self, log_path: Path | None = None) -> None:
        bindir = pg_bin()
        if bindir is None:
            raise RuntimeError("no PostgreSQL server: install Debian's postgresql package")
        self.bindir = bindir
        self.preexec, uid = _as_nobody()
        self.dir = Path(tempfile.mkdtemp(prefix="ingestd-pg-"))
        self.data = self.dir / "data"
        self.log_path = log_path or self.dir / "postgres.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        if uid is not None:
            os.chown(self.dir, uid, -1)
        self._run(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )

    @property
    def dsn(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    def _run(self, argv: list[str]) -> None:
        out = subprocess.run(
            argv, capture_output=True, text=True, preexec_fn=self.preexec, cwd=self.dir
        )
        if out.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {out.stdout}{out.stderr}")

    def start(self, timeout: float = 60.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the server writes it until stop
        self.proc = subprocess.Popen(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.data}",
                # A test cluster: losing it in a power cut is fine; speed is not.
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=self.preexec,
            cwd=self.dir,
        )
        log.close()
        deadline = time.monotonic() + timeout
        import psycopg

        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited while starting:\n{self.log_tail()}")
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"postgres not ready:\n{self.log_tail()}") from None
            time.sleep(0.05)  # poll interval, not a wait for readiness

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Fast shutdown (SIGINT): clients are disconnected, as when a server goes away."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_postgres(*, log_dir: Path | None = None, own_group: bool = True) -> Any:
    """The PostgreSQL server as a services.py Service (imported there)."""
    from tests.support.services import Service

    t0 = time.monotonic()
    log = None
    if log_dir is not None:
        log = Path(tempfile.mkstemp(prefix="ingestd-postgres-", suffix=".log", dir=log_dir)[1])
    server = PostgresServer(log)
    server.start()
    return Service(
        "postgres",
        server.dsn,
        {ENV_POSTGRES_DSN: server.dsn},
        time.monotonic() - t0,
        _Handle(server),  # type: ignore[arg-type]
    )


class _Handle:
    """What Service asks of its process."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server

    def alive(self) -> bool:
        return self.server.alive()

    def log_tail(self, n: int = 2000) -> str:
        return self.server.log_tail(n)

    def stop(self) -> None:
        self.server.remove()


# -- for the tests --------------------------------------------------------------------------


def pg_dsn() -> str:
    dsn = os.environ.get(ENV_POSTGRES_DSN)
    need(dsn, f"no PostgreSQL ({ENV_POSTGRES_DSN} unset: `. .ci/services.sh && start_services`)")
    assert dsn is not None
    return dsn


def with_schema(dsn: str, schema: str) -> str:
    sep = "&" if "?" in dsn else "?"
    return f"{dsn}{sep}options=-csearch_path%3D{schema}"


@contextlib.contextmanager
def fresh_schema(dsn: str) -> Iterator[str]:
    """A DSN whose tables go to a new schema of their own, dropped at the end."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_schema(dsn, schema)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
