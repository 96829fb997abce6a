"""The `nucleus` sink: items go to a Scale Nucleus dataset (docs/platforms.md).

Nucleus holds flat datasets of images, each keyed by a `reference_id` unique in its
dataset, with a metadata dictionary. How our items map onto that:

- Datasets are found by name (`GET dataset/details`, matched here) or created
  (`POST dataset/create`, `is_scene: false`); their ids are cached.
- An item whose only content is one image becomes one Nucleus image with
  `reference_id` = the item key (`/folder/name.jpg`) and the item's metadata as is.
- Items Nucleus cannot hold as one image (multi-slot groups, channel groups, frame
  sequences sampled from a video) become one Nucleus image per file: the first file
  carries the item key as its `reference_id` (the "anchor"), every other file
  `<key>#<slot>` (a frame: `<key>#<slot>/<frame file>`). Each carries the item's
  metadata plus `ingestd_item` (the key) and `ingestd_slot`; frames also carry
  `ingestd_time` (seconds into the video). The anchor lists the other parts under
  `ingestd_parts`, which is how a later change or delete finds parts that must go.
- DICOM, native videos and other files are refused with a PermanentError that says
  what to do: Nucleus image datasets take images only.
- Local and streamed bytes go through the multipart `append`, at most 10 files a
  request: put_item is called per item by concurrent workers, so parts arriving within
  `batch_window` are sent together and each caller hears its own result. Remote files
  (`transfer: register`) go through the asynchronous import: a signed URL, the items
  as NDJSON there, `append?async=1`, then the job is polled and its errors are mapped
  back to the items they name.
- Everything is sent with `update: true`: a re-send (a change, or a redo after a
  restart mid-upload) replaces the item and its metadata, never duplicates it.
- A metadata-only change uses the metadata endpoint, which merges; when keys were
  removed it cannot drop them, so the item is appended again (update: true replaces
  the metadata entirely), which also re-sends its bytes.
- Nucleus refuses images over 5000 x 5000 px and a metadata key that is a string on
  one item and a number on another: both are checked before anything is sent.

Retries, the request budget and the key (HTTP Basic, key as user name) live in
PlatformClient; the key is never logged.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import math
import re
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import structlog
from PIL import Image, ImageFile

from ingestd.config import NucleusBackend
from ingestd.core.errors import PermanentError, RetriableError, SourceChangedError, SyncError
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload, item_key
from ingestd.sinks.base import Capabilities, Manifest, PutResult, SinkBase, read_chunks, read_error
from ingestd.sinks.platform import Answer, PlatformClient

log = structlog.get_logger("ingestd.sink.nucleus")

DEFAULT_BASE_URL = "https://api.scale.com/v1/nucleus"
# Nucleus documents no request budget; this keeps a busy daemon polite by default
# (backend.requests_per_minute overrides it).
DEFAULT_REQUESTS_PER_MINUTE = 600
NAME = "Scale Nucleus"

MAX_FILES_PER_REQUEST = 10  # the multipart append's documented limit
MAX_BATCH_BYTES = 64 << 20  # keeps one retried request from re-sending gigabytes
MAX_ASYNC_ITEMS = 500  # the server takes at most 1000 items a job
METADATA_BATCH = 500
MAX_SIDE = 5000  # Nucleus' image limit, px per side
HEADER_BYTES = 4 << 20  # read at most this much of a streamed file to find its size

# Keys this sink adds for items split into several Nucleus images.
META_ITEM = "ingestd_item"
META_SLOT = "ingestd_slot"
META_TIME = "ingestd_time"
META_PARTS = "ingestd_parts"
RESERVED_KEYS = frozenset({META_ITEM, META_SLOT, META_TIME, META_PARTS})

REMOTE_SCHEMES = ("s3://", "gs://", "https://", "http://")
RUNNING = frozenset({"Queued", "Running", "Retried", "Pending"})
SERVER_TROUBLE = frozenset({"Errored_Server", "Errored_Hanging", "Cancelled"})

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(eq=False)
class _Part:
    """One Nucleus image: one file of one item."""

    item: str  # our item key (for messages)
    reference_id: str
    metadata: dict[str, Any]
    file: FilePayload
    mime: str = "application/octet-stream"
    future: asyncio.Future[None] | None = field(default=None, repr=False)

    @property
    def what(self) -> str:
        return f"{self.file.name} (item {self.item})"

    def resolve(self, error: BaseException | None = None) -> None:
        fut = self.future
        if fut is None or fut.done():
            return
        if error is None:
            fut.set_result(None)
        elif isinstance(error, asyncio.CancelledError):
            fut.cancel()
        else:
            fut.set_exception(error)


class _Batcher:
    """Collects parts submitted by concurrent callers and sends them in batches of at
    most `max_parts` (and about `max_bytes`), waiting `window` seconds for company.
    `send` must resolve every part it is given."""

    def __init__(
        self,
        send: Callable[[list[_Part]], Awaitable[None]],
        *,
        max_parts: int,
        max_bytes: int,
        window: float,
        concurrency: int,
    ) -> None:
        self._send = send
        self.max_parts = max_parts
        self.max_bytes = max_bytes
        self.window = window
        self._pending: list[_Part] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max(1, concurrency))

    def submit(self, part: _Part) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        part.future = loop.create_future()
        self._pending.append(part)
        if self._full():
            self._flush(whole_only=True)
        if self._pending and self._timer is None:
            self._timer = loop.call_later(self.window, self._flush)
        return part.future

    def _full(self) -> bool:
        return len(self._pending) >= self.max_parts or (
            sum(p.file.size for p in self._pending) >= self.max_bytes
        )

    def _take(self) -> list[_Part]:
        batch: list[_Part] = []
        size = 0
        while self._pending and len(batch) < self.max_parts:
            nxt = self._pending[0].file.size
            if batch and size + nxt > self.max_bytes:
                break
            batch.append(self._pending.pop(0))
            size += nxt
        return batch

    def _flush(self, whole_only: bool = False) -> None:
        if self._timer is not None and not whole_only:
            self._timer.cancel()
            self._timer = None
        while self._pending and (not whole_only or self._full()):
            batch = self._take()
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not self._pending and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _run(self, batch: list[_Part]) -> None:
        try:
            async with self._slots:
                live = [p for p in batch if p.future is not None and not p.future.done()]
                if live:
                    await self._send(live)
        except BaseException as e:
            for p in batch:
                p.resolve(e)
            if not isinstance(e, Exception):
                raise
        finally:
            for p in batch:  # a bug in send must not leave a caller waiting forever
                p.resolve(RetriableError(f"{NAME}: {p.what} was not sent (internal error)"))

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for p in self._pending:
            p.resolve(asyncio.CancelledError())
        self._pending.clear()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def _scalar_type(v: Any) -> str | None:
    """Nucleus' metadata type rule covers strings and numbers only."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    return None


