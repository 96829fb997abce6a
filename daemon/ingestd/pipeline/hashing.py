"""Local files of an item: check they are still what was planned, hash them, and build
the payload that sends them (as they are, or as the media rules derive them).

Everything here blocks: the sync step runs it in a thread or in its media pool. Only for
sources with local paths (core.source.Features.local_paths).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence

from ingestd.core.errors import Abandoned, PermanentError, RetriableError, SourceChangedError
from ingestd.core.fingerprint import fingerprint
from ingestd.core.model import FilePayload, ItemPayload, ItemPlan, SlotPayload
from ingestd.core.rawnames import shown
from ingestd.core.regular import open_regular
from ingestd.media.transform import transform_slot
from ingestd.pipeline.side import WatchSide

CHUNK = 1 << 20


def hash_sources(
    side: WatchSide, plan: ItemPlan, stop: threading.Event | None = None
) -> tuple[str, list[str]]:
    """Check each file still is what was planned and hash it (blocking; run in a thread).
    Returns a key for everything the sent item depends on, and the files' digests.
    A file that changed since it settled, or while it was read, raises
    SourceChangedError so the half-read version is never sent. Setting `stop` abandons
    the work between chunks, so a shutdown never waits for a large file."""
    digests = [
        hash_checked(side.source.path_of(f.relpath), f.size, f.mtime_ns, side.follow_symlinks, stop)
        for slot in plan.slots
        for f in slot.files
    ]
    media = (
        side.media.identity(
            [(s.type, [side.source.path_of(f.relpath) for f in s.files]) for s in plan.slots]
        )
        if side.media is not None
        else None
    )
    # Content, not stat: a touch changes mtime but must not count as a change.
    return fingerprint([plan_shape(plan), digests, media]), digests


def hash_many(
    jobs: Sequence[tuple[WatchSide, ItemPlan]], stop: threading.Event | None = None
) -> list[tuple[str, list[str]] | Exception]:
    """hash_sources for a group of items in one thread hop; each item's error is its own."""
    out: list[tuple[str, list[str]] | Exception] = []
    for side, plan in jobs:
        try:
            out.append(hash_sources(side, plan, stop))
        except Exception as e:
            out.append(e)
    return out


def plan_shape(plan: ItemPlan) -> list[object]:
    """Everything about an item but its files' bytes."""
    return [
        plan.path,
        plan.name,
        plan.metadata,
        [[s.name, s.type, s.extra, [f.name for f in s.files]] for s in plan.slots],
    ]


def build_payload(
    side: WatchSide,
    plan: ItemPlan,
    digests: list[str],
    spool: str,
    stop: threading.Event | None = None,
) -> ItemPayload:
    """The item as sent: source files as they are, or what the media rules derive from
    them in `spool` (blocking, CPU-heavy: run in the media pool)."""
    source_digest = {}
    i = 0
    for slot in plan.slots:
        for f in slot.files:
            source_digest[side.source.path_of(f.relpath)] = (digests[i], f.size)
            i += 1
    slots = []
    derived = False
    for slot in plan.slots:
        files = [(f.name, side.source.path_of(f.relpath)) for f in slot.files]
        if side.media is not None:
            prepared = transform_slot(slot.type, files, side.media, spool, stop)
            slot_type, files, extra = (
                prepared.type,
                prepared.files,
                {**slot.extra, **prepared.extra},
            )
        else:
            slot_type, extra = slot.type, slot.extra
        payload_files = []
        for name, path in files:
            if path in source_digest:
                digest, size = source_digest[path]
            else:
                derived = True
                st = os.stat(path)
                size = st.st_size
                digest = hash_checked(path, size, st.st_mtime_ns, True, stop)
            payload_files.append(FilePayload(name, path, size, digest))
        slots.append(SlotPayload(slot.name, slot_type, tuple(payload_files), extra))
    if derived:
        # Derived files were made from whatever the sources held while they were read.
        for slot in plan.slots:
            for f in slot.files:
                _check_unchanged(side.source.path_of(f.relpath), f.size, f.mtime_ns)
    return ItemPayload(plan.path, plan.name, tuple(slots), plan.metadata)


def build_many(
    jobs: Sequence[tuple[WatchSide, ItemPlan, list[str], str]],
    stop: threading.Event | None = None,
) -> list[ItemPayload | Exception]:
    """build_payload for a group of items (side, plan, digests, spool) in one trip to the
    media pool; each item's error is its own."""
    out: list[ItemPayload | Exception] = []
    for side, plan, digests, spool in jobs:
        try:
            out.append(build_payload(side, plan, digests, spool, stop))
        except Exception as e:
            out.append(e)
    return out


def _check_unchanged(path: str, size: int, mtime_ns: int) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SourceChangedError(f"{shown(path)} vanished while it was prepared") from None
    if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
        raise SourceChangedError(f"{shown(path)} changed while it was prepared")


def hash_checked(
    path: str, size: int, mtime_ns: int, follow_symlinks: bool, stop: threading.Event | None
) -> str:
    """The file's sha256 digest, provided it is still `size` bytes modified at
    `mtime_ns` before and after it is read (else SourceChangedError). Only a regular
    file is opened, without blocking: a FIFO, socket or device fails the item
    (core.regular.NotRegularFile) instead of holding the worker until a writer comes."""
    where = shown(path)  # messages reach the ledger: no lone surrogates
    try:
        before = os.stat(path, follow_symlinks=follow_symlinks)
        if (before.st_size, before.st_mtime_ns) != (size, mtime_ns):
            raise SourceChangedError(f"{where} changed after it settled")
        h = hashlib.sha256()
        fd = open_regular(path, follow_symlinks=follow_symlinks)
        try:
            with os.fdopen(fd, "rb", buffering=0) as fh:
                fd = -1
                while chunk := fh.read(CHUNK):
                    h.update(chunk)
                    if stop is not None and stop.is_set():
                        raise Abandoned(where)
                after = os.fstat(fh.fileno())
        finally:
            if fd >= 0:
                os.close(fd)
    except FileNotFoundError:
        raise SourceChangedError(f"{where} vanished before it could be read") from None
    except PermissionError:
        raise PermanentError(
            f"cannot read {where}: permission denied; fix its permissions (e.g. chmod a+r). "
            "It is retried when the file changes or on `ingestd retry`"
        ) from None
    except IsADirectoryError:
        raise SourceChangedError(f"{where} is now a folder") from None
    except OSError as e:
        if e.errno in (40,):  # ELOOP: a symlink where we do not follow them
            raise PermanentError(f"cannot read {where}: {e.strerror}") from None
        raise RetriableError(f"cannot read {where}: {e.strerror}") from None
    if (after.st_size, after.st_mtime_ns) != (size, mtime_ns):
        raise SourceChangedError(f"{where} changed while it was read")
    return f"sha256:{h.hexdigest()}"
