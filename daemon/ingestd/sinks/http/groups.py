"""Small items in groups: the bytes of a group's files read in one trip to a thread,
then one POST /v1/batch carrying every item's manifest and blob (wire.frame), and
each item's own result back from the answer. Files are checked while read (kit
verified.read_local, or a VerifiedFile pass for streamed objects), so a file that
changed after it was hashed fails alone and is never sent."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ingestd.core.errors import SyncError
from ingestd.core.model import FilePayload, ItemPayload
from ingestd.sinks.kit.verified import VerifiedFile, read_local_many

STREAMS = 4  # streamed objects of a group read at once


async def _read_streams(files: list[FilePayload]) -> list[bytes | SyncError]:
    limit = asyncio.Semaphore(STREAMS)

    async def one(f: FilePayload) -> bytes | SyncError:
        async with limit:
            try:
                return await VerifiedFile(f).read_all()
            except SyncError as e:
                return e

    return list(await asyncio.gather(*(one(f) for f in files)))


def item_bytes(item: ItemPayload) -> int:
    """The bytes a put of `item` moves (registered objects move none)."""
    return sum(f.size for slot in item.slots for f in slot.files if not f.is_remote)


async def read_group(
    items: Sequence[tuple[str, ItemPayload]],
) -> tuple[dict[str, bytes], dict[str, FilePayload], dict[int, SyncError]]:
    """(blob bytes by digest, the file each digest was read from, the items whose
    files could not be read and why). Each file is read once however many items name
    it; local files all in one trip to a thread."""
    owners: dict[tuple[str, str], list[int]] = {}  # (digest, where) -> items
    files: dict[tuple[str, str], FilePayload] = {}
    for i, (_, item) in enumerate(items):
        for slot in item.slots:
            for f in slot.files:
                if f.is_remote:
                    continue
                key = (f.digest, f.local_path or f"stream:{id(f.opener)}")
                files.setdefault(key, f)
                owners.setdefault(key, []).append(i)
    local = [k for k, f in files.items() if f.opener is None]
    streamed = [k for k, f in files.items() if f.opener is not None]
    got_local: list[bytes | SyncError] = []
    got_streamed: list[bytes | SyncError] = []
    if streamed:
        got_local, got_streamed = await asyncio.gather(
            asyncio.to_thread(read_local_many, [files[k] for k in local]),
            _read_streams([files[k] for k in streamed]),
        )
    elif local:
        got_local = await asyncio.to_thread(read_local_many, [files[k] for k in local])
    blobs: dict[str, bytes] = {}
    sources: dict[str, FilePayload] = {}
    failed: dict[int, SyncError] = {}
    for k, data in zip(local + streamed, got_local + got_streamed, strict=True):
        if isinstance(data, SyncError):
            for i in owners[k]:
                failed.setdefault(i, data)
        elif k[0] not in blobs:
            blobs[k[0]] = data
            sources[k[0]] = files[k]
    return blobs, sources, failed