def _first_error(errors: Iterable[BaseException]) -> BaseException | None:
    """The error that best describes an item whose parts failed in different ways."""
    errs = list(errors)
    for kind in (SourceChangedError, PermanentError, RetriableError):
        for e in errs:
            if isinstance(e, kind):
                return e
    return errs[0] if errs else None


def _safe_name(i: int, name: str) -> str:
    """An ASCII file name for a multipart header, unique within the request."""
    base = _UNSAFE_NAME.sub("_", name.rsplit("/", 1)[-1]).strip("._") or "image"
    return f"{i}-{base[-80:]}"


def _image_header(path: str) -> tuple[int, int, str | None]:
    """Width, height and Pillow format of an image file, from its header (blocking)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            return im.size[0], im.size[1], im.format


def _header_of(data: bytes) -> tuple[int, int, str | None] | None:
    parser = ImageFile.Parser()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        parser.feed(data)
    im = parser.image
    if im is None:
        return None
    return im.size[0], im.size[1], im.format


# long: Nucleus's API mapping, batcher and job poller in one class; issue 13 puts it on the shared sink skeleton
class NucleusSink(SinkBase):
    capabilities = Capabilities(remote_urls=True, metadata_update=True, delete=True)

    # Tunables, as attributes so tests can tighten them.
    batch_window = 0.05  # seconds a part waits for others to share its request
    max_files = MAX_FILES_PER_REQUEST
    max_batch_bytes = MAX_BATCH_BYTES
    max_async_items = MAX_ASYNC_ITEMS
    poll_first = 0.5  # seconds before the first job poll; doubles up to poll_max
    poll_max = 5.0
    job_timeout = 1800.0  # a job still running after this is given up (RetriableError)

    def __init__(self, backend: NucleusBackend, workers: int = 8) -> None:
        key = backend.api_key()
        self.base = (backend.base_url or DEFAULT_BASE_URL).rstrip("/")
        if backend.api_key_file is not None:
            hint = f"backend.api_key_file {backend.api_key_file}"
        else:
            hint = f"backend.api_key_env {backend.api_key_env}"
        token = base64.b64encode(f"{key}:".encode()).decode("ascii")
        self.client = PlatformClient(
            NAME,
            {"Authorization": f"Basic {token}"},
            per_minute=backend.requests_per_minute or DEFAULT_REQUESTS_PER_MINUTE,
            key_hint=hint,
            connections=max(4, workers + 2),
        )
        self.workers = max(1, workers)
        self._ids: dict[str, str] = {}  # dataset name -> Nucleus dataset id
        self._id_locks: dict[str, asyncio.Lock] = {}
        # dataset -> metadata key -> (type, item that set it, whether others use it too)
        self._types: dict[str, dict[str, tuple[str, str, bool]]] = {}
        self._batchers: dict[tuple[str, str], _Batcher] = {}
        self._closed = False

    def __repr__(self) -> str:  # never the key
        return f"NucleusSink({self.base!r})"

    # --- the Sink interface ----------------------------------------------------------

    async def ensure_dataset(self, dataset: str) -> None:
        await self._dataset_id(dataset, create=True)

    async def put_item(
        self, dataset: str, item: ItemPayload, previous: Manifest | None = None
    ) -> PutResult:
        parts, multi = self._parts(item)
        self._check_metadata(dataset, item.key, [p.metadata for p in parts])
        await self._check_images(parts)
        ds = await self._dataset_id(dataset, create=True)
        assert ds is not None
        if not multi:
            await self._send(ds, parts)
            return PutResult(backend_id=item.key, version=1, changed=True)
        anchor, others = parts[0], parts[1:]
        new = [p.reference_id for p in others]
        old = await self._recorded_parts(ds, item.key)
        stale = [r for r in old if r not in set(new) and r != item.key]
        # The anchor goes first and lists every part that may exist (old and new), so
        # an interruption anywhere leaves a record from which the next put or a delete
        # finds them all.
        anchor.metadata[META_PARTS] = new + stale
        await self._send(ds, [anchor])
        await self._send(ds, others)
        if stale:
            await self._delete_refs(ds, stale)
            await self._merge_metadata(ds, [(item.key, {META_PARTS: new})], item.key)
            log.debug("removed stale parts", dataset=dataset, item=item.key, parts=len(stale))
        return PutResult(backend_id=item.key, version=1, changed=True)

    async def update_metadata(
        self, dataset: str, item: ItemPayload, backend_id: str | None
    ) -> PutResult:
        """Change only metadata. The endpoint merges, so it is used when keys were only
        added or changed: the new values go to the item's image and every part its
        anchor records (read from Nucleus, so the payload's files are not needed).
        When a key was removed the item is appended again, which replaces its metadata
        entirely (and re-sends its bytes): that needs the payload put_item takes."""
        ds = await self._dataset_id(dataset, create=True)
        assert ds is not None
        current = await self._get_item(ds, item.key)
        if current is None:
            return await self.put_item(dataset, item)
        held = current.get("metadata")
        held = held if isinstance(held, dict) else {}
        removed = sorted(k for k in held if k not in RESERVED_KEYS and k not in item.metadata)
        if removed:
            log.debug(
                "metadata keys removed: appending the item again",
                dataset=dataset,
                item=item.key,
                removed=removed,
            )
            return await self.put_item(dataset, item)
        recorded = held.get(META_PARTS)
        refs = [item.key] + ([str(r) for r in recorded if r] if isinstance(recorded, list) else [])
        metadata = dict(item.metadata)
        self._check_metadata(dataset, item.key, [metadata])
        await self._merge_metadata(ds, [(r, metadata) for r in refs], item.key)
        return PutResult(backend_id=item.key, version=1, changed=True)

    async def delete_item(self, dataset: str, path: str, name: str) -> None:
        ds = await self._dataset_id(dataset, create=False)
        if ds is None:
            return  # no such dataset: nothing to delete
        key = item_key(path, name)
        parts = await self._recorded_parts(ds, key)
        if parts:
            await self._delete_refs(ds, parts)
        await self._delete_refs(ds, [key])

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for b in list(self._batchers.values()):
            await b.close()
        await self.client.close()

    # --- mapping an item onto Nucleus images -----------------------------------------

    def _parts(self, item: ItemPayload) -> tuple[list[_Part], bool]:
        """The Nucleus images an item becomes, anchor first, and whether it is split."""
        if not item.slots or not any(s.files for s in item.slots):
            raise PermanentError(f"{NAME}: item {item.key} has no files to send")
        for slot in item.slots:
            self._check_slot(item, slot)
        multi = (
            len(item.slots) > 1
            or any(len(s.files) > 1 or s.type == "frames" for s in item.slots)
            or "layout" in item.slots[0].extra
        )
        if not multi:
            f = item.slots[0].files[0]
            return [_Part(item.key, item.key, dict(item.metadata), f)], False
        parts: list[_Part] = []
        for slot in item.slots:
            times = slot.extra.get("timestamps") if slot.type == "frames" else None
            for i, f in enumerate(slot.files):
                part_id = slot.name if len(slot.files) == 1 else f"{slot.name}/{f.name}"
                ref = item.key if not parts else f"{item.key}#{part_id}"
                md = {**item.metadata, META_ITEM: item.key, META_SLOT: slot.name}
                if isinstance(times, list) and i < len(times):
                    md[META_TIME] = times[i]
                parts.append(_Part(item.key, ref, md, f))
        refs = [p.reference_id for p in parts]
        if len(set(refs)) != len(refs):
            raise PermanentError(
                f"{NAME}: item {item.key} has two files that map to the same reference_id; "
                "give its slots' files distinct names"
            )
        return parts, True

    def _check_slot(self, item: ItemPayload, slot: SlotPayload) -> None:
        if slot.type in ("image", "frames"):
            for f in slot.files:
                if f.url is not None and not f.url.startswith(REMOTE_SCHEMES):
                    raise PermanentError(
                        f"{NAME} cannot fetch {f.url} (item {item.key}): it reads s3://, gs:// "
                        "and http(s) URLs. For Azure containers use `transfer: copy` so the "
                        "bytes are uploaded"
                    )
            return
        first = slot.files[0].name if slot.files else slot.name
        if slot.type == "dicom":
            raise PermanentError(
                f"{NAME} image datasets do not take DICOM: {first} (item {item.key}). "
                "Export the series as PNG/JPEG images into the watched folder, or send DICOM "
                "to a backend that takes it (darwin, labelbox)"
            )
        if slot.type == "video":
            raise PermanentError(
                f"{NAME} image datasets do not take video files: {first} (item {item.key}). "
                "Set `video: {mode: frames, fps: N}` on this watch to send sampled frames "
                "as images"
            )
        raise PermanentError(
            f"{NAME} image datasets take images only: {first} (item {item.key}) is not one; "
            "exclude it from the watch (`exclude`) or convert it to PNG/JPEG"
        )

    def _check_metadata(self, dataset: str, key: str, metadatas: list[dict[str, Any]]) -> None:
        """JSON Nucleus can store, and the type rule: a key is a string everywhere or a
        number everywhere in a dataset. Checked here, before sending, so a conflict is
        named instead of failing a whole request."""
        for md in metadatas:
            try:
                json.dumps(md, allow_nan=False)
            except ValueError as e:
                bad = [k for k, v in md.items() if isinstance(v, float) and not math.isfinite(v)]
                raise PermanentError(
                    f"item {key}: metadata key {', '.join(bad) or '?'} holds NaN or "
                    f"Infinity, which {NAME} cannot store ({e}); fix the metadata source"
                ) from e
            except TypeError as e:
                raise PermanentError(f"item {key}: metadata is not JSON ({e})") from e
        known = self._types.setdefault(dataset, {})
        seen: dict[str, str] = {}
        for md in metadatas:
            for k, v in md.items():
                t = _scalar_type(v)
                if t is None:
                    continue
                prev = known.get(k)
                if prev is not None and prev[0] != t and (prev[1] != key or prev[2]):
                    raise PermanentError(
                        f"item {key}: metadata key {json.dumps(k)} is a {t} here but a "
                        f"{prev[0]} on item {prev[1]} in dataset {dataset}; {NAME} needs a key "
                        f"to be a string everywhere or a number everywhere: make it a "
                        f"{prev[0]} (or rename the key)"
                    )
                seen[k] = t
        for k, t in seen.items():
            prev = known.get(k)
            if prev is None:
                known[k] = (t, key, False)
            elif prev[1] != key:
                known[k] = (prev[0], prev[1], True)
            elif not prev[2]:
                known[k] = (t, key, False)

    async def _check_images(self, parts: list[_Part]) -> None:
        """Every local or streamed file must be an image of at most 5000 x 5000 px.
        Remote files are checked by Nucleus when it fetches them."""
        results = await asyncio.gather(
            *(self._check_image(p) for p in parts if p.file.url is None),
            return_exceptions=True,
        )
        err = _first_error(r for r in results if isinstance(r, BaseException))
        if err is not None:
            raise err

    async def _check_image(self, p: _Part) -> None:
        f = p.file
        try:
            if f.local_path:
                header = await asyncio.to_thread(_image_header, f.local_path)
            else:
                header = await self._streamed_header(f)
        except SyncError:
            raise
        except (FileNotFoundError, NotADirectoryError) as e:
            raise SourceChangedError(f"{f.local_path} vanished before it was sent") from e
        except PermissionError as e:
            raise PermanentError(
                f"cannot read {f.local_path}: permission denied; fix its permissions"
            ) from e
        except Image.DecompressionBombError as e:
            raise self._oversize(p, None) from e
        except OSError as e:  # includes UnidentifiedImageError
            if not isinstance(e, Image.UnidentifiedImageError) and e.errno is not None:
                raise RetriableError(f"cannot read {f.local_path}: {e.strerror or e}") from e
            header = None
        except (ValueError, SyntaxError):  # what some Pillow plugins raise on garbage
            header = None
        if header is None:
            raise PermanentError(
                f"{NAME} takes images only: {p.what} is not an image that can be read "
                "(corrupt, or a format other than JPEG/PNG/...); replace or exclude the file"
            )
        w, h, fmt = header
        if w > MAX_SIDE or h > MAX_SIDE:
            raise self._oversize(p, (w, h))
        mime = f.content_type or (Image.MIME.get(fmt) if fmt else None)
        p.mime = mime or "application/octet-stream"

    @staticmethod
    def _oversize(p: _Part, size: tuple[int, int] | None) -> PermanentError:
        dims = f"{size[0]} x {size[1]} px" if size else "too large to open"
        return PermanentError(
            f"{p.what} is {dims}; {NAME} takes images up to {MAX_SIDE} x {MAX_SIDE} px. "
            f"Set `images: {{max_dimension: {MAX_SIDE}, oversize: downscale}}` (or less) on "
            "this watch so oversize images are downscaled before upload, or shrink the file"
        )

    async def _streamed_header(self, f: FilePayload) -> tuple[int, int, str | None] | None:
        buf = io.BytesIO()
        stream = read_chunks(f, chunk=64 << 10)
        try:
            async for chunk in stream:
                buf.write(chunk)
                header = _header_of(buf.getvalue())
                if header is not None or buf.tell() >= HEADER_BYTES:
                    return header
        finally:
            await stream.aclose()
        return _header_of(buf.getvalue())

    # --- datasets ----------------------------------------------------------------------

    def _url(self, *segments: str) -> str:
        return "/".join([self.base, *segments])

    async def _dataset_id(self, name: str, *, create: bool) -> str | None:
        if name in self._ids:
            return self._ids[name]
        lock = self._id_locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self._ids:
                return self._ids[name]
            ans = await self.client.request(
                "GET", self._url("dataset", "details"), what="listing datasets"
            )
            listing = ans.json()
            if not isinstance(listing, list):
                raise RetriableError(f"{NAME} listing datasets: unexpected answer {ans.text()}")
            ids = sorted(
                str(d["id"])
                for d in listing
                if isinstance(d, dict) and d.get("name") == name and d.get("id")
            )
            if len(ids) > 1:
                raise PermanentError(
                    f"{NAME} has {len(ids)} datasets named {name!r} ({', '.join(ids)}); "
                    "rename or delete the extra ones so ingestd knows which one to fill"
                )
            if ids:
                self._ids[name] = ids[0]
            elif create:
                ans = await self.client.request(
                    "POST",
                    self._url("dataset", "create"),
                    what=f"creating dataset {name!r}",
                    json_body={"name": name, "is_scene": False},
                )
                ds = (ans.json() or {}).get("dataset_id") if isinstance(ans.json(), dict) else None
                if not ds:
                    raise RetriableError(
                        f"{NAME} creating dataset {name!r}: no dataset_id in {ans.text()}"
                    )
                self._ids[name] = str(ds)
                log.info("created dataset", backend="nucleus", dataset=name, id=ds)
            else:
                return None
            return self._ids[name]

    # --- items by reference_id ---------------------------------------------------------

    def _ref_url(self, ds: str, ref: str) -> str:
        return self._url("dataset", ds, "refloc", quote(ref, safe=""))

    async def _get_item(self, ds: str, ref: str) -> dict[str, Any] | None:
        ans = await self.client.request(
            "GET", self._ref_url(ds, ref), what=f"looking up {ref}", ok=frozenset({404})
        )
        if ans.status == 404:
            return None
        body = ans.json()
        item = body.get("item") if isinstance(body, dict) else None
        return item if isinstance(item, dict) else None

    async def _recorded_parts(self, ds: str, key: str) -> list[str]:
        """The part reference_ids an item's anchor records (none for a plain image)."""
        current = await self._get_item(ds, key)
        if current is None:
            return []
        md = current.get("metadata")
        parts = md.get(META_PARTS) if isinstance(md, dict) else None
        return [str(r) for r in parts if r] if isinstance(parts, list) else []

    async def _delete_refs(self, ds: str, refs: list[str]) -> None:
        slots = asyncio.Semaphore(self.workers)

        async def one(ref: str) -> None:
            async with slots:
                await self.client.request(
                    "DELETE", self._ref_url(ds, ref), what=f"deleting {ref}", ok=frozenset({404})
                )

        results = await asyncio.gather(*(one(r) for r in refs), return_exceptions=True)
        err = _first_error(r for r in results if isinstance(r, BaseException))
        if err is not None:
            raise err

    async def _merge_metadata(
        self, ds: str, entries: list[tuple[str, dict[str, Any]]], key: str
    ) -> None:
        for i in range(0, len(entries), METADATA_BATCH):
            chunk = entries[i : i + METADATA_BATCH]
            await self.client.request(
                "POST",
                self._url("dataset", ds, "metadata"),
                what=f"updating the metadata of {key}",
                json_body={
                    "metadata": [{"reference_id": r, "metadata": m} for r, m in chunk],
                    "level": "item",
                },
            )

    # --- sending parts -----------------------------------------------------------------

    async def _send(self, ds: str, parts: list[_Part]) -> None:
        """Submit parts to the batchers and wait for all of them; raise the most telling
        failure once every part has an answer."""
        if self._closed:
            raise RetriableError(f"{NAME} sink is closed")
        futures = []
        for p in parts:
            mode = "remote" if p.file.url is not None else "local"
            futures.append(self._batcher(ds, mode).submit(p))
        results = await asyncio.gather(*futures, return_exceptions=True)
        errors = [
            RetriableError(f"{NAME} sink closed before {p.what} was sent")
            if isinstance(r, asyncio.CancelledError)
            else r
            for p, r in zip(parts, results, strict=True)
            if isinstance(r, BaseException)
        ]
        err = _first_error(errors)
        if err is not None:
            raise err

    def _batcher(self, ds: str, mode: str) -> _Batcher:
        b = self._batchers.get((ds, mode))
        if b is None:
            if mode == "local":
                b = _Batcher(
                    lambda batch: self._append_local(ds, batch),
                    max_parts=self.max_files,
                    max_bytes=self.max_batch_bytes,
                    window=self.batch_window,
                    concurrency=self.workers,
                )
            else:
                b = _Batcher(
                    lambda batch: self._append_remote(ds, batch),
                    max_parts=self.max_async_items,
                    max_bytes=1 << 62,  # no bytes move: only the count matters
                    window=self.batch_window,
                    concurrency=self.workers,
                )
            self._batchers[(ds, mode)] = b
        return b

    def _dataset_gone(self, ds: str, e: SyncError, parts: list[_Part]) -> bool:
        """A 404 on a dataset route: someone deleted the dataset in Nucleus. Forget its id
        so the next attempt finds it again by name (or creates it)."""
        if not isinstance(e, PermanentError) or "HTTP 404" not in e.reason:
            return False
        for name, known in list(self._ids.items()):
            if known == ds:
                del self._ids[name]
                log.warning("dataset no longer exists in Nucleus", dataset=name, id=ds)
        for p in parts:
            p.resolve(
                RetriableError(f"{NAME} dataset {ds} no longer exists; {p.what} is sent again")
            )
        return True

    async def _isolate(
        self, parts: list[_Part], send: Callable[[list[_Part]], Awaitable[None]]
    ) -> None:
        """The answer did not say which part failed: send each alone for its own verdict."""
        log.debug("sending parts one by one to tell their results apart", parts=len(parts))
        for p in parts:
            try:
                await send([p])
            except Exception as e:
                p.resolve(e)

    # multipart append of local and streamed bytes

    # long: the multipart append and its per-item answer read best as one sequence; issue 13 replaces it with the async path
    async def _append_local(self, ds: str, parts: list[_Part]) -> None:
        boundary = uuid.uuid4().hex
        names = [_safe_name(i, p.file.name) for i, p in enumerate(parts)]
        items = [
            {
                "reference_id": p.reference_id,
                "metadata": p.metadata,
                "image_url": n,
                "upload_to_scale": True,
                "update": True,
            }
            for p, n in zip(parts, names, strict=True)
        ]
        head = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="items"\r\n'
                "Content-Type: application/json\r\n\r\n"
            ).encode()
            + json.dumps(items, ensure_ascii=False, allow_nan=False).encode()
            + b"\r\n"
        )
        part_heads = [
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                f'filename="{n}"\r\nContent-Type: {p.mime}\r\n\r\n'
            ).encode()
            for p, n in zip(parts, names, strict=True)
        ]
        tail = f"--{boundary}--\r\n".encode()
        length = (
            len(head)
            + sum(len(h) + p.file.size + 2 for h, p in zip(part_heads, parts, strict=True))
        ) + len(tail)
        failed: dict[int, SyncError] = {}

        async def body() -> AsyncIterator[bytes]:
            yield head
            for i, p in enumerate(parts):
                yield part_heads[i]
                async for chunk in self._file_bytes(i, p, failed):
                    yield chunk
                yield b"\r\n"
            yield tail

        def fresh() -> AsyncIterator[bytes]:
            if failed:  # a file went bad in the last attempt: stop retrying this batch
                raise next(iter(failed.values()))
            return body()

        what = f"uploading {len(parts)} image(s) to dataset {ds}"
        try:
            ans = await self.client.request(
                "POST",
                self._url("dataset", ds, "append"),
                what=what,
                body=fresh,
                headers={
                    "Content-Type": f"multipart/form-data; boundary={boundary}",
                    "Content-Length": str(length),
                },
            )
        except SyncError as e:
            if failed:
                rest = [p for i, p in enumerate(parts) if i not in failed]
                for i, err in failed.items():
                    parts[i].resolve(err)
                if rest:
                    await self._append_local(ds, rest)
                return
            if self._dataset_gone(ds, e, parts):
                return
            if isinstance(e, PermanentError) and len(parts) > 1:
                await self._isolate(parts, lambda one: self._append_local(ds, one))
                return
            for p in parts:
                p.resolve(self._about(p, e))
            return
        self._settle_sync_answer(ds, parts, ans)
        if any(p.future is not None and not p.future.done() for p in parts):
            await self._isolate(
                [p for p in parts if p.future is not None and not p.future.done()],
                lambda one: self._append_local(ds, one),
            )

    def _settle_sync_answer(self, ds: str, parts: list[_Part], ans: Answer) -> None:
        """Resolve the parts an append answer speaks for; leave the rest unresolved."""
        data = ans.json()
        data = data if isinstance(data, dict) else {}
        try:
            errors = int(data.get("upload_errors") or 0)
        except (TypeError, ValueError):
            errors = 0
        if errors == 0:
            for p in parts:
                p.resolve()
            log.debug(
                "appended",
                dataset=ds,
                items=[p.reference_id for p in parts],
                new=data.get("new_items"),
                updated=data.get("updated_items"),
            )
            return
        by_ref = {p.reference_id: p for p in parts}
        named: dict[str, str] = {}
        for entry in data.get("error_payload") or []:
            if not isinstance(entry, dict):
                continue
            ref = entry.get("reference_id") or entry.get("referenceId")
            if ref in by_ref:
                msg = entry.get("error") or entry.get("message") or "the upload was rejected"
                named[str(ref)] = str(msg)
        if len(named) >= errors or len(parts) == 1:
            for p in parts:
                if p.reference_id in named or len(parts) == 1:
                    reason = named.get(p.reference_id, "the upload was rejected")
                    p.resolve(
                        PermanentError(
                            f"{NAME} refused {p.what}: {reason}. Check that the file is a "
                            "valid JPEG/PNG image; it is retried when it changes or on "
                            "`ingestd retry`"
                        )
                    )
                else:
                    p.resolve()
        # otherwise the caller isolates the unresolved parts

    async def _file_bytes(
        self, i: int, p: _Part, failed: dict[int, SyncError]
    ) -> AsyncIterator[bytes]:
        """A part's bytes, checked against its size and digest as they stream: a file that
        changed since it was hashed fails the request before its last byte is sent."""
        f = p.file
        where = f.local_path or f.name
        h = hashlib.sha256()
        n = 0
        try:
            try:
                async for chunk in read_chunks(f):
                    n += len(chunk)
                    if n > f.size:
                        raise SourceChangedError(
                            f"{where} grew after it was hashed (expected {f.size} bytes)"
                        )
                    h.update(chunk)
                    yield chunk
            except SyncError:
                raise
            except OSError as e:
                raise read_error(where, e) from e
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a streamed source's own failure (object changed, ...)
                raise RetriableError(f"cannot read {where}: {type(e).__name__}: {e}") from e
            if n != f.size:
                raise SourceChangedError(
                    f"{where} shrank after it was hashed ({n} bytes, expected {f.size})"
                )
            if f.digest.startswith("sha256:") and h.hexdigest() != f.digest[7:]:
                raise SourceChangedError(f"{where} changed after it was hashed")
        except SyncError as e:
            failed[i] = e
            raise

    # asynchronous import of remote URLs

    async def _append_remote(self, ds: str, parts: list[_Part]) -> None:
        request_id = uuid.uuid4().hex
        what = f"importing {len(parts)} remote image(s) into dataset {ds}"
        try:
            ans = await self.client.request(
                "GET", self._url("dataset", ds, "signedUrl", request_id), what=what
            )
            signed = (ans.json() or {}).get("signed_url") if isinstance(ans.json(), dict) else None
            if not signed:
                raise RetriableError(f"{NAME} {what}: no signed_url in {ans.text()}")
            lines = b"".join(
                json.dumps(
                    {
                        "reference_id": p.reference_id,
                        "image_url": p.file.url,
                        "metadata": p.metadata,
                        "upload_to_scale": True,
                    },
                    ensure_ascii=False,
                    allow_nan=False,
                ).encode()
                + b"\n"
                for p in parts
            )
            # A pre-signed URL: no API key may go there.
            await self.client.request("PUT", signed, what=what, body=lambda: lines, auth=False)
            ans = await self.client.request(
                "POST",
                self._url("dataset", ds, "append"),
                what=what,
                params={"async": "1"},
                json_body={"requestId": request_id, "update": True},
            )
            job = (ans.json() or {}).get("job_id") if isinstance(ans.json(), dict) else None
            if not job:
                raise RetriableError(f"{NAME} {what}: no job_id in {ans.text()}")
            status, message = await self._wait_job(str(job), what)
            errors = await self._job_errors(str(job), what)
        except PermanentError as e:
            if self._dataset_gone(ds, e, parts):
                return
            if len(parts) > 1:
                await self._isolate(parts, lambda one: self._append_remote(ds, one))
                return
            for p in parts:
                p.resolve(self._about(p, e))
            return
        except SyncError as e:
            for p in parts:
                p.resolve(self._about(p, e))
            return
        self._settle_job(ds, parts, str(job), status, message, errors)
        left = [p for p in parts if p.future is not None and not p.future.done()]
        if left:
            await self._isolate(left, lambda one: self._append_remote(ds, one))

    async def _wait_job(self, job: str, what: str) -> tuple[str, str]:
        deadline = time.monotonic() + self.job_timeout
        wait = self.poll_first
        while True:
            await asyncio.sleep(wait)
            ans = await self.client.request("GET", self._url("job", job), what=what)
            body = ans.json()
            body = body if isinstance(body, dict) else {}
            status = str(body.get("status") or "")
            if status and status not in RUNNING:
                message = body.get("message")
                return status, message if isinstance(message, str) else json.dumps(message)
            if time.monotonic() > deadline:
                raise RetriableError(
                    f"{NAME} {what}: job {job} still {status or 'pending'} after "
                    f"{self.job_timeout:.0f} s; it is sent again later"
                )
            wait = min(self.poll_max, wait * 2)

    async def _job_errors(self, job: str, what: str) -> list[str]:
        ans = await self.client.request("GET", self._url("job", job, "errors"), what=what)
        body = ans.json()
        if not isinstance(body, list):
            return []
        return [e if isinstance(e, str) else json.dumps(e) for e in body]

    def _settle_job(
        self,
        ds: str,
        parts: list[_Part],
        job: str,
        status: str,
        message: str,
        errors: list[str],
    ) -> None:
        """Resolve parts from a finished job; leave unresolved those it cannot speak for
        (the caller then sends them alone)."""
        named: dict[_Part, str] = {}
        unmatched: list[str] = []
        for text in errors:
            p, msg = self._error_owner(text, parts)
            if p is None:
                unmatched.append(text)
            else:
                named.setdefault(p, msg)
        if status in SERVER_TROUBLE:
            for p in parts:
                p.resolve(
                    RetriableError(
                        f"{NAME} import job {job} for {p.what} ended {status}"
                        f"{': ' + message if message and message != 'null' else ''}"
                    )
                )
            return
        for p, msg in named.items():
            p.resolve(
                PermanentError(
                    f"{NAME} could not import {p.file.url} ({p.what}): {msg}. Check that "
                    "Nucleus may read the bucket and that the object is a JPEG/PNG image"
                )
            )
        rest = [p for p in parts if p not in named]
        if status == "Completed" or (named and not unmatched):
            if unmatched:
                log.warning(
                    "import job reported errors naming no item of ours",
                    dataset=ds,
                    job=job,
                    errors=unmatched[:3],
                )
            for p in rest:
                p.resolve()
            return
        if len(parts) == 1 and rest:
            detail = "; ".join(unmatched[:2]) or message or "no detail given"
            rest[0].resolve(
                PermanentError(
                    f"{NAME} import job {job} for {rest[0].what} ended {status}: {detail}"
                )
            )
        # several parts and no telling which failed: left for the caller to isolate
        log.debug("import job: result not attributable", dataset=ds, job=job, status=status)

    @staticmethod
    def _error_owner(text: str, parts: list[_Part]) -> tuple[_Part | None, str]:
        """Which part a job error names: by reference_id in a JSON error, else by its
        quoted reference_id or URL appearing in the text (longest match wins)."""
        msg = text
        ref: Any = None
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            item = data.get("item") or data.get("dataset_item") or {}
            if isinstance(item, dict):
                ref = item.get("reference_id") or item.get("referenceId")
            ref = ref or data.get("reference_id") or data.get("referenceId")
            msg = str(data.get("error") or data.get("message") or text)
        for p in parts:
            if ref is not None and p.reference_id == ref:
                return p, msg
        best: _Part | None = None
        best_len = -1
        for p in parts:
            for needle in (json.dumps(p.reference_id), p.file.url or ""):
                if needle and needle in text and len(needle) > best_len:
                    best, best_len = p, len(needle)
        return best, msg

    @staticmethod
    def _about(p: _Part, e: SyncError) -> SyncError:
        """An error of a request that carried this part, naming the part's file."""
        if p.item in e.reason:
            return e
        reason = f"{e.reason} ({p.what})"
        if isinstance(e, RetriableError):
            return RetriableError(reason, e.retry_after)
        if isinstance(e, SourceChangedError):
            return SourceChangedError(reason)
        return PermanentError(reason)


__all__ = ["DEFAULT_BASE_URL", "NucleusSink"]
