"""The durable sync state: what each item should be, what was last synced, what failed.

All SQL against the ledger lives in this package; everyone else calls its functions
and methods. By role:

- where.py: `LedgerAt`, where the ledger lives (SQLite under state_dir, or PostgreSQL)
- engine.py: `connect`, a connection of either engine
- db.py: the SQLite file, its schema and migrations
- pg.py: PostgreSQL: its schema, the SQL adapter, leases, daemons (a shared ledger)
- model.py: Claim, WatchCounts and the types of ops
- reads.py: every read query, as functions of a connection (any connection, read-only too)
- ops.py: every write, as `op_*` functions returning ops for a transaction
- ledger.py: `Ledger`, one connection with its transactions and reads as methods
- async_ledger.py: `AsyncLedger`, the daemon's group-committing view from the event loop
- reader.py: `LedgerReader`, the control endpoint's read-only connection on its own thread
"""

from __future__ import annotations

from ingestd.ledger.async_ledger import AsyncLedger
from ingestd.ledger.db import (
    DELETED,
    FAILED,
    ITEM,
    LEDGER_FILE,
    MEMBER,
    PENDING,
    SIDECAR,
    SYNCED,
)
from ingestd.ledger.engine import connect
from ingestd.ledger.hints import (
    HintRow,
    op_clear_queue_problem,
    op_drop_hint,
    op_hinted,
    op_note_hints,
    op_take_hints,
)
from ingestd.ledger.ledger import Ledger
from ingestd.ledger.model import Claim, ConflictCheck, LedgerOp, TypeOf, WatchCounts
from ingestd.ledger.ops import (
    key_conflict_reason,
    op_plan_settled,
    op_switch_backend,
    op_watch_settings,
)
from ingestd.ledger.reader import LedgerReader
from ingestd.ledger.reads import entries_in_dir, entry_dirs
from ingestd.ledger.where import LedgerAt

__all__ = [
    "DELETED",
    "FAILED",
    "ITEM",
    "LEDGER_FILE",
    "MEMBER",
    "PENDING",
    "SIDECAR",
    "SYNCED",
    "AsyncLedger",
    "Claim",
    "ConflictCheck",
    "HintRow",
    "Ledger",
    "LedgerAt",
    "LedgerOp",
    "LedgerReader",
    "TypeOf",
    "WatchCounts",
    "connect",
    "entries_in_dir",
    "entry_dirs",
    "key_conflict_reason",
    "op_clear_queue_problem",
    "op_drop_hint",
    "op_hinted",
    "op_note_hints",
    "op_plan_settled",
    "op_switch_backend",
    "op_take_hints",
    "op_watch_settings",
]
