"""Our item model onto Nucleus images (docs/platforms.md, "Scale Nucleus"), and the
rules Nucleus enforces that are checked here before anything is sent, so a refusal
names the file and the fix instead of failing a whole request.

Nucleus holds flat datasets of images keyed by a `reference_id`, each with a metadata
dictionary. An item whose only content is one image becomes one Nucleus image with
`reference_id` = the item key. Items Nucleus cannot hold as one image (slots, channels,
frames sampled from a video) become one image per file: the first (the "anchor") under
the item key, every other `<key>#<slot>` (a frame: `<key>#<slot>/<frame file>`), each
with the item's metadata plus `ingestd_item` and `ingestd_slot` (frames also
`ingestd_time`); the anchor lists the others in `ingestd_parts`.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from PIL import Image, ImageFile

from ingestd.core.errors import PermanentError
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
from ingestd.sinks.nucleus.api import NAME

MAX_SIDE = 5000  # Nucleus' image limit, px per side

META_ITEM = "ingestd_item"
META_SLOT = "ingestd_slot"
META_TIME = "ingestd_time"
META_PARTS = "ingestd_parts"
RESERVED_KEYS = frozenset({META_ITEM, META_SLOT, META_TIME, META_PARTS})

# Where Nucleus reads s3:// and gs:// URLs from: the clouds themselves (through the
# bucket's integration). An object of any other store goes by its https URL.
CLOUD_HOSTS = (".amazonaws.com", "storage.googleapis.com")


@dataclass(eq=False)
class Part:
    """One Nucleus image: one file of one item."""

    item: str  # our item key (for messages)
    reference_id: str
    metadata: dict[str, Any]
    file: FilePayload
    url: str | None = None  # what Nucleus fetches, for a registered object
    mime: str = "application/octet-stream"

    @property
    def what(self) -> str:
        return f"{self.file.name} (item {self.item})"


def parts_of(item: ItemPayload) -> tuple[list[Part], bool]:
    """The Nucleus images an item becomes, anchor first, and whether it is split."""
    if not item.slots or not any(s.files for s in item.slots):
        raise PermanentError(f"{NAME}: item {item.key} has no files to send")
    for slot in item.slots:
        _check_slot(item, slot)
    multi = (
        len(item.slots) > 1
        or any(len(s.files) > 1 or s.type == "frames" for s in item.slots)
        or "layout" in item.slots[0].extra
    )
    if not multi:
        f = item.slots[0].files[0]
        return [Part(item.key, item.key, dict(item.metadata), f, fetch_url(item, f))], False
    parts: list[Part] = []
    for slot in item.slots:
        times = slot.extra.get("timestamps") if slot.type == "frames" else None
        for i, f in enumerate(slot.files):
            part_id = slot.name if len(slot.files) == 1 else f"{slot.name}/{f.name}"
            ref = item.key if not parts else f"{item.key}#{part_id}"
            md = {**item.metadata, META_ITEM: item.key, META_SLOT: slot.name}
            if isinstance(times, list) and i < len(times):
                md[META_TIME] = times[i]
            parts.append(Part(item.key, ref, md, f, fetch_url(item, f)))
    refs = [p.reference_id for p in parts]
    if len(set(refs)) != len(refs):
        raise PermanentError(
            f"{NAME}: item {item.key} has two files that map to the same reference_id; "
            "give its slots' files distinct names"
        )
    return parts, True


def https_url_of(f: FilePayload) -> str | None:
    """The object's https form from the bucket source (FilePayload.https_url)."""
    return f.https_url


def fetch_url(item: ItemPayload, f: FilePayload) -> str | None:
    """The URL Nucleus fetches a registered object from (None: the file has bytes).
    s3:// and gs:// objects of AWS and Google Cloud as they are (Nucleus reads them
    through the bucket's integration); any other object by its https URL, which for
    Azure is what Nucleus's Azure integration reads. An s3:// URL of an S3-compatible
    store would name a bucket on AWS: such an object goes by its own endpoint's https
    URL, or not at all."""
    if f.url is None:
        return None
    if f.url.startswith(("https://", "http://")):
        return f.url
    https = https_url_of(f)
    if https is None:
        raise PermanentError(
            f"{NAME} cannot fetch {f.url} (item {item.key}): the object has no https URL "
            "Nucleus could read (an Azure source whose storage account is not known, or "
            "an S3-compatible store on a plain-http endpoint). For Azure set "
            "`source_options: {account: <name>}` on this watch (or "
            "AZURE_STORAGE_ACCOUNT_NAME); otherwise use `transfer: copy` so the bytes "
            "are uploaded"
        )
    host = urlsplit(https).hostname or ""
    if f.url.startswith(("s3://", "gs://")) and host.endswith(CLOUD_HOSTS):
        return f.url
    return https


def _check_slot(item: ItemPayload, slot: SlotPayload) -> None:
    if slot.type in ("image", "frames"):
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


# --- metadata ---------------------------------------------------------------------------


def _scalar_type(v: Any) -> str | None:
    """Nucleus' metadata type rule covers strings and numbers only."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    return None


class MetadataTypes:
    """Nucleus's rule that a metadata key is a string everywhere or a number everywhere
    in a dataset, for the items this process has sent: a conflict is named before
    sending instead of failing the item in its job."""

    def __init__(self) -> None:
        # dataset -> key -> (type, item that set it, whether other items use it too)
        self._types: dict[str, dict[str, tuple[str, str, bool]]] = {}

    def check(self, dataset: str, key: str, metadatas: list[dict[str, Any]]) -> None:
        for md in metadatas:
            _check_json(key, md)
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


def _check_json(key: str, md: dict[str, Any]) -> None:
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


# --- images -----------------------------------------------------------------------------

Header = tuple[int, int, str | None]  # width, height, Pillow format


def header_of_file(path: str) -> Header | None:
    """An image file's header (blocking: run it in a thread)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                return im.size[0], im.size[1], im.format
        except Image.UnidentifiedImageError:
            return None


def header_of_bytes(data: bytes) -> Header | None:
    """The header of an image's first bytes (all of them, or a prefix)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.size[0], im.size[1], im.format
        except (OSError, ValueError, SyntaxError):
            pass  # a prefix too short for Image.open: the incremental parser may do
        parser = ImageFile.Parser()
        try:
            parser.feed(data)
        except (OSError, ValueError, SyntaxError):
            return None
    im = parser.image
    return None if im is None else (im.size[0], im.size[1], im.format)


def image_mime(p: Part, header: Header | None) -> str:
    """The file's content type once it is known to be an image Nucleus takes."""
    if header is None:
        raise PermanentError(
            f"{NAME} takes images only: {p.what} is not an image that can be read "
            "(corrupt, or a format other than JPEG/PNG/...); replace or exclude the file"
        )
    w, h, fmt = header
    if w > MAX_SIDE or h > MAX_SIDE:
        raise oversize(p, (w, h))
    mime = p.file.content_type or (Image.MIME.get(fmt) if fmt else None)
    return mime or "application/octet-stream"


def oversize(p: Part, size: tuple[int, int] | None) -> PermanentError:
    dims = f"{size[0]} x {size[1]} px" if size else "too large to open"
    return PermanentError(
        f"{p.what} is {dims}; {NAME} takes images up to {MAX_SIDE} x {MAX_SIDE} px. "
        f"Set `images: {{max_dimension: {MAX_SIDE}, oversize: downscale}}` (or less) on "
        "this watch so oversize images are downscaled before upload, or shrink the file"
    )
