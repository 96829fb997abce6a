"""Opening a ledger connection of either engine: SQLite (db.py) or PostgreSQL (pg.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from ingestd.ledger import db
from ingestd.ledger.where import LedgerAt

# A connection of either engine: sqlite3's, or pg.PgConn, which has its shape.
Conn = Any


def connect(where: Path | LedgerAt, *, readonly: bool = False) -> Conn:
    """A connection to the ledger: a Path is the SQLite file itself (as db.connect
    takes it); a LedgerAt says which engine."""
    if not isinstance(where, LedgerAt):
        return db.connect(Path(where), readonly=readonly)
    if where.dsn is None:
        return db.connect(where.sqlite_path, readonly=readonly)
    # Imported here: psycopg is loaded only by daemons that use PostgreSQL.
    from ingestd.ledger import pg

    return pg.connect(where, readonly=readonly)


def is_sqlite(conn: Conn) -> bool:
    return isinstance(conn, sqlite3.Connection)
