"""How an item becomes a Labelbox data row (docs/platforms.md has the user-facing table):
its global key, the URL of each file, the row's media type and attachments, the JSON
chunks an import task reads, and what a finished task says about each row.

- Identity: `global_key` is `ingestd:<dataset>:<item key>` (':' and '%' in the dataset
  name percent-encoded, so the first ':' after the dataset always ends it; item keys
  start with '/'); over Labelbox's 200 characters it is `ingestd:sha256:<hex>`. Global
  keys are unique across the organisation, hence the dataset in it.
- A row holds one asset: the item's first file is `row_data`, every other file an
  attachment (image slots IMAGE, channel layers IMAGE_OVERLAY, videos VIDEO, other files
  a link). Media types are those labelbox-python 7.x knows (`MediaType`): it has no
  DICOM, so a DICOM series goes without one and Labelbox decides.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ingestd.core.errors import PermanentError, RetriableError
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
from ingestd.sinks.base import PutResult
from ingestd.sinks.kit.batches import chunked
from ingestd.sinks.kit.jobs import JobState

GLOBAL_KEY_MAX = 200  # Labelbox limits page: characters of a global key
CHUNK_MAX_BYTES = 10_000_000  # labelbox-python UPSERT_CHUNK_SIZE_BYTES
ROWS_PER_TASK = 150_000  # Labelbox limits page: data rows per API upload task
DIRECT_UPLOAD_MAX = 500_000_000  # documented limit of a direct upload
BUCKET_SCHEMES = ("s3", "gs", "az")

_MEDIA_TYPES = {"image": "IMAGE", "video": "VIDEO", "frames": "IMAGE"}  # "dicom": none in 7.x
# For `file` slots (nothing detected): what the extension says, or nothing (Labelbox then
# detects the type itself).
_EXT_MEDIA = {
    ".pdf": "PDF",
    ".txt": "TEXT",
    ".html": "HTML",
    ".htm": "HTML",
    ".wav": "AUDIO",
    ".mp3": "AUDIO",
    ".m4a": "AUDIO",
    ".flac": "AUDIO",
}
_LINK_ATTACHMENT = {"PDF": "PDF_URL", "TEXT": "TEXT_URL", "HTML": "HTML"}
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def global_key(dataset: str, key: str) -> str:
    ds = dataset.replace("%", "%25").replace(":", "%3A")
    gk = f"ingestd:{ds}:{key}"
    if len(gk) <= GLOBAL_KEY_MAX:
        return gk
    return "ingestd:sha256:" + hashlib.sha256(f"{dataset}\0{key}".encode()).hexdigest()


# --- URLs of registered objects ----------------------------------------------------------


def fetchable_url(f: FilePayload) -> str:
    """The https URL Labelbox reads a registered object from: `row_data` and
    attachments must be https, and Labelbox's integrations read S3, GCS and Azure
    objects by their https form (for Azure
    https://<account>.blob.core.windows.net/<container>/<key>), which the bucket source
    gives each object it can name one for (FilePayload.https_url)."""
    url = f.url or ""
    if f.https_url:
        return f.https_url
    scheme = url.partition("://")[0]
    if scheme == "https":
        return url
    if scheme == "az":
        raise PermanentError(
            f"{url}: Labelbox reads Azure objects by their https URL, which needs the "
            "storage account: set the watch's source_options.account (or "
            "AZURE_STORAGE_ACCOUNT_NAME), or use transfer: copy"
        )
    if scheme in ("s3", "gs"):
        raise PermanentError(
            f"{url}: the bucket's endpoint is not an https URL Labelbox could fetch from "
            "(e.g. an S3-compatible store on the LAN); use transfer: copy"
        )
    raise PermanentError(
        f"{url}: Labelbox only takes https URLs (or s3://, gs://, az:// objects it reads "
        "through a delegated-access integration)"
    )


def needs_integration(f: FilePayload) -> bool:
    """A bucket object Labelbox can read only through a delegated-access integration."""
    return (f.url or "").partition("://")[0] in BUCKET_SCHEMES


def upload_name(name: str) -> str:
    """The file name sent with an upload. Labelbox builds the hosted URL from it without
    encoding, so anything but [A-Za-z0-9._-] (a '#' above all) would break that URL;
    the real name lives on in external_id and the attachment names."""
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    stem = _SAFE_NAME.sub("_", stem).strip("_")[:80] or "file"
    ext = _SAFE_NAME.sub("", ext)[:10]
    return f"{stem}.{ext}" if ext else stem


def content_type(f: FilePayload) -> str:
    return f.content_type or mimetypes.guess_type(f.name)[0] or "application/octet-stream"


# --- assets ------------------------------------------------------------------------------


def media_type(slot: SlotPayload, file: FilePayload) -> str | None:
    if slot.type in _MEDIA_TYPES:
        return _MEDIA_TYPES[slot.type]
    if slot.type == "dicom":
        return None
    ext = "." + file.name.rpartition(".")[2].lower() if "." in file.name else ""
    if ext in _EXT_MEDIA:
        return _EXT_MEDIA[ext]
    guessed = mimetypes.guess_type(file.name)[0] or ""
    if guessed.startswith("image/"):
        return "IMAGE"
    if guessed.startswith("video/"):
        return "VIDEO"
    return None


def _layers(item: ItemPayload) -> set[str]:
    """Slots shown as layers of one view (a grid cell holding several slots: the
    channels grouping), which become IMAGE_OVERLAY attachments."""
    layout = item.slots[0].extra.get("layout") if item.slots else None
    out: set[str] = set()
    if isinstance(layout, dict):
        for row in layout.get("rows") or []:
            for cell in row or []:
                if isinstance(cell, list) and len(cell) > 1:
                    out.update(str(n) for n in cell)
    return out


@dataclass(frozen=True, slots=True)
class Asset:
    """One file of an item and what it becomes in the row."""

    file: FilePayload
    slot: SlotPayload
    attachment_type: str | None  # None for the row's own asset
    name: str  # the attachment name


def _attachment(
    item: ItemPayload, slot: SlotPayload, i: int, f: FilePayload, layers: set[str]
) -> Asset:
    if slot.type == "frames":
        stamps = slot.extra.get("timestamps") or []
        at = f"t={float(stamps[i]):.3f}s " if i < len(stamps) else ""
        return Asset(f, slot, "IMAGE", f"{at}{f.name}")
    if slot.type == "dicom" and len(slot.files) > 1:
        name = f"slice {i + 1} of {len(slot.files)}: {f.name}"
    elif len(item.slots) > 1 and slot.name != f.name:
        name = f"slot {slot.name}: {f.name}"
    else:
        name = f.name
    media = media_type(slot, f)
    if media == "IMAGE":
        kind = "IMAGE_OVERLAY" if slot.name in layers else "IMAGE"
    elif media == "VIDEO":
        kind = "VIDEO"
    else:  # Labelbox shows a RAW_TEXT hyperlink as a clickable link
        kind = _LINK_ATTACHMENT.get(media or "", "RAW_TEXT")
    return Asset(f, slot, kind, name)


def assets(item: ItemPayload) -> list[Asset]:
    files = [(s, i, f) for s in item.slots for i, f in enumerate(s.files)]
    if not files:
        raise PermanentError(f"{item.key} has no files to send")
    layers = _layers(item)
    first_slot, _, first = files[0]
    out = [Asset(first, first_slot, None, first.name)]
    out += [_attachment(item, s, i, f, layers) for s, i, f in files[1:]]
    return out


def payload(
    dataset_id: str,
    gk: str,
    item: ItemPayload,
    parts: Sequence[Asset],
    urls: Sequence[str],
    metadata: list[dict[str, Any]],
) -> dict[str, Any]:
    """The row's upsert payload: it replaces the row's asset, attachments and metadata."""
    out: dict[str, Any] = {
        "row_data": urls[0],
        "global_key": gk,
        "external_id": item.key,
        "metadata_fields": metadata,
        "attachments": [
            {"type": a.attachment_type, "value": url, "name": a.name}
            for a, url in zip(parts[1:], urls[1:], strict=True)
        ],
        "dataset_id": dataset_id,
    }
    media = media_type(parts[0].slot, parts[0].file)
    if media is not None:
        out["media_type"] = media
    return out


def json_chunks(specs: Sequence[Mapping[str, Any]]) -> list[bytes]:
    """The rows as JSON arrays of at most CHUNK_MAX_BYTES each (a single bigger row
    goes alone, as in labelbox-python's chunking)."""
    encoded = [json.dumps(s, separators=(",", ":"), ensure_ascii=False).encode() for s in specs]
    # Each row costs its bytes and a comma; the array adds two brackets.
    return [
        b"[" + b",".join(c) + b"]"
        for c in chunked(encoded, ROWS_PER_TASK, CHUNK_MAX_BYTES - 1, lambda e: len(e) + 1)
    ]


def manifest(chunk_uris: Sequence[str], rows: int) -> bytes:
    return json.dumps(
        {"source": "SDK", "item_count": rows, "chunk_uris": list(chunk_uris)}
    ).encode()


# --- tasks -------------------------------------------------------------------------------


def task_state(status: str) -> JobState:
    """labelbox-python's Task.wait_till_done waits while IN_PROGRESS and stops at
    anything else: so does ingestd."""
    s = status.upper()
    if s == "IN_PROGRESS":
        return JobState.RUNNING
    if s == "COMPLETE":
        return JobState.DONE
    if s == "FAILED":
        return JobState.FAILED
    if s in ("CANCELED", "CANCELLED"):
        return JobState.CANCELED
    return JobState.UNKNOWN


@dataclass(slots=True)
class Row:
    index: int  # the item's place in the batch
    key: str  # the item key
    gk: str
    payload: dict[str, Any]

    def spec(self) -> dict[str, Any]:
        # GKEY "could be existing or non-existing" (labelbox-python KeyType): a re-put
        # updates the row holding the key, never adds a second one.
        return {"id": {"type": "GKEY", "value": self.gk}, "payload": self.payload}


def outcomes(
    rows: Sequence[Row], task_id: str, state: JobState, status: str, failed: Mapping[str, str]
) -> list[PutResult | Exception]:
    """Each row's result from the task's end state and its refused rows (global key ->
    Labelbox's message; "" for failures that name no row)."""
    unattributed = failed.get("")
    out: list[PutResult | Exception] = []
    for r in rows:
        message = failed.get(r.gk)
        if message is None and unattributed is not None and len(rows) == 1:
            message = unattributed
        if message is not None and state is JobState.DONE:
            out.append(PermanentError(f"Labelbox refused the data row for {r.key}: {message}"))
        elif message is not None:
            # The task failed as a whole: whatever it says about the row, the next
            # attempt may well go through (the upsert is idempotent).
            out.append(RetriableError(f"Labelbox task {task_id} ended {status}: {message}"))
        elif state is JobState.DONE and unattributed is None:
            out.append(PutResult(backend_id=r.gk, version=1, changed=True))
        else:
            reason = unattributed or f"task {task_id} ended {status or 'without a status'}"
            out.append(RetriableError(f"Labelbox upserting {r.key}: {reason}"))
    return out
