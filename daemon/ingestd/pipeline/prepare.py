"""Claim → payload: the key that tells whether an item changed, and the item as sent.

Files with local paths (core.source.Features.local_paths) are hashed and sent as they
are or through the media rules (hashing.py). Other sources' files (bucket objects) are
keyed by ETag and size, then streamed to the sink, downloaded to a spool for the media
rules, or registered by URL (`transfer: register`). Every read goes through the side's
source.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ingestd.core.errors import (
    SPACE,
    Abandoned,
    PermanentError,
    RetriableError,
    SourceChangedError,
    SyncError,
)
from ingestd.core.fingerprint import fingerprint
from ingestd.core.model import (
    Entry,
    FilePayload,
    ItemPayload,
    ItemPlan,
    PlannedFile,
    PlannedSlot,
    SlotPayload,
)
from ingestd.core.source import Source, SourceChanged, SourceError
from ingestd.ledger import Claim
from ingestd.media.detect import type_of_prefix
from ingestd.media.transform import MediaSettings, transform_slot, transforms
from ingestd.pipeline.hashing import (
    build_many,
    build_payload,
    hash_checked,
    hash_many,
    hash_sources,
    plan_shape,
)
from ingestd.pipeline.side import Transfer, WatchSide


class Preparer:
    """Turns a claimed item into what the sink is sent. `transfer` says how the items
    of a source without local paths move; it is asked each time, as it follows the
    current sink."""

    def __init__(
        self,
        stop: threading.Event,
        spool_root: str,
        transfer: Callable[[WatchSide], Transfer],
    ) -> None:
        self.stop = stop  # set: reading threads give up at their next chunk
        self.spool_root = spool_root
        self.transfer = transfer
        # CPU-heavy media work (frames, resizing, de-identification) gets its own small
        # pool so that it cannot starve hashing and store I/O.
        self._media_pool = ThreadPoolExecutor(
            max(1, os.cpu_count() or 1), thread_name_prefix="media"
        )

    def shutdown(self) -> None:
        self._media_pool.shutdown(wait=False, cancel_futures=True)

    def spool_for(self, claim: Claim) -> str:
        tag = hashlib.sha256(f"{claim.watch}\0{claim.source_id}".encode()).hexdigest()[:24]
        return os.path.join(self.spool_root or tempfile.gettempdir(), "spool", tag)

    async def source_key(self, side: WatchSide, plan: ItemPlan) -> tuple[str, list[str]]:
        """A key for everything the sent item depends on (equal keys: nothing to send),
        and the files' digests where finding the key needed them. Bucket objects are
        keyed by ETag and size, so an unchanged object is never downloaded."""
        if side.source.features.local_paths:
            return await asyncio.to_thread(hash_sources, side, plan, self.stop)
        return bucket_source_key(side, plan, self.transfer(side)), []

    async def source_keys(
        self, jobs: Sequence[tuple[WatchSide, ItemPlan]]
    ) -> list[tuple[str, list[str]] | Exception]:
        """source_key for a group of local items: one thread hop per PART_ITEMS items,
        so a big group is hashed on every core while a small one costs one hop."""
        parts = _parts(jobs)
        done = await asyncio.gather(*(asyncio.to_thread(hash_many, p, self.stop) for p in parts))
        return [r for part in done for r in part]

    def as_is(self, side: WatchSide, plan: ItemPlan, digests: list[str]) -> ItemPayload:
        """Local files sent as they are (nothing to read: no thread hop)."""
        return build_payload(side, plan, digests, "")

    def spool_full(self, e: BaseException) -> RetriableError | None:
        """The spool's disk is full (the cause anywhere in `e`'s chain: media code wraps
        it): the sync pool's out-of-space hold, not the item's failure."""
        seen: set[int] = set()
        cause: BaseException | None = e
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
                where = os.path.join(self.spool_root or tempfile.gettempdir(), "spool")
                return RetriableError(
                    f"the spool at {where} is out of disk space (downloads and derived "
                    "media are made there)",
                    condition=SPACE,
                )
            cause = cause.__cause__ or cause.__context__
        return None

    async def payload(
        self, side: WatchSide, plan: ItemPlan, digests: list[str], spool: str, spooled: bool
    ) -> ItemPayload:
        """The item as sent. `spooled`: some slot is derived by the media rules (in the
        media pool, into `spool`); otherwise local files go as they are, no thread hop."""
        try:
            return await self._payload(side, plan, digests, spool, spooled)
        except Exception as e:
            if (full := self.spool_full(e)) is not None:
                raise full from e
            raise

    async def _payload(
        self, side: WatchSide, plan: ItemPlan, digests: list[str], spool: str, spooled: bool
    ) -> ItemPayload:
        if not side.source.features.local_paths:
            if self.transfer(side) == "register":
                return await register_payload(side, plan)
            return await self._copy_payload(side, plan, spool)
        if spooled:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._media_pool, build_payload, side, plan, digests, spool, self.stop
            )
        return build_payload(side, plan, digests, spool)

    async def checked_many(
        self, jobs: Sequence[tuple[WatchSide, ItemPlan, list[str], str]]
    ) -> list[ItemPayload | Exception]:
        """payload for a group of local items the media rules check (images): one trip
        to the media pool per PART_ITEMS items, (side, plan, digests, spool) each."""
        loop = asyncio.get_running_loop()
        done = await asyncio.gather(
            *(
                loop.run_in_executor(self._media_pool, build_many, p, self.stop)
                for p in _parts(jobs)
            )
        )
        return [
            full if isinstance(r, Exception) and (full := self.spool_full(r)) else r
            for part in done
            for r in part
        ]

    async def _copy_payload(self, side: WatchSide, plan: ItemPlan, spool: str) -> ItemPayload:
        """Bucket objects with their bytes: streamed to the sink when sent as they are
        (hashed by one etag-pinned GET, sent by another), downloaded to `spool` when the
        media rules must read or derive them."""
        source = side.source
        media = side.media
        slots = []
        for i, slot in enumerate(plan.slots):
            if media is None or not transforms(slot.type, media):
                files = [await _streamed_file(source, f, self.stop) for f in slot.files]
                slots.append(
                    SlotPayload(slot.name, slot.type, tuple(files), _plain_extra(slot, media))
                )
                continue
            local: list[tuple[str, str]] = []
            for j, f in enumerate(slot.files):
                dest = os.path.join(spool, "src", f"{i:04d}-{j:06d}", f.name)
                await _download(source, f, dest)
                local.append((f.name, dest))
            loop = asyncio.get_running_loop()
            slots.append(
                await loop.run_in_executor(
                    self._media_pool,
                    _prepare_slot,
                    slot,
                    local,
                    media,
                    os.path.join(spool, "out", f"{i:04d}"),
                    self.stop,
                )
            )
        return ItemPayload(plan.path, plan.name, tuple(slots), plan.metadata)


T = TypeVar("T")

# A group's hashing and image checks go to the threads in parts of this many items: a
# part is one thread hop (cheap for small groups), and the parts of a platform's
# group of hundreds run on every core at once instead of one.
PART_ITEMS = 64


def _parts(jobs: Sequence[T]) -> list[Sequence[T]]:
    return [jobs[i : i + PART_ITEMS] for i in range(0, len(jobs), PART_ITEMS)]


# -- files without local paths (bucket objects) --------------------------------------------


def bucket_source_key(side: WatchSide, plan: ItemPlan, transfer: Transfer) -> str:
    """The bucket counterpart of hash_sources' key: an object's ETag and size stand for
    its bytes (no download), and the transfer mode is part of what was sent."""
    files = [[f.relpath, f.size, f.etag or f.mtime_ns] for s in plan.slots for f in s.files]
    media = (
        side.media.identity([(s.type, None) for s in plan.slots])
        if side.media is not None
        else None
    )
    return fingerprint([plan_shape(plan), files, media, transfer])


def _sync_error(e: SourceError) -> SyncError:
    if e.kind == "not_found":
        return SourceChangedError(e.message)
    if e.kind == "denied":
        return PermanentError(
            f"{e.message}. The item is tried again when the object changes or on `ingestd retry`"
        )
    return RetriableError(e.message)


@contextlib.asynccontextmanager
async def _reading_object(url: str) -> AsyncIterator[None]:
    """Store failures while reading an object, as the sync step's errors: a changed or
    vanished object waits for the next listing to plan it again."""
    try:
        yield
    except SourceChanged as e:
        raise SourceChangedError(f"{url} changed since it was listed ({e})") from None
    except SourceError as e:
        raise _sync_error(e) from None


def _entry(f: PlannedFile) -> Entry:
    """The version of a file the plan was made from (what reads are pinned to)."""
    return Entry(f.relpath, f.size, f.mtime_ns, f.etag)


def _where(source: Source, relpath: str) -> str:
    """The file's name in messages: its URL where the source has them."""
    if not source.features.urls:
        return f"{source.where.rstrip('/')}/{relpath}"
    try:
        return source.url_of(relpath)
    except SourceError as e:  # the client could not be made (e.g. no credentials)
        raise _sync_error(e) from None


