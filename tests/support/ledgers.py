"""Ledgers of both engines for the conformance tests: `ledger_at(engine, tmp)` gives a
LedgerAt for SQLite under `tmp` or for PostgreSQL in a schema of its own (dropped
afterwards). Parametrize a fixture with ENGINES to run a test against both."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ingestd.ledger import LedgerAt

from tests.support.postgres import fresh_schema, pg_dsn

ENGINES = ("sqlite", "postgresql")


@contextlib.contextmanager
def ledger_at(engine: str, state_dir: Path, *, lease: float = 60.0) -> Iterator[LedgerAt]:
    if engine == "sqlite":
        yield LedgerAt(state_dir, lease=lease)
        return
    with fresh_schema(pg_dsn()) as dsn:
        yield LedgerAt(state_dir, dsn=dsn, lease=lease)


class CountingConn:
    """A connection that counts the statements sent through it (round trips)."""

    def __init__(self, conn: object) -> None:
        self.conn = conn
        self.sent: list[str] = []

    def execute(self, sql: str, params: object = ()) -> object:
        self.sent.append(sql.split()[0].upper())
        return self.conn.execute(sql, params)  # type: ignore[attr-defined]

    def executemany(self, sql: str, rows: object) -> object:
        self.sent.append(sql.split()[0].upper())
        return self.conn.executemany(sql, rows)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.conn, name)
