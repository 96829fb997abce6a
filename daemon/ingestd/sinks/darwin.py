"""The `darwin` sink: items go to a V7 Darwin dataset (see docs/platforms.md).

How our item model maps onto V7 (docs/platforms.md has the user-facing table):

- Identity is dataset + `path` + `name`, as V7's own. V7 has no upsert: registering a
  name that exists is refused per slot as `ALREADY_EXISTS`, and a registration with
  *new* slot names is silently merged into the existing item (darwin-py #937). So every
  put looks the item up first (`GET /v2/teams/{team}/items`) and then:
  - nothing there: register it;
  - a complete item with the same slots, file names and sizes: adopt it, nothing is
    sent (a restart after V7 confirmed the upload but before the ledger recorded it, a
    lost ledger, a metadata-only change; V7 holds no metadata of ours);
  - an item whose upload never finished (`uploading`, or `error`): delete it, it is a
    half-made item nobody can use, and register again;
  - anything else is a content change: archive it (`replace: archive`, the default,
    which keeps its annotations restorable) or delete it, then register again.
  When the caller passes `previous` (the manifest the ledger recorded for the item),
  a change of file digests forces the replacement even when names and sizes match.
- Local bytes: `register_upload` (one request per item), then per V7 file `sign`, a
  streamed `PUT` to the pre-signed URL (no API key, Content-Length set, the bytes read
  afresh on every attempt and checked against their digest) and `confirm`.
- Multi-slot items (`group.mode: slots`) get a version-3 `slots_grid` laid out as
  darwin-py lays it out for up to 16 views; channels put every slot in one cell.
- A DICOM series (one slot, many files) is sent as darwin-py sends it: one `.dcm`
  holding a ZIP (stored, not compressed) of the slices, streamed on the fly with a
  length known up front. One upload instead of one per slice matters under V7's
  1,000 requests a minute (a 300-slice series would cost 600 sign/confirm calls).
- Frames sampled here (`video.mode: frames`) become one video slot: the frames as
  they are (JPEG or PNG, not re-encoded) in an AVI container at the sampling rate,
  sent with `fps`, so V7 shows a playable video whose frames are exactly ours.
- `transfer: register` items (remote URLs) go through `register_existing` with the
  configured `storage_slug` and the object key as `storage_key`. A series there is
  one slot listing every slice under the same slot name.
- Metadata: V7 has no item-level metadata that an API can set (item properties need
  team-defined schemas and go through annotation import), so metadata is not sent and
  `capabilities.metadata_update` is False.

Requests go through ingestd.sinks.platform: a per-key budget (1,000 a minute unless
`requests_per_minute` says otherwise), retries on 429/5xx honouring Retry-After, a
fresh body per attempt. Uploads to the pre-signed storage URLs do not count against
the API budget. The API key is sent in a header and never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import structlog

from ingestd.config import DarwinBackend
from ingestd.core.errors import PermanentError, RetriableError, SourceChangedError, SyncError
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload, item_key
from ingestd.sinks.base import Capabilities, PutResult, SinkBase, read_chunks, read_error
from ingestd.sinks.platform import Answer, PlatformClient

log = structlog.get_logger("ingestd.sink.darwin")

DEFAULT_BASE_URL = "https://darwin.v7labs.com/api"
DEFAULT_REQUESTS_PER_MINUTE = 1000  # V7's documented limit per API key
PAGE_SIZE = 500
MAX_VIEWS = 16  # darwin-py lays out at most 16 slots; further slots get no view
MAX_CHANNELS = 16  # darwin-py refuses more than 16 channels in one cell
FILES_PER_ITEM = 4  # uploads of one item under way at once
STORAGE_BUDGET = 10**9  # pre-signed storage URLs are not V7's API: no budget to keep

# Blocked-item reasons (darwin.utils): these clear up on a later attempt.
RETRIABLE_BLOCKS = frozenset({"FILE_UPLOAD_TIMEOUT", "FILE_UPLOAD_FAILED", "UNEXPECTED_ERROR"})
# Item statuses of an upload that never completed: nobody can use such an item.
INCOMPLETE = frozenset({"uploading", "error"})
# What `register_existing` accepts as a slot `type`, by file extension.
_TYPES_BY_EXT = {
    **dict.fromkeys(("jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp"), "image"),
    **dict.fromkeys(("mp4", "avi", "mov", "wmv", "mkv", "webm", "m4v"), "video"),
    **dict.fromkeys(("dcm", "dicom", "nii"), "dicom"),
    "pdf": "pdf",
}


def slugify(name: str) -> str:
    """A dataset's slug as V7 makes it from the name: lower-case, spaces to hyphens
    (what V7's troubleshooting guide documents; we match either slug or name)."""
    return name.strip().lower().replace(" ", "-")


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


def _norm_path(path: str) -> str:
    return "/" + path.strip("/") if path.strip("/") else "/"


def _v7_type(slot_type: str, name: str) -> str | None:
    """The slot type V7 knows for a file (None: let V7 decide from the name)."""
    if slot_type in ("image", "video", "dicom"):
        return slot_type
    if slot_type == "frames":
        return "video"
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return _TYPES_BY_EXT.get(ext)


def slots_layout(names: Sequence[str], hint: Any = None) -> dict[str, Any] | None:
    """V7's version-3 layout for a multi-slot item.

    `hint` is the planner's layout (ingestd.plan.groups: rows of cells of slot names).
    One cell holding every slot means channels: layers of one view, which V7 shows as
    one cell listing them all. Otherwise each slot is a view, laid out as darwin-py
    does: columns of cells, read row by row, one column per view up to 3 views and
    ceil(sqrt(n)) columns beyond; only the first 16 slots get a view."""
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


# --- bodies: what one V7 file's bytes are ------------------------------------------------


class _Check:
    """What went wrong while a body streamed. aiohttp wraps a failure raised inside a
    request body into a generic connection error, so the real cause is kept here; the
    body factory raises it before a retry would send the same bad bytes again."""

    def __init__(self) -> None:
        self.error: SyncError | None = None

    def fail(self, error: SyncError) -> SyncError:
        if self.error is None:
            self.error = error
        return self.error


async def _checked(f: FilePayload, check: _Check) -> AsyncIterator[bytes]:
    """Exactly `f.size` bytes of `f`, hashed on the way: a file that shrank, grew or
    changed after the prepare step hashed it raises SourceChangedError.

    The last block is held back until the size and digest are checked: aiohttp stops
    pulling a body once Content-Length bytes are out, so a check after the last byte
    might never run, and a body cut short is never stored by the storage service."""
    where = f.local_path or f.name
    h = hashlib.sha256()
    seen = 0
    held: bytes | None = None
    try:
        async for block in read_chunks(f):
            seen += len(block)
            if seen > f.size:
                raise check.fail(
                    SourceChangedError(f"{where} grew after it was hashed ({f.size} bytes)")
                )
            h.update(block)
            if held:
                yield held
            held = block
    except OSError as e:
        raise check.fail(read_error(where, e)) from e
    if seen != f.size:
        raise check.fail(
            SourceChangedError(f"{where} shrank after it was hashed ({seen} of {f.size} bytes)")
        )
    digest = "sha256:" + h.hexdigest()
    if f.digest and digest != f.digest:
        raise check.fail(SourceChangedError(f"{where} changed after it was hashed (now {digest})"))
    if held:
        yield held


@dataclass
class _Source:
    """The bytes of one V7 file: a file as it is, a ZIP of a series, or an AVI of
    sampled frames. `chunks` starts over on every call (one call per attempt)."""

    file_name: str
    size: int
    chunks: Callable[[_Check], AsyncIterator[bytes]]
    identity: list[tuple[str, int]]  # (file name, size) of what V7 will list


def _plain(f: FilePayload) -> _Source:
    return _Source(f.name, f.size, lambda check: _checked(f, check), [(f.name, f.size)])


# ZIP (PKWARE APPNOTE 4.3): stored entries with a data descriptor after each, so the
# CRC is computed while streaming and the whole length is known before the first byte.
_ZIP_FLAGS = 0x0008 | 0x0800  # data descriptor follows; names are UTF-8
_ZIP_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01: the same bytes for the same slices
_ZIP_LIMIT = 0xFFFFFFFF


def _zip_source(name: str, files: Sequence[FilePayload]) -> _Source:
    names = [f.name.encode("utf-8") for f in files]
    data_size = sum(30 + len(n) + f.size + 16 for n, f in zip(names, files, strict=True))
    directory_size = sum(46 + len(n) for n in names)
    size = data_size + directory_size + 22
    if size > _ZIP_LIMIT or len(files) > 0xFFFF:
        raise PermanentError(
            f"series {name} is {size} bytes in {len(files)} files; V7 takes a series as one "
            "ZIP and ingestd writes ZIPs up to 4 GiB and 65,535 slices: split the series"
        )

    async def chunks(check: _Check) -> AsyncIterator[bytes]:
        offsets: list[int] = []
        crcs: list[int] = []
        at = 0
        for n, f in zip(names, files, strict=True):
            offsets.append(at)
            header = struct.pack(
                "<IHHHHHIIIHH", 0x04034B50, 20, _ZIP_FLAGS, 0, 0, _ZIP_DATE, 0, 0, 0, len(n), 0
            )
            yield header + n
            crc = 0
            async for block in _checked(f, check):
                crc = zlib.crc32(block, crc)
                yield block
            crcs.append(crc)
            yield struct.pack("<IIII", 0x08074B50, crc, f.size, f.size)
            at += 30 + len(n) + f.size + 16
        directory = bytearray()
        for n, f, crc, offset in zip(names, files, crcs, offsets, strict=True):
            directory += struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                20,
                20,
                _ZIP_FLAGS,
                0,
                0,
                _ZIP_DATE,
                crc,
                f.size,
                f.size,
                len(n),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            directory += n
        directory += struct.pack(
            "<IHHHHIIH", 0x06054B50, 0, 0, len(files), len(files), len(directory), at, 0
        )
        yield bytes(directory)

    file_name = name if name.lower().endswith(".dcm") else f"{name}.dcm"
    return _Source(file_name, size, chunks, [(file_name, size)])


def _frame_size(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return int(im.width), int(im.height)


# long: the AVI muxer, written straight through; issue 13 moves containers to media/
async def _avi_source(slot: SlotPayload) -> _Source:
    """The slot's frames, in order, as an AVI (RIFF) at the slot's fps: each frame one
    `00dc` chunk holding the JPEG or PNG file unchanged, then an `idx1` index."""
    files = slot.files
    first = files[0]
    png = first.name.lower().endswith(".png")
    codec = b"MPNG" if png else b"MJPG"
    try:
        width, height = await asyncio.to_thread(_frame_size, first.local_path)
    except FileNotFoundError as e:
        raise SourceChangedError(f"{first.local_path} vanished before it was sent") from e
    except OSError as e:
        raise PermanentError(f"cannot read frame {first.local_path}: {e}") from e
    fps = float(slot.extra.get("fps") or 1.0)
    n = len(files)
    movi = 4 + sum(8 + f.size + (f.size & 1) for f in files)
    riff = 4 + 8 + 192 + 8 + movi + 8 + 16 * n  # 'AVI ', hdrl, movi, idx1
    if riff + 8 > _ZIP_LIMIT:
        raise PermanentError(
            f"the frames of {slot.name} add up to {riff} bytes, over the 4 GiB an AVI holds; "
            "lower video.fps or video.quality"
        )
    biggest = max(f.size for f in files)
    rate, scale = round(fps * 1000), 1000

    def header() -> bytes:
        avih = struct.pack(
            "<IIIIIIIIII4I",
            round(1_000_000 / fps),  # microseconds per frame
            0,
            0,
            0x10,  # AVIF_HASINDEX
            n,
            0,
            1,
            biggest,
            width,
            height,
            0,
            0,
            0,
            0,
        )
        strh = struct.pack(
            "<4s4sIHHIIIIIIIIhhhh",
            b"vids",
            codec,
            0,
            0,
            0,
            0,
            scale,
            rate,
            0,
            n,
            biggest,
            0xFFFFFFFF,
            0,
            0,
            0,
            width,
            height,
        )
        strf = struct.pack(
            "<IiiHH4sIiiII", 40, width, height, 1, 24, codec, width * height * 3, 0, 0, 0, 0
        )
        strl = b"strl" + b"strh" + struct.pack("<I", 56) + strh
        strl += b"strf" + struct.pack("<I", 40) + strf
        hdrl = b"hdrl" + b"avih" + struct.pack("<I", 56) + avih
        hdrl += b"LIST" + struct.pack("<I", len(strl)) + strl
        assert len(hdrl) == 192
        return (
            b"RIFF"
            + struct.pack("<I", riff)
            + b"AVI "
            + b"LIST"
            + struct.pack("<I", len(hdrl))
            + hdrl
            + b"LIST"
            + struct.pack("<I", movi)
            + b"movi"
        )

    async def chunks(check: _Check) -> AsyncIterator[bytes]:
        yield header()
        index = bytearray()
        at = 4  # chunk offsets count from the `movi` FOURCC
        for f in files:
            yield b"00dc" + struct.pack("<I", f.size)
            async for block in _checked(f, check):
                yield block
            if f.size & 1:
                yield b"\0"
            index += b"00dc" + struct.pack("<III", 0x10, at, f.size)  # AVIIF_KEYFRAME
            at += 8 + f.size + (f.size & 1)
        yield b"idx1" + struct.pack("<I", len(index)) + bytes(index)

    source = str(slot.extra.get("source") or slot.name)
    stem = source.rsplit(".", 1)[0] if "." in source else source
    file_name = f"{stem or slot.name}.avi"
    return _Source(file_name, riff + 8, chunks, [(file_name, riff + 8)])


# --- what an item becomes on V7 ----------------------------------------------------------


@dataclass
class _Slot:
    """One V7 slot: its registration entries and, for uploads, their sources."""

    name: str
    type: str | None
    entries: list[dict[str, Any]] = field(default_factory=list)
    sources: list[_Source] = field(default_factory=list)
    expect: list[tuple[str, int | None]] = field(default_factory=list)  # (file, size)


@dataclass
class _Shape:
    """The item as V7 will hold it: what to register and what to compare a found item
    against."""

    remote: bool  # register_existing (bucket objects) rather than uploads
    slots: list[_Slot]
    layout: dict[str, Any] | None

    def payload(self, item: ItemPayload) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": item.name,
            "path": _norm_path(item.path),
            "slots": [e for s in self.slots for e in s.entries],
        }
        if self.layout is not None:
            d["layout"] = self.layout
        return d

    def matches(self, found: Mapping[str, Any]) -> bool:
        """Whether a found V7 item holds what this shape would create: the same slot
        names, and per slot the same file names and (where V7 tells) sizes and type."""
        theirs: dict[str, Mapping[str, Any]] = {}
        for s in found.get("slots") or []:
            if isinstance(s, Mapping) and "slot_name" in s:
                theirs[str(s["slot_name"])] = s
        if set(theirs) != {s.name for s in self.slots}:
            return False
        for s in self.slots:
            t = theirs[s.name]
            if s.type is not None and t.get("type") not in (None, s.type):
                return False
            listed = t.get("source_files")
            if isinstance(listed, list) and listed:
                files = [(str(x.get("file_name")), x.get("size_bytes")) for x in listed]
            else:
                files = [(str(t.get("file_name")), None)]
            if sorted(n for n, _ in files) != sorted(n for n, _ in s.expect):
                return False
            ours = [size for _, size in s.expect]
            total = t.get("size_bytes")
            if None not in ours and isinstance(total, int) and total != sum(ours):  # type: ignore[arg-type]
                return False
            sizes = {n: z for n, z in files if isinstance(z, int)}
            for n, z in s.expect:
                if z is not None and n in sizes and sizes[n] != z:
                    return False
        return True


def _identity(slots: Iterable[Any]) -> list[Any]:
    """What an item's content is, from payload slots or a ledger manifest's slots:
    per slot its name, type and files (name plus digest, or URL and ETag)."""
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


@dataclass(frozen=True, slots=True)
class _Dataset:
    id: int
    slug: str
    name: str


@dataclass
class _Found:
    live: list[dict[str, Any]]  # not archived, exact path and name
    archived: int


# long: V7's API mapping, retries and dataset lookup in one class; issue 13 puts it on the shared sink skeleton
class DarwinSink(SinkBase):
    capabilities = Capabilities(remote_urls=True, metadata_update=False, delete=True)
    files_per_item = FILES_PER_ITEM
    page_size = PAGE_SIZE

    def __init__(self, backend: DarwinBackend, workers: int = 8) -> None:
        self.team = backend.team
        self.base = (backend.base_url or DEFAULT_BASE_URL).rstrip("/")
        self.storage_slug = backend.storage_slug
        self.replace = backend.replace
        if backend.api_key_file is not None:
            hint = f"backend.api_key_file ({backend.api_key_file})"
        else:
            hint = f"backend.api_key_env ({backend.api_key_env})"
        connections = max(4, 2 * workers)
        self.api = PlatformClient(
            "V7",
            {"Authorization": f"ApiKey {backend.api_key()}", "Accept": "application/json"},
            per_minute=backend.requests_per_minute or DEFAULT_REQUESTS_PER_MINUTE,
            key_hint=hint,
            connections=connections,
        )
        self.storage = PlatformClient(
            "V7 storage",
            {},
            per_minute=STORAGE_BUDGET,
            key_hint="(pre-signed upload URL)",
            connections=connections,
        )
        self._datasets: dict[str, _Dataset] = {}
        self._dataset_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:  # never the key
        return f"DarwinSink(team={self.team!r}, base={self.base!r})"

    # --- the Sink interface ----------------------------------------------------------

    async def ensure_dataset(self, dataset: str) -> None:
        await self._dataset(dataset)

    async def put_item(
        self, dataset: str, item: ItemPayload, previous: Mapping[str, Any] | None = None
    ) -> PutResult:
        """Make the dataset hold `item` (see the module docstring for the rules).
        `previous` is the manifest the ledger recorded at the last sync, when known:
        with it, a change of digests replaces the item even where V7 shows the same
        names and sizes."""
        ds = await self._dataset(dataset)
        shape = await self._shape(item)
        changed_content = previous is not None and _identity(
            previous.get("slots") or []
        ) != _identity(item.slots)
        key = item.key
        for _ in range(3):
            found = await self._find(ds, item.path, item.name)
            version = found.archived + 1
            for old in found.live:
                status = str(old.get("status") or "")
                if status not in INCOMPLETE and not changed_content and shape.matches(old):
                    log.debug("already on V7: adopted", item=key, dataset=dataset, id=old["id"])
                    return PutResult(str(old["id"]), version, changed=False)
            for old in found.live:
                status = str(old.get("status") or "")
                how = "delete" if status in INCOMPLETE else self.replace
                log.info(
                    "replacing item on V7",
                    item=key,
                    dataset=dataset,
                    old_id=old["id"],
                    old_status=status,
                    how=how,
                )
                await self._remove(ds, [str(old["id"])], how, key)
                if how == "archive":
                    version += 1
            changed_content = False  # whatever was there is gone now
            created = await self._register(ds, item, shape)
            if created is None:
                continue  # someone else registered the name meanwhile: look again
            if not shape.remote:
                await self._upload_all(ds, item, shape, created)
            return PutResult(str(created["id"]), version, changed=True)
        raise RetriableError(
            f"V7 item {key} in dataset {dataset!r} kept changing while it was registered; "
            "will try again"
        )

    async def delete_item(self, dataset: str, path: str, name: str) -> None:
        """`on_delete: delete`: the item is deleted from V7 (not archived: `replace`
        governs replacements, and the watch asked for deletion). Archived
        predecessors of it are left alone."""
        ds = await self._dataset(dataset)
        found = await self._find(ds, path, name)
        ids = [str(i["id"]) for i in found.live]
        if ids:
            await self._remove(ds, ids, "delete", item_key(path, name))

    async def close(self) -> None:
        await self.api.close()
        await self.storage.close()

    # --- datasets --------------------------------------------------------------------

    async def _dataset(self, name: str) -> _Dataset:
        known = self._datasets.get(name)
        if known is not None:
            return known
        if self._dataset_lock is None:
            self._dataset_lock = asyncio.Lock()
        async with self._dataset_lock:
            known = self._datasets.get(name)
            if known is None:
                known = await self._find_or_create_dataset(name)
                self._datasets[name] = known
            return known

    async def _list_datasets(self, name: str) -> _Dataset | None:
        ans = await self.api.request("GET", f"{self.base}/datasets", what="listing datasets")
        data = ans.json()
        if not isinstance(data, list):
            raise RetriableError(f"V7 listing datasets: unexpected answer {ans.text(120)!r}")
        slug = slugify(name)
        for d in data:
            if isinstance(d, Mapping) and (d.get("slug") == slug or d.get("name") == name):
                return _Dataset(int(d["id"]), str(d.get("slug") or slug), name)
        return None

    async def _find_or_create_dataset(self, name: str) -> _Dataset:
        found = await self._list_datasets(name)
        if found is not None:
            return found
        what = f"creating dataset {name!r}"
        ans = await self.api.request(
            "POST",
            f"{self.base}/datasets",
            what=what,
            json_body={"name": name},
            ok=frozenset({422}),
        )
        if ans.status == 422:
            # "has already been taken": created meanwhile, or under a name that slugs the same
            found = await self._list_datasets(name)
            if found is not None:
                return found
            raise PermanentError(
                f"V7 {what}: refused ({ans.text()}); a dataset with this name or slug "
                f"({slugify(name)}) may exist but be archived or hidden from this API key: "
                "restore it in V7 or choose another dataset name"
            )
        d = ans.json()
        if not isinstance(d, Mapping) or "id" not in d:
            raise RetriableError(f"V7 {what}: unexpected answer {ans.text(120)!r}")
        log.info("created dataset on V7", dataset=name, slug=d.get("slug"))
        return _Dataset(int(d["id"]), str(d.get("slug") or slugify(name)), name)

    # --- items -----------------------------------------------------------------------

    def _v2(self, tail: str) -> str:
        return f"{self.base}/v2/teams/{quote(self.team, safe='')}/{tail}"

    async def _find(self, ds: _Dataset, path: str, name: str) -> _Found:
        """The dataset's items at exactly `path` + `name` (V7 filters by name and path
        separately; the exact pair is picked here)."""
        want_path = _norm_path(path)
        live: list[dict[str, Any]] = []
        archived = 0
        cursor: Any = None
        for _ in range(1000):
            params: list[tuple[str, Any]] = [
                ("dataset_ids[]", ds.id),
                ("item_names[]", name),
                ("item_paths[]", want_path),
                ("page[size]", self.page_size),
            ]
            if cursor is not None:
                params.append(("page[from]", cursor))
            ans = await self.api.request(
                "GET",
                self._v2("items"),
                what=f"looking up item {item_key(path, name)}",
                params=params,
            )
            data = ans.json()
            if not isinstance(data, Mapping) or not isinstance(data.get("items"), list):
                raise RetriableError(f"V7 item lookup: unexpected answer {ans.text(120)!r}")
            for it in data["items"]:
                if not isinstance(it, Mapping) or it.get("name") != name:
                    continue
                if _norm_path(str(it.get("path") or "/")) != want_path:
                    continue
                if it.get("archived") or it.get("status") == "archived":
                    archived += 1
                else:
                    live.append(dict(it))
            page = data.get("page")
            cursor = page.get("next") if isinstance(page, Mapping) else None
            if not cursor:
                break
        return _Found(live, archived)

    async def _remove(self, ds: _Dataset, ids: list[str], how: str, key: str) -> None:
        body = {"filters": {"item_ids": ids, "dataset_ids": [ds.id]}}
        if how == "archive":
            await self.api.request(
                "POST", self._v2("items/archive"), what=f"archiving item {key}", json_body=body
            )
        else:
            await self.api.request(
                "DELETE", self._v2("items"), what=f"deleting item {key}", json_body=body
            )

    async def _shape(self, item: ItemPayload) -> _Shape:
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
        hint = item.slots[0].extra.get("layout") if item.slots else None
        layout = slots_layout(names, hint)
        if all(remote):
            return _Shape(True, [self._remote_slot(item, s) for s in item.slots], layout)
        return _Shape(False, [await self._upload_slot(s) for s in item.slots], layout)

    def _remote_slot(self, item: ItemPayload, slot: SlotPayload) -> _Slot:
        if not self.storage_slug:
            raise PermanentError(
                f"item {item.key} refers to bucket objects (transfer: register) but "
                "backend.storage_slug is not set: set it to the name of the external storage "
                f"connected to V7 team {self.team}, or use transfer: copy"
            )
        out = _Slot(slot.name, None)
        for f in slot.files:
            kind = _v7_type(slot.type, f.name)
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
            out.expect.append((f.name, None))
        return out

    async def _upload_slot(self, slot: SlotPayload) -> _Slot:
        files = slot.files
        if slot.type == "frames" and files:
            sources = [await _avi_source(slot)]
        elif slot.type == "dicom" and len(files) > 1:
            sources = [_zip_source(slot.name, files)]
        else:
            sources = [_plain(f) for f in files]
        out = _Slot(slot.name, None, sources=sources)
        for src in sources:
            kind = _v7_type(slot.type, src.file_name)
            out.type = out.type or kind
            entry: dict[str, Any] = {"slot_name": slot.name, "file_name": src.file_name}
            if kind is not None:
                entry["type"] = kind
            if kind == "video" and slot.extra.get("fps"):
                entry["fps"] = slot.extra["fps"]
            out.entries.append(entry)
            out.expect.extend((n, z) for n, z in src.identity)
        return out

    async def _register(
        self, ds: _Dataset, item: ItemPayload, shape: _Shape
    ) -> dict[str, Any] | None:
        """Register the item; its V7 record (with upload ids for uploads), or None when
        V7 says it exists after all (the caller looks again)."""
        key = item.key
        body: dict[str, Any] = {"dataset_slug": ds.slug, "items": [shape.payload(item)]}
        if shape.remote:
            body["storage_slug"] = self.storage_slug
            route, what = "items/register_existing", f"registering item {key} from storage"
        else:
            route, what = "items/register_upload", f"registering item {key}"
        ans = await self.api.request(
            "POST", self._v2(route), what=what, json_body=body, ok=frozenset({404})
        )
        if ans.status == 404:
            # The dataset went away on V7 since it was looked up: forget it, so that the
            # next attempt creates it again.
            self._datasets.pop(ds.name, None)
            raise RetriableError(
                f"V7 {what}: dataset {ds.slug!r} was not found ({ans.text()}); "
                "it is created again on the next attempt"
            )
        data = ans.json()
        if not isinstance(data, Mapping):
            raise RetriableError(f"V7 {what}: unexpected answer {ans.text(120)!r}")
        mine = [i for i in data.get("items") or [] if _same_item(i, item)]
        blocked = [i for i in data.get("blocked_items") or [] if _same_item(i, item)]
        if blocked:
            reasons = {
                str(s.get("reason") or "").upper()
                for b in blocked
                for s in b.get("slots") or []
                if isinstance(s, Mapping)
            } or {"UNKNOWN"}
            if "ALREADY_EXISTS" in reasons:
                # Only possible in a race (the lookup found nothing), or when V7 keeps
                # the name of an archived item; the caller looks again and decides.
                found = await self._find(ds, item.path, item.name)
                if not found.live and found.archived:
                    raise PermanentError(
                        f"V7 refuses item {key}: an archived item still holds its name. "
                        "Restore or delete the archived item in V7, or set "
                        "backend.replace: delete"
                    )
                return None
            for created in mine:  # a half-registered item of ours: not worth keeping
                await self._remove(ds, [str(created["id"])], "delete", key)
            text = ", ".join(sorted(reasons))
            if reasons & {"ITEM_COUNT_LIMIT_EXCEEDED"}:
                raise PermanentError(
                    f"V7 refused item {key}: the team's item limit is reached "
                    "(ITEM_COUNT_LIMIT_EXCEEDED); archive or delete items in V7 or raise the "
                    "plan's limit, then run `ingestd retry`"
                )
            if reasons <= RETRIABLE_BLOCKS:
                raise RetriableError(f"V7 blocked item {key} ({text}); will try again")
            raise PermanentError(f"V7 blocked item {key} ({text})")
        if not mine or "id" not in mine[0]:
            raise RetriableError(f"V7 {what}: the answer does not list the item")
        log.debug("registered on V7", item=key, dataset=ds.name, id=mine[0]["id"])
        return dict(mine[0])

    async def _upload_all(
        self, ds: _Dataset, item: ItemPayload, shape: _Shape, created: Mapping[str, Any]
    ) -> None:
        pending: dict[tuple[str, str], str] = {}
        for s in created.get("slots") or []:
            if isinstance(s, Mapping) and s.get("upload_id") is not None:
                pending[(str(s.get("slot_name")), str(s.get("file_name")))] = str(s["upload_id"])
        jobs: list[tuple[_Source, str]] = []
        for slot in shape.slots:
            for src in slot.sources:
                upload_id = pending.get((slot.name, src.file_name))
                if upload_id is None:
                    raise RetriableError(
                        f"V7 registered item {item.key} without an upload for "
                        f"{slot.name}/{src.file_name}"
                    )
                jobs.append((src, upload_id))
        gate = asyncio.Semaphore(max(1, self.files_per_item))

        async def one(src: _Source, upload_id: str) -> None:
            async with gate:
                await self._upload(item.key, src, upload_id)

        tasks = [asyncio.create_task(one(src, uid)) for src, uid in jobs]
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for t in tasks:
                t.cancel()
        errors = [r for r in results if isinstance(r, BaseException)]
        for kind in (asyncio.CancelledError, SourceChangedError, PermanentError, RetriableError):
            for e in errors:
                if isinstance(e, kind):
                    raise e
        if errors:
            raise errors[0]

    async def _upload(self, key: str, src: _Source, upload_id: str) -> None:
        """sign, PUT, confirm: one V7 file. An expired or refused signature is signed
        again once; the bytes are checked while they stream and a changed source is
        never confirmed."""
        uid = quote(upload_id, safe="")
        for attempt in range(2):
            ans = await self.api.request(
                "GET", self._v2(f"items/uploads/{uid}/sign"), what=f"signing {src.file_name}"
            )
            data = ans.json()
            url = data.get("upload_url") if isinstance(data, Mapping) else None
            if not url:
                raise RetriableError(f"V7 signing {src.file_name}: no upload_url in the answer")
            put = await self._put(urljoin(self.base + "/", str(url)), src, key)
            if put.status < 300:
                break
            if put.status in (400, 403) and attempt == 0:
                continue  # e.g. the signature expired while a retry waited
            raise PermanentError(
                f"V7 storage refused {src.file_name} of item {key} (HTTP {put.status}: "
                f"{put.text() or 'no message'})"
            )
        await self.api.request(
            "POST",
            self._v2(f"items/uploads/{uid}/confirm"),
            what=f"confirming {src.file_name}",
            json_body={},
        )

    async def _put(self, url: str, src: _Source, key: str) -> Answer:
        check = _Check()

        def body() -> AsyncIterator[bytes]:
            if check.error is not None:
                raise check.error
            return src.chunks(check)

        try:
            ans = await self.storage.request(
                "PUT",
                url,
                what=f"uploading {src.file_name} of item {key}",
                body=body,
                headers={
                    "Content-Length": str(src.size),
                    "Content-Type": "application/octet-stream",
                },
                auth=False,
                ok=frozenset({400, 401, 403, 404, 411, 413, 501}),
            )
        except Exception:
            if check.error is not None:
                raise check.error from None
            raise
        if check.error is not None:
            raise check.error
        return ans


def _same_item(entry: Any, item: ItemPayload) -> bool:
    return (
        isinstance(entry, Mapping)
        and entry.get("name") == item.name
        and _norm_path(str(entry.get("path") or "/")) == _norm_path(item.path)
    )
