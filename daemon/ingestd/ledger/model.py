"""What ledger reads hand out and what ledger writes take: claims, counts, op types."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ingestd.core.model import ItemPlan


@dataclass(frozen=True, slots=True)
class Claim:
    """A due item handed to a sync worker."""

    watch: str
    source_id: str
    dataset: str
    key: str
    plan: ItemPlan | None  # None: the item should no longer exist (delete it)
    desired_fp: str | None
    synced_manifest: dict[str, Any] | None
    attempts: int
    backend_id: str | None
    key_owner: tuple[str, str] | None = None  # another live item holding this key
    planned_at: float = 0.0  # items.updated_at when claimed: planned, or its last retry set
    # The daemon holding the lease (a shared ledger); None with SQLite, whose claims
    # live only in the daemon's memory. Outcome ops apply only while it still holds it.
    holder: str | None = None


@dataclass(frozen=True, slots=True)
class WatchCounts:
    synced: int = 0
    pending: int = 0
    failed: int = 0
    deleted: int = 0


LedgerOp = Callable[[sqlite3.Connection], Any]
ConflictCheck = Callable[[Mapping[str, Any], Mapping[str, tuple[str, str]]], list[str]]
TypeOf = Callable[[Any], str | None]
