"""V7's vocabulary, without I/O: dataset slugs, storage keys, slot types and layouts,
what a registration answer says per item, what a listed item holds, and whether it is
the item we would make. The facts are in docs/platforms.md; where they came from a
reading of darwin-py 3.6, the function says so."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ingestd.core.errors import PermanentError, RetriableError, SyncError
from ingestd.core.model import SlotPayload

DEFAULT_BASE_URL = "https://darwin.v7labs.com/api"
DEFAULT_REQUESTS_PER_MINUTE = 1000  # V7's documented limit per API key
# darwin-py registers uploads 500 items a request (DARWIN_UPLOAD_CHUNK_SIZE); V7
# documents no larger limit, so 500 it is.
UPLOAD_CHUNK = 500
# V7's API reference: register_existing "can contain up to 100 items per request"
# (darwin-py sends 10 at a time, a limit it set itself).
EXISTING_CHUNK = 100
PAGE_SIZE = 500  # item listings: darwin-py's page size
LOOKUP_NAMES = 100  # item names per lookup request (keeps the URL short)
MAX_VIEWS = 16  # darwin-py lays out at most 16 slots; further slots get no view
MAX_CHANNELS = 16  # darwin-py refuses more than 16 channels in one cell

# Blocked-item reasons (darwin.utils) that clear up on a later attempt.
RETRIABLE_BLOCKS = frozenset({"FILE_UPLOAD_TIMEOUT", "FILE_UPLOAD_FAILED", "UNEXPECTED_ERROR"})
ALREADY_EXISTS = "ALREADY_EXISTS"
# Item statuses of an upload that never completed: nobody can use such an item.
INCOMPLETE = frozenset({"uploading", "error"})
_TYPES_BY_EXT = {
    **dict.fromkeys(("jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp"), "image"),
    **dict.fromkeys(("mp4", "avi", "mov", "wmv", "mkv", "webm", "m4v"), "video"),
    **dict.fromkeys(("dcm", "dicom", "nii"), "dicom"),
    "pdf": "pdf",
}

Key = tuple[str, str]  # (normalised path, name): an item's identity in a dataset


@dataclass(frozen=True, slots=True)
class Dataset:
    id: int
    slug: str
    name: str


def slugify(name: str) -> str:
    """A dataset's slug as V7 makes it from the name: lower-case, spaces to hyphens
    (what V7's troubleshooting guide documents; datasets match by slug or name)."""
    return name.strip().lower().replace(" ", "-")


def norm_path(path: str) -> str:
    return "/" + path.strip("/") if path.strip("/") else "/"


def key_of(path: str, name: str) -> Key:
    return (norm_path(path), name)


def storage_key(url: str) -> str:
    """The object key V7 expects for a bucket URL: the URL without scheme and bucket
    (`s3://bucket/a/b.jpg` -> `a/b.jpg`)."""
    parts = urlsplit(url)
    if parts.scheme not in ("s3", "gs", "az") or not parts.netloc:
        raise PermanentError(
            f"{url} is not an s3://, gs:// or az:// object URL, so V7 cannot register it "
            "from external storage; use transfer: copy for this watch"
        )
    key = parts.path.lstrip("/")
    if not key:
        raise PermanentError(f"{url} names a bucket, not an object")
    return key


def v7_type(slot_type: str, name: str) -> str | None:
    """The slot type V7 knows for a file (None: let V7 decide from the name)."""
    if slot_type in ("image", "video", "dicom"):
        return slot_type
    if slot_type == "frames":
        return "video"
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return _TYPES_BY_EXT.get(ext)


def slots_layout(names: Sequence[str], hint: Any = None) -> dict[str, Any] | None:
    """V7's version-3 layout for a multi-slot item.

    `hint` is the planner's layout (rows of cells of slot names). One cell holding
    every slot means channels: layers of one view, which V7 shows as one cell listing
    them all. Otherwise each slot is a view, laid out as darwin-py does
    (SLOTS_GRID_MAP): columns of cells, read row by row, one column per view up to 3
    views and ceil(sqrt(n)) columns beyond; only the first 16 slots get a view."""
    if len(names) < 2:
        return None
    if _is_one_cell(hint, names):
        if len(names) > MAX_CHANNELS:
            raise PermanentError(
                f"V7 shows at most {MAX_CHANNELS} channels in one view and this item has "
                f"{len(names)}; set group.max_channels to {MAX_CHANNELS} or split the folder"
            )
        return {"version": 3, "slots_grid": [[list(names)]]}
    views = list(names[:MAX_VIEWS])
    n = len(views)
    columns = n if n <= 3 else math.ceil(math.sqrt(n))
    grid = [[[views[i]] for i in range(c, n, columns)] for c in range(columns)]
    return {"version": 3, "slots_grid": grid}


def _is_one_cell(hint: Any, names: Sequence[str]) -> bool:
    if not isinstance(hint, Mapping):
        return False
    rows = hint.get("rows")
    cells = [cell for row in rows for cell in row] if isinstance(rows, list) else []
    return len(cells) == 1 and isinstance(cells[0], list) and list(cells[0]) == list(names)


def identity(slots: Iterable[Any]) -> list[Any]:
    """What an item's content is, from payload slots or a ledger manifest's slots: per
    slot its name, type and files (name plus digest, or URL and ETag). V7 keeps no
    checksum of ours, so this is how a same-name, same-size change is told apart."""
    out = []
    for s in slots:
        if isinstance(s, SlotPayload):
            name, kind, files = s.name, s.type, [f.manifest() for f in s.files]
        else:
            name, kind, files = s.get("name"), s.get("type"), list(s.get("files") or [])
        out.append(
            [
                name,
                kind,
                [
                    [f.get("name"), f.get("digest") or "", f.get("url") or "", f.get("etag")]
                    for f in files
                ],
            ]
        )
    return out


# --- what V7 answers -------------------------------------------------------------------


@dataclass
class Registered:
    """What one register request said about the items it carried, by key."""

    created: dict[Key, dict[str, Any]] = field(default_factory=dict)  # item JSON, upload ids
    blocked: dict[Key, set[str]] = field(default_factory=dict)  # the slots' reasons


def read_registered(data: Any) -> Registered:
    """The answer of register_upload / register_existing: `items` (each slot with its
    `upload_id`) and `blocked_items` (each slot with a `reason`). One item can be in
    both: V7 merges slot names that are new into an existing item and blocks the rest
    as ALREADY_EXISTS (darwin-py #937)."""
    out = Registered()
    if not isinstance(data, Mapping):
        return out
    for it in data.get("items") or []:
        if isinstance(it, Mapping) and "name" in it and "id" in it:
            out.created[key_of(str(it.get("path") or "/"), str(it["name"]))] = dict(it)
    for it in data.get("blocked_items") or []:
        if not isinstance(it, Mapping) or "name" not in it:
            continue
        reasons = {
            str(s.get("reason") or "").upper()
            for s in it.get("slots") or []
            if isinstance(s, Mapping)
        } - {""}
        k = key_of(str(it.get("path") or "/"), str(it["name"]))
        out.blocked.setdefault(k, set()).update(reasons or {"UNKNOWN"})
    return out


def blocked_error(key: str, reasons: set[str]) -> SyncError:
    """The error an item blocked for `reasons` (other than ALREADY_EXISTS) fails with."""
    text = ", ".join(sorted(reasons))
    if "ITEM_COUNT_LIMIT_EXCEEDED" in reasons:
        return PermanentError(
            f"V7 refused item {key}: the team's item limit is reached "
            "(ITEM_COUNT_LIMIT_EXCEEDED); archive or delete items in V7 or raise the "
            "plan's limit, then run `ingestd retry`"
        )
    if reasons <= RETRIABLE_BLOCKS:
        return RetriableError(f"V7 blocked item {key} ({text}); will try again")
    return PermanentError(f"V7 blocked item {key} ({text})")


@dataclass
class Found:
    """The items a dataset holds at one key: live ones (not archived) and how many
    archived ones (V7 keeps an archived item's name; its successors count on)."""

    live: list[dict[str, Any]] = field(default_factory=list)
    archived: int = 0


def read_found(items: Iterable[Any], wanted: set[Key], into: dict[Key, Found]) -> None:
    """Sort a page of listed items into `into` by key, keeping only exact keys in
    `wanted` (V7 filters names and paths separately: a page may hold other pairs)."""
    for it in items:
        if not isinstance(it, Mapping) or "name" not in it:
            continue
        k = key_of(str(it.get("path") or "/"), str(it["name"]))
        if k not in wanted:
            continue
        found = into.setdefault(k, Found())
        if it.get("archived") or it.get("status") == "archived":
            found.archived += 1
        else:
            found.live.append(dict(it))


def complete(item: Mapping[str, Any]) -> bool:
    return str(item.get("status") or "") not in INCOMPLETE


def holds(found: Mapping[str, Any], expect: Mapping[str, tuple[str | None, list[Any]]]) -> bool:
    """Whether a listed V7 item holds what we would make: the same slot names, and per
    slot the same type (where V7 tells), file names and sizes (where known).
    `expect` maps slot name -> (type, [(file name, size or None)])."""
    theirs: dict[str, Mapping[str, Any]] = {}
    for s in found.get("slots") or []:
        if isinstance(s, Mapping) and "slot_name" in s:
            theirs[str(s["slot_name"])] = s
    if set(theirs) != set(expect):
        return False
    for name, (kind, files) in expect.items():
        t = theirs[name]
        if kind is not None and t.get("type") not in (None, kind):
            return False
        listed = t.get("source_files")
        if isinstance(listed, list) and listed:
            got = [(str(x.get("file_name")), x.get("size_bytes")) for x in listed]
        else:
            got = [(str(t.get("file_name")), None)]
        if sorted(n for n, _ in got) != sorted(n for n, _ in files):
            return False
        ours = [size for _, size in files]
        total = t.get("size_bytes")
        if None not in ours and isinstance(total, int) and total != sum(ours):
            return False
        sizes = {n: z for n, z in got if isinstance(z, int)}
        if any(z is not None and n in sizes and sizes[n] != z for n, z in files):
            return False
    return True
