"""An item as V7 will hold it: the registration entries of its slots and, for uploads,
the bytes of each V7 file (a file as it is, a series as one ZIP, sampled frames as one
AVI), every file read through a verified stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ingestd.core.errors import PermanentError, SourceChangedError, SyncError
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
from ingestd.media.containers import (
    Opener,
    Part,
    TooBig,
    frame_codec,
    frame_size,
    frames_avi,
    stored_zip,
)
from ingestd.sinks.darwin.api import norm_path, slots_layout, storage_key, v7_type
from ingestd.sinks.kit.verified import VerifiedFile, read_local

LAYOUT_KEY = "layout"  # the planner's layout hint in the first slot's extra


@dataclass
class Source:
    """The bytes of one V7 file. `body()` starts over on every call (one per attempt)
    and raises what a verified stream found wrong before, so a retry never sends the
    same bad bytes again. A small local file may be read ahead whole and checked
    (`data`, see `preload`): then it is sent from memory."""

    file_name: str
    size: int
    open: Opener
    checks: list[VerifiedFile]
    file: FilePayload | None = None  # a file sent as it is (not a container)
    data: bytes | None = None

    def failed(self) -> SyncError | None:
        return next((c.error for c in self.checks if c.error is not None), None)

    def body(self) -> AsyncIterator[bytes] | bytes:
        error = self.failed()
        if error is not None:
            raise error
        return self.data if self.data is not None else self.open()


@dataclass
class Slot:
    name: str
    type: str | None
    entries: list[dict[str, Any]] = field(default_factory=list)  # what is registered
    sources: list[Source] = field(default_factory=list)  # uploads only
    files: list[tuple[str, int | None]] = field(default_factory=list)  # as V7 lists them


@dataclass
class Shape:
    remote: bool  # register_existing (bucket objects) rather than uploads
    slots: list[Slot]
    layout: dict[str, Any] | None

    def payload(self, item: ItemPayload) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": item.name,
            "path": norm_path(item.path),
            "slots": [e for s in self.slots for e in s.entries],
        }
        if self.layout is not None:
            d["layout"] = self.layout
        return d

    def expect(self) -> dict[str, tuple[str | None, list[Any]]]:
        return {s.name: (s.type, list(s.files)) for s in self.slots}

    def uploads(self) -> list[tuple[str, Source]]:
        return [(s.name, src) for s in self.slots for src in s.sources]


async def shape_of(item: ItemPayload, storage_slug: str | None, team: str) -> Shape:
    files = [f for s in item.slots for f in s.files]
    if not files:
        raise PermanentError(f"item {item.key} has no files to send to V7")
    remote = [f.is_remote for f in files]
    if any(remote) and not all(remote):
        raise PermanentError(
            f"item {item.key} mixes bucket references and local files; V7 registers an "
            "item either from external storage or from uploads, not both"
        )
    if "/" in item.name:
        raise PermanentError(f"V7 item names cannot contain '/': {item.name!r}")
    names = [s.name for s in item.slots]
    if len(set(names)) != len(names):
        raise PermanentError(f"item {item.key} has two slots with the same name")
    layout = slots_layout(names, item.slots[0].extra.get(LAYOUT_KEY))
    if all(remote):
        if not storage_slug:
            raise PermanentError(
                f"item {item.key} refers to bucket objects (transfer: register) but "
                "backend.storage_slug is not set: set it to the name of the external "
                f"storage connected to V7 team {team}, or use transfer: copy"
            )
        return Shape(True, [_remote_slot(s) for s in item.slots], layout)
    return Shape(False, [await _upload_slot(item, s) for s in item.slots], layout)


def _remote_slot(slot: SlotPayload) -> Slot:
    out = Slot(slot.name, None)
    for f in slot.files:
        kind = v7_type(slot.type, f.name)
        if kind is None:
            raise PermanentError(
                f"V7 cannot register {f.name} from external storage: only images, videos, "
                "PDFs and DICOM can be registered"
            )
        out.type = out.type or kind
        entry: dict[str, Any] = {
            "slot_name": slot.name,
            "file_name": f.name,
            "type": kind,
            "storage_key": storage_key(str(f.url)),
        }
        if kind == "video" and slot.extra.get("fps"):
            entry["fps"] = slot.extra["fps"]
        out.entries.append(entry)
        out.files.append((f.name, None))
    return out


async def _upload_slot(item: ItemPayload, slot: SlotPayload) -> Slot:
    files = slot.files
    if slot.type == "frames" and files:
        sources = [await _avi(slot)]
    elif slot.type == "dicom" and len(files) > 1:
        sources = [_zip(item, slot)]
    else:
        sources = [_plain(f) for f in files]
    out = Slot(slot.name, None, sources=sources)
    for src in sources:
        kind = v7_type(slot.type, src.file_name)
        out.type = out.type or kind
        entry: dict[str, Any] = {"slot_name": slot.name, "file_name": src.file_name}
        if kind is not None:
            entry["type"] = kind
        if kind == "video" and slot.extra.get("fps"):
            entry["fps"] = slot.extra["fps"]
        out.entries.append(entry)
        out.files.append((src.file_name, src.size))
    return out


def _plain(f: FilePayload) -> Source:
    check = VerifiedFile(f)
    return Source(f.name, f.size, check.body, [check], file=f)


def _zip(item: ItemPayload, slot: SlotPayload) -> Source:
    """A series as darwin-py sends it: one `.dcm` upload holding a stored ZIP of the
    slices, one upload (3 API requests) instead of one per slice."""
    checks = [VerifiedFile(f) for f in slot.files]
    try:
        stream = stored_zip([Part(c.file.name, c.file.size, c.body) for c in checks])
    except TooBig as e:
        raise PermanentError(
            f"series {slot.name} of item {item.key} is too big for one upload ({e}); V7 "
            "takes a series as one ZIP: split the series"
        ) from e
    name = slot.name if slot.name.lower().endswith(".dcm") else f"{slot.name}.dcm"
    return Source(name, stream.size, stream.open, checks)


async def _avi(slot: SlotPayload) -> Source:
    """Frames sampled here as one video: the JPEG or PNG files unchanged in an AVI at
    the sampling rate, so V7 plays exactly our frames."""
    first = slot.files[0]
    try:
        width, height = await asyncio.to_thread(frame_size, first.local_path)
    except FileNotFoundError as e:
        raise SourceChangedError(f"{first.local_path} vanished before it was sent") from e
    except OSError as e:
        raise PermanentError(f"cannot read frame {first.local_path}: {e}") from e
    checks = [VerifiedFile(f) for f in slot.files]
    fps = float(slot.extra.get("fps") or 1.0)
    try:
        stream = frames_avi(
            [Part(c.file.name, c.file.size, c.body) for c in checks],
            width=width,
            height=height,
            fps=fps,
            codec=frame_codec(first.name),
        )
    except TooBig as e:
        raise PermanentError(
            f"the frames of {slot.name} are too big for one video ({e}); lower video.fps "
            "or video.quality"
        ) from e
    source = str(slot.extra.get("source") or slot.name)
    stem = source.rsplit(".", 1)[0] if "." in source else source
    return Source(f"{stem or slot.name}.avi", stream.size, stream.open, checks)


def preload(sources: list[Source], most: int, budget: int) -> list[SyncError | None]:
    """Read the small local files among `sources` whole, with the verified stream's
    checks, in one blocking call (run it on a thread: one trip for a group instead of
    four per file through aiofiles): files of at most `most` bytes, `budget` bytes in
    all. Each source's error, or None (also for the sources left to stream)."""
    out: list[SyncError | None] = []
    for src in sources:
        f = src.file
        if f is None or not f.local_path or f.opener is not None or f.size > min(most, budget):
            out.append(None)
            continue
        if src.data is not None:  # read in an earlier round
            out.append(None)
            continue
        try:
            src.data = read_local(f)
        except SyncError as e:
            src.checks[0].error = e  # a retry must not send these bytes either
            out.append(e)
            continue
        budget -= f.size
        out.append(None)
    return out