class _ObjectOpener:
    """FilePayload.opener for a bucket object: a fresh etag-pinned stream per attempt.
    `where` names the object for a sink's messages."""

    def __init__(self, source: Source, f: PlannedFile) -> None:
        self.source = source
        self.entry = _entry(f)
        self.where = _where(source, f.relpath)

    def __call__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        async with (
            _reading_object(self.where),
            contextlib.aclosing(self.source.open(self.entry)) as chunks,
        ):
            async for chunk in chunks:
                yield chunk


async def _streamed_file(
    source: Source, f: PlannedFile, stop: threading.Event | None
) -> FilePayload:
    """Hash the object (one etag-pinned GET, nothing on disk) and hand the sink an
    opener that streams the same version again."""
    opener = _ObjectOpener(source, f)
    h = hashlib.sha256()
    n = 0
    async with contextlib.aclosing(opener()) as chunks:
        async for chunk in chunks:
            if len(chunk) >= 1 << 18:
                await asyncio.to_thread(h.update, chunk)  # sha256 lets go of the GIL
            else:
                h.update(chunk)
            n += len(chunk)
            if stop is not None and stop.is_set():
                raise Abandoned(opener.where)
    if n != f.size:
        raise SourceChangedError(f"{opener.where} has {n} bytes, not the {f.size} listed")
    return FilePayload(f.name, "", f.size, f"sha256:{h.hexdigest()}", etag=f.etag, opener=opener)


