"""What the daemon's dashboard shows of a ledger item: its JSON for /api/items, and
which file of a local folder its thumbnail is made from."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ingestd.core.model import ItemPlan
from ingestd.core.rawnames import to_os
from ingestd.media.thumbs import cache_key, pick


def parse_plan(row: dict[str, Any]) -> ItemPlan | None:
    try:
        return ItemPlan.from_json(json.loads(row["plan"])) if row["plan"] else None
    except (ValueError, KeyError, TypeError):
        return None


def thumb_source(
    row: dict[str, Any], folder: Path | None, plan: ItemPlan | None
) -> tuple[str, str, str, int, int] | None:
    """(cache key, kind, path, size, mtime_ns) of the file to show for an item: only
    for a synced item of a local folder, and keyed by what its synced manifest says
    the content was, so a changed item gets a new thumbnail and a touch does not."""
    if folder is None or plan is None or row["status"] != "synced":
        return None
    if not row["synced_manifest"] or row["synced_fp"] != row["desired_fp"]:
        return None
    try:
        manifest = json.loads(row["synced_manifest"])
        sent_slots = manifest.get("slots") or []
    except (ValueError, AttributeError):
        return None
    for i, slot in enumerate(plan.slots):
        chosen = pick(slot.type, [f.relpath for f in slot.files])
        if chosen is None:
            continue
        kind, rel = chosen
        if rel.startswith("/") or ".." in rel.split("/"):
            return None
        f = next(f for f in slot.files if f.relpath == rel)
        sent = sent_slots[i] if i < len(sent_slots) and isinstance(sent_slots[i], dict) else {}
        content = json.dumps(sent.get("files"), sort_keys=True) if sent.get("files") else ""
        content = content or str(manifest.get("source_key", ""))
        if not content:
            return None
        # rel is the ledger's text form of the name (core.rawnames): back to the OS's.
        return cache_key(kind, rel, content), kind, str(folder / to_os(rel)), f.size, f.mtime_ns
    return None


def unchanged(path: str, size: int, mtime_ns: int) -> bool:
    """Whether the file still has the size and mtime the item was planned with."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (size, mtime_ns)


def item_json(row: dict[str, Any], folder: Path | None) -> dict[str, Any]:
    """One item of /api/items, from its ledger row (reads.ITEM_COLUMNS); `folder` is
    its watch's local folder (None: a bucket, or a watch no longer configured)."""
    plan = parse_plan(row)
    thumb = thumb_source(row, folder, plan)
    kind = plan.slots[0].type if plan is not None and plan.slots else None
    url = None
    if thumb is not None:
        url = (
            f"thumbs/{quote(row['watch'], safe='')}/{quote(row['source_id'], safe='/')}"
            f"?v={thumb[0][:16]}"
        )
    return {
        "watch": row["watch"],
        "source_id": row["source_id"],
        "dataset": row["dataset"],
        "key": row["key"],
        "status": row["status"],
        "last_error": row["last_error"],
        "error_kind": row["error_kind"],
        "attempts": row["attempts"],
        "updated_at": row["updated_at"],
        "kind": kind,
        "thumbnail": url,
    }
