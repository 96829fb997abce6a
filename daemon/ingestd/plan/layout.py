"""Ungrouped watches: one file becomes one item with one slot.

Pure: everything the planner knows arrives as arguments (the watch's rules, the entry,
a sidecar the caller already read), so the same inputs always give the same plan.
"""

from __future__ import annotations

from typing import Any

from ingestd.config import Watch
from ingestd.core.fingerprint import fingerprint
from ingestd.core.model import Entry, ItemPlan, PlannedFile, PlannedSlot, SlotType
from ingestd.core.rawnames import display
from ingestd.media.detect import slot_type_for
from ingestd.plan.metadata import Sidecar, bind_path_pattern, build_metadata, is_sidecar_name

__all__ = ["PlanError", "dataset_folder", "plan_file", "plan_fingerprint"]


class PlanError(Exception):
    """The entry cannot become an item until the user fixes something. `reason` is one
    sentence naming the file and the fix, fit for `ingestd status` and the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def dataset_folder(watch_path: str, preserve_folders: bool, parent: str) -> str:
    """The item's folder inside the dataset.

    `watch_path` is the watch's normalised `path` (`/` or `/a/b`); `parent` is the
    file's folder relative to the watch root (`""` at the root). With
    `preserve_folders` the source's sub-folders are mirrored under `watch_path`;
    without, every item lands directly in `watch_path`. A folder name that is not
    UTF-8 shows as the backend sees it (core.rawnames.display: `d%FF`).
    """
    if not watch_path.startswith("/") or (watch_path != "/" and watch_path.endswith("/")):
        raise ValueError(f"watch path {watch_path!r} is not normalised (/ or /a/b)")
    if parent.startswith("/") or parent.endswith("/"):
        raise ValueError(f"parent {parent!r} must be relative, without a trailing /")
    if not preserve_folders or not parent:
        return watch_path
    parent = display(parent)
    return f"/{parent}" if watch_path == "/" else f"{watch_path}/{parent}"


def plan_fingerprint(
    path: str,
    name: str,
    slots: tuple[PlannedSlot, ...],
    metadata: dict[str, Any],
    sidecar: Sidecar | None,
) -> str:
    """The fingerprint of everything an item is made from. The sidecar's identity
    (relpath, size, mtime) is included beside the metadata it produced so that a sidecar
    edit is noticed even when it leaves the merged metadata unchanged."""
    return fingerprint(
        {
            "path": path,
            "name": name,
            "slots": [s.to_json() for s in slots],
            "metadata": metadata,
            "sidecar": None
            if sidecar is None
            else {"relpath": sidecar.relpath, "size": sidecar.size, "mtime_ns": sidecar.mtime_ns},
        }
    )


def _check_relpath(relpath: str) -> None:
    # A malformed relpath is a bug in the caller, not something the user can fix, so it
    # is a ValueError rather than a PlanError.
    if not relpath or relpath.startswith("/") or relpath.endswith("/"):
        raise ValueError(f"entry relpath {relpath!r} must be relative, like a/b.jpg")
    for part in relpath.split("/"):
        if part in ("", ".", "..") or "\x00" in part:
            raise ValueError(f"entry relpath {relpath!r} has an empty, . or .. segment or NUL")


def plan_file(
    watch: Watch, entry: Entry, sidecar: Sidecar | None, slot_type: SlotType | None = None
) -> ItemPlan:
    """The item one file becomes: named after the file, in `dataset_folder(...)`, with
    one slot `"0"` holding the file, and metadata from static < path pattern < sidecar.
    `slot_type` overrides the type the name gives (the caller sniffed the content).

    A path that does not match `metadata.path_pattern` simply gets no path fields: the
    pattern describes the usual layout, and a stray file is still worth syncing.

    Names are taken as they are, control characters included: a POSIX name cannot hold
    `/` or NUL, and everything else must survive to the store; rejecting names a given
    backend cannot show is the sink's call, not the planner's. The one translation is
    of bytes that are not UTF-8 (a relpath holds them in core.rawnames' text form):
    the item's name, folder and path fields show them as %XX (`caf%E9.jpg`).

    Raises PlanError when the sidecar cannot be used, and ValueError when the caller
    breaks the contract (malformed relpath, a sidecar entry planned as an item, a
    sidecar handed in for a watch without one).
    """
    _check_relpath(entry.relpath)
    rules = watch.metadata
    # The config has compiled the pattern and template already, so these cannot fail.
    is_sidecar = rules.sidecar is not None and is_sidecar_name(rules.sidecar, entry.name)
    path_fields = (
        bind_path_pattern(rules.path_pattern, display(entry.relpath))
        if rules.path_pattern is not None
        else None
    )
    if is_sidecar:
        raise ValueError(f"{entry.relpath} is a sidecar ({rules.sidecar}), not an item")
    if sidecar is not None and rules.sidecar is None:
        raise ValueError(f"watch {watch.name} has no sidecar template but one was passed")
    if sidecar is not None and sidecar.error is not None:
        raise PlanError(
            f"sidecar {sidecar.relpath} of {entry.relpath} cannot be used: {sidecar.error}; "
            "fix the file so it holds one JSON object, or delete it"
        )

    path = dataset_folder(watch.path, watch.preserve_folders, entry.parent)
    name = display(entry.name)
    slots = (
        PlannedSlot(
            name="0",
            type=slot_type or slot_type_for(name),
            files=(PlannedFile(name, entry.relpath, entry.size, entry.mtime_ns, entry.etag),),
        ),
    )
    metadata = build_metadata(
        rules.static, path_fields, sidecar.data if sidecar is not None else None
    )
    return ItemPlan(
        source_id=entry.relpath,
        path=path,
        name=name,
        slots=slots,
        metadata=metadata,
        fingerprint=plan_fingerprint(path, name, slots, metadata, sidecar),
    )