async def _download(source: Source, f: PlannedFile, dest: str) -> None:
    url = _where(source, f.relpath)
    async with _reading_object(url):
        await source.download(_entry(f), dest)
    size = await asyncio.to_thread(os.path.getsize, dest)
    if size != f.size:
        raise SourceChangedError(f"{url} has {size} bytes, not the {f.size} listed")


def _prepare_slot(
    slot: PlannedSlot,
    files: list[tuple[str, str]],
    media: MediaSettings,
    spool: str,
    stop: threading.Event | None,
) -> SlotPayload:
    """A slot of downloaded objects through the media rules (blocking: media pool)."""
    prepared = transform_slot(slot.type, files, media, spool, stop)
    out = []
    for name, path in prepared.files:
        st = os.stat(path)
        digest = hash_checked(path, st.st_size, st.st_mtime_ns, True, stop)
        out.append(FilePayload(name, path, st.st_size, digest))
    return SlotPayload(slot.name, prepared.type, tuple(out), {**slot.extra, **prepared.extra})


def _plain_extra(slot: PlannedSlot, media: MediaSettings | None) -> dict[str, object]:
    """A slot's extra keys when it goes untransformed (what transform_slot adds then)."""
    if media is not None and slot.type == "video" and media.video.mode == "native":
        return {**slot.extra, "fps": media.video.fps}
    return slot.extra


async def register_payload(side: WatchSide, plan: ItemPlan) -> ItemPayload:
    """The item as references to its objects (`transfer: register`): no bytes move.
    Images go as they are (not decoded, not downscaled). What needs the bytes to be
    made (sampled frames, de-identified DICOM) fails with a reason naming the fix."""
    source = side.source
    if not source.features.urls:
        raise PermanentError(f"{source.where} has no URLs to register; set transfer: copy")
    media = side.media
    slots = []
    for slot in plan.slots:
        if media is not None:
            await _check_registrable(source, slot, media)
        files = []
        for f in slot.files:
            url = _where(source, f.relpath)
            async with _reading_object(url):
                info = await source.stat(f.relpath)
            if info is None:
                raise SourceChangedError(f"{url} vanished since it was listed")
            if f.etag and info.etag != f.etag:
                raise SourceChangedError(f"{url} changed since it was listed")
            https = source.https_url_of(f.relpath)
            files.append(FilePayload(f.name, "", f.size, "", url=url, etag=f.etag, https_url=https))
        slots.append(SlotPayload(slot.name, slot.type, tuple(files), _plain_extra(slot, media)))
    return ItemPayload(plan.path, plan.name, tuple(slots), plan.metadata)


async def _check_registrable(source: Source, slot: PlannedSlot, media: MediaSettings) -> None:
    names = ", ".join(f.relpath for f in slot.files[:3]) + (", …" if len(slot.files) > 3 else "")
    if slot.type == "video" and media.video.mode == "frames":
        raise PermanentError(
            f"{names}: video.mode frames samples frames from the video's bytes, which "
            "transfer: register never reads; set transfer: copy or video.mode: native"
        )
    deidentified = media.dicom.deidentify and slot.type in ("dicom", "file")
    if deidentified and (slot.type == "dicom" or await _any_dicom(source, slot)):
        raise PermanentError(
            f"{names}: dicom.deidentify must strip the file before it leaves, and "
            "transfer: register would hand out the original; set transfer: copy"
        )


async def _any_dicom(source: Source, slot: PlannedSlot) -> bool:
    """Whether a slot of generic files holds DICOM by content (the safety net that
    transform_slot applies to local files, done here with the first bytes only)."""
    for f in slot.files:
        async with _reading_object(_where(source, f.relpath)):
            head = await source.read_range(f.relpath, 0, 132)
        if type_of_prefix(head) == "dicom":
            return True
    return False
