"""The shared vocabulary: entries a source reports and the items a plan produces.

This module sits at the bottom of the import graph (it imports nothing from the
package but core.rawnames) so that sources, plan, ledger, sync and sinks can all speak the same types
without importing each other.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ingestd.core.rawnames import display

SlotType = Literal["image", "video", "frames", "dicom", "file"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One file as a source reports it. `relpath` uses `/` and is relative to the watch root.
    Bucket objects also carry their ETag (None for local files)."""

    relpath: str
    size: int
    mtime_ns: int
    etag: str | None = None

    @property
    def name(self) -> str:
        return self.relpath.rsplit("/", 1)[-1]

    @property
    def parent(self) -> str:
        """The folder holding the entry, relative to the watch root ('' for the root)."""
        return self.relpath.rsplit("/", 1)[0] if "/" in self.relpath else ""


@dataclass(frozen=True, slots=True)
class PlannedFile:
    """A source file that a slot is made of: where to read it and what it looked like."""

    name: str  # the file name shown in the dataset
    relpath: str  # source path relative to the watch root
    size: int
    mtime_ns: int
    etag: str | None = None  # bucket objects: the version planned (pins reads, keys content)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "relpath": self.relpath,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
        }
        if self.etag is not None:  # absent for local files: their fingerprints stay as they were
            d["etag"] = self.etag
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PlannedFile:
        return cls(d["name"], d["relpath"], int(d["size"]), int(d["mtime_ns"]), d.get("etag"))


@dataclass(frozen=True, slots=True)
class PlannedSlot:
    name: str
    type: SlotType
    files: tuple[PlannedFile, ...]
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. fps hints, timestamps

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "files": [f.to_json() for f in self.files],
        }
        if self.extra:
            d["extra"] = self.extra
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PlannedSlot:
        return cls(
            d["name"],
            d["type"],
            tuple(PlannedFile.from_json(f) for f in d["files"]),
            dict(d.get("extra") or {}),
        )


def item_key(path: str, name: str) -> str:
    """The dataset-wide identity of an item: its folder joined with its name. Bytes of
    a file name that are not UTF-8 show as %XX (core.rawnames), as the backend has them."""
    return display(f"{path.rstrip('/')}/{name}")


@dataclass(frozen=True, slots=True)
class ItemPlan:
    """What a set of entries should become in the dataset (the output of plan/)."""

    source_id: str  # what the watch tracks this item by: the file's or the group folder's relpath
    path: str  # folder inside the dataset, always starting with '/'
    name: str
    slots: tuple[PlannedSlot, ...]
    metadata: dict[str, Any]
    fingerprint: str  # changes whenever any input of the item changes

    @property
    def key(self) -> str:
        return item_key(self.path, self.name)

    def to_json(self) -> dict[str, Any]:
        return {
            "source_id": self.source_id,
            "path": self.path,
            "name": self.name,
            "slots": [s.to_json() for s in self.slots],
            "metadata": self.metadata,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ItemPlan:
        return cls(
            d["source_id"],
            d["path"],
            d["name"],
            tuple(PlannedSlot.from_json(s) for s in d["slots"]),
            dict(d["metadata"]),
            d["fingerprint"],
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))


# --- what a sink receives -------------------------------------------------------------


# Opens a fresh stream of a file's bytes (one call per attempt): how a sink reads a
# bucket object in `transfer: copy` mode without a local copy.
Opener = Callable[[], AsyncIterator[bytes]]


@dataclass(frozen=True, slots=True)
class FilePayload:
    """One file of a slot, ready to send. Exactly one of three forms:

    - local bytes: `local_path` set; the sink (re)opens it on every attempt;
    - streamed bytes: `opener` set (a bucket object copied without a local copy);
    - a remote reference: `url` set (`transfer: register`); no bytes move, and
      `digest` is "" unless known; `etag` says which version of the object it is.

    A sink that streams bytes checks them against `digest` and raises
    SourceChangedError on a mismatch (the object changed after it was hashed)."""

    name: str
    local_path: str  # absolute path, or "" for streamed and remote files
    size: int
    digest: str  # "sha256:<hex>" of the content as hashed by the prepare step, or ""
    url: str | None = None
    etag: str | None = None
    opener: Opener | None = field(default=None, compare=False, repr=False)
    content_type: str | None = None
    # A remote reference's https form, for platforms that fetch only https (Labelbox,
    # Nucleus): e.g. https://<account>.blob.core.windows.net/<container>/<key> for az://.
    # None when the object has none a platform could fetch. Not part of the manifest:
    # `url` is the object's identity.
    https_url: str | None = field(default=None, compare=False)

    @property
    def is_remote(self) -> bool:
        return self.url is not None

    def manifest(self) -> dict[str, Any]:
        if self.url is not None:
            d: dict[str, Any] = {"name": self.name, "url": self.url, "size": self.size}
            if self.etag:
                d["etag"] = self.etag
            if self.digest:
                d["digest"] = self.digest
            return d
        return {"name": self.name, "digest": self.digest, "size": self.size}


@dataclass(frozen=True, slots=True)
class SlotPayload:
    name: str
    type: SlotType
    files: tuple[FilePayload, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "files": [f.manifest() for f in self.files],
        }
        d.update(self.extra)
        return d


@dataclass(frozen=True, slots=True)
class ItemPayload:
    path: str
    name: str
    slots: tuple[SlotPayload, ...]
    metadata: dict[str, Any]

    @property
    def key(self) -> str:
        return item_key(self.path, self.name)

    def manifest(self) -> dict[str, Any]:
        """The content identity of the item: equal manifests mean nothing to send."""
        return {
            "path": self.path,
            "name": self.name,
            "slots": [s.manifest() for s in self.slots],
            "metadata": self.metadata,
        }
