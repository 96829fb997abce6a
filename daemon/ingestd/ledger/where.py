"""`LedgerAt`: where a ledger lives, SQLite under `state_dir` or a shared PostgreSQL.

The one value every opener of the ledger takes (`Ledger`, `AsyncLedger`,
`LedgerReader`, `connect`), so that callers say where once and the engine is chosen in
one place. A bare `Path` still means the SQLite ledger of that state_dir.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ingestd.ledger.db import LEDGER_FILE

DEFAULT_LEASE = 60.0  # seconds a claim or a listing lease lasts without renewal


def daemon_id() -> str:
    """This process's name in a shared ledger: host and pid for people, a random part
    so a pid reused after a restart is another daemon."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class LedgerAt:
    """Where the ledger is. `dsn` None: SQLite at state_dir/ledger.sqlite, one daemon per
    state_dir, claims in memory. `dsn` a postgresql:// URL without a password (the
    password comes from `password`, or libpq's own PGPASSFILE/~/.pgpass): every watch's
    ledger in one database, shared by any number of daemons, claims with leases."""

    state_dir: Path
    dsn: str | None = None
    password: str | None = field(default=None, repr=False)
    lease: float = DEFAULT_LEASE
    holder: str = field(default_factory=daemon_id)

    @classmethod
    def of(cls, where: Path | LedgerAt) -> LedgerAt:
        return where if isinstance(where, LedgerAt) else cls(Path(where))

    @property
    def shared(self) -> bool:
        return self.dsn is not None

    @property
    def sqlite_path(self) -> Path:
        return Path(self.state_dir) / LEDGER_FILE

    def exists(self) -> bool:
        """Whether there is a ledger to read (a shared one always is: it is created by
        the first daemon, and reading an empty one is fine)."""
        return self.shared or self.sqlite_path.exists()

    def url(self) -> str:
        """The DSN as a user may see it: scheme, user, host, port and database, never
        a password or the query's options ("" for SQLite)."""
        if self.dsn is None:
            return ""
        parts = urlsplit(self.dsn)
        user = f"{parts.username}@" if parts.username else ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{user}{parts.hostname or 'localhost'}{port}{parts.path or '/'}"

    def describe(self) -> str:
        """For messages: the file, or the server and database (never the password)."""
        if self.dsn is None:
            return str(self.sqlite_path)
        parts = urlsplit(self.dsn)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        return f"PostgreSQL {host}{port}{parts.path or '/'}"
