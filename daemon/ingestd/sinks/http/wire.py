"""The http sink's side of the wire contract (daemon/ingestd/server/API.md): item URLs,
the batch body's framing, and what the server's answers mean in words a user can act
on. No I/O here."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

from ingestd.core.errors import (
    SPACE,
    PermanentError,
    RetriableError,
    SourceChangedError,
    SyncError,
)
from ingestd.core.model import FilePayload, ItemPayload
from ingestd.sinks.base import PutResult
from ingestd.sinks.kit.client import Answer

BATCH_CONTENT_TYPE = "application/x-ingestd-batch"
_PREFIX = struct.Struct(">4sI")
_MAGIC = b"IDB1"


def label(f: FilePayload) -> str:
    """The file as messages name it: its path, or the object a stream comes from."""
    return f.local_path or getattr(f.opener, "where", None) or f.name


def item_path(dataset: str, path: str, name: str) -> str:
    # Each segment encoded on its own (`#`, `?`, newlines, spaces, unicode, even `/`
    # inside a name), so the server splits exactly where the folders are.
    segments = [s for s in path.split("/") if s] + [name]
    return f"/v1/datasets/{quote(dataset, safe='')}/items/" + "/".join(
        quote(s, safe="") for s in segments
    )


def dataset_path(dataset: str) -> str:
    return f"/v1/datasets/{quote(dataset, safe='')}"


def manifest_json(item: ItemPayload) -> bytes:
    """The body of PUT …/items/…; a PermanentError when the metadata is not JSON."""
    try:
        return json.dumps(
            {"slots": [s.manifest() for s in item.slots], "metadata": item.metadata},
            ensure_ascii=False,
        ).encode()
    except (TypeError, ValueError) as e:
        raise PermanentError(f"item {item.key}: the manifest is not JSON ({e})") from e


def code_of(answer: Answer) -> str:
    body = answer.json()
    return str(body.get("code") or "") if isinstance(body, dict) else ""


def message_of(answer: Answer) -> str:
    """The server's `error` message, or what a proxy in between said."""
    body = answer.json()
    if isinstance(body, dict) and body.get("error"):
        return str(body["error"])
    text = answer.text(200)
    if text:
        return text
    try:
        return HTTPStatus(answer.status).phrase
    except ValueError:
        return "no message"


def no_space(url: str, what: str) -> RetriableError:
    """HTTP 507: the server's store is full; the sync pool holds and probes."""
    return RetriableError(
        f"the ingestion server at {url} is out of disk space (HTTP 507, {what})",
        condition=SPACE,
    )


def rejection(url: str, key_hint: str, answer: Answer, what: str) -> SyncError:
    """What a refused request means (the kit client's `reject`)."""
    status = answer.status
    if status == 507:
        return no_space(url, what)
    if status == 401:
        return PermanentError(
            f"{what}: the ingestion server at {url} refused the token (HTTP 401); "
            f"check {key_hint} against the server's tokens"
        )
    if status == 403:
        return PermanentError(
            f"{what}: the token is not allowed to do this (HTTP 403: {message_of(answer)})"
        )
    if 300 <= status < 400:
        target = answer.headers.get("Location", "?")
        return PermanentError(
            f"{what}: the server redirects to {target} (HTTP {status}); "
            "configure that URL as backend.url"
        )
    code = f", {code_of(answer)}" if code_of(answer) else ""
    return PermanentError(
        f"{what}: rejected by the server (HTTP {status}{code}): {message_of(answer)}"
    )


def changed(f: FilePayload, actual: object = None) -> SourceChangedError:
    got = f"; the server read {actual}" if actual else ""
    return SourceChangedError(f"{label(f)} changed after it was hashed{got}")


# --- batches -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """A batch body, and which item each result of its answer belongs to."""

    body: bytes
    sent: list[int]  # indices (into the items given to `frame`) of the items it carries
    refused: dict[int, SyncError]  # items that could not go in it, and why


def frame(
    items: Sequence[tuple[str, ItemPayload]], blobs: dict[str, bytes], failed: dict[int, SyncError]
) -> Frame:
    """The POST /v1/batch body (API.md, "Batches") for the items not in `failed`, with
    the bytes of `blobs` (digest -> bytes, each sent once). Each item is encoded on its
    own, so metadata that is not JSON fails that item alone."""
    refused = dict(failed)
    entries: list[bytes] = []
    sent: list[int] = []
    for i, (dataset, item) in enumerate(items):
        if i in refused:
            continue
        entry = {
            "dataset": dataset,
            "path": item.path,
            "name": item.name,
            "slots": [s.manifest() for s in item.slots],
            "metadata": item.metadata,
        }
        try:
            entries.append(json.dumps(entry, ensure_ascii=False).encode())
        except (TypeError, ValueError) as e:
            refused[i] = PermanentError(f"item {item.key}: the manifest is not JSON ({e})")
            continue
        sent.append(i)
    listed = json.dumps([{"digest": d, "size": len(b)} for d, b in blobs.items()]).encode()
    header = b'{"blobs":' + listed + b',"items":[' + b",".join(entries) + b"]}"
    body = b"".join([_PREFIX.pack(_MAGIC, len(header)), header, *blobs.values()])
    return Frame(body, sent, refused)


def result(
    dataset: str, item: ItemPayload, r: Any, files: dict[str, FilePayload], url: str = ""
) -> PutResult | SyncError:
    """One item's result of a batch answer, as put_item would return or raise it."""
    if not isinstance(r, dict) or not isinstance(r.get("status"), int):
        return RetriableError(f"item {item.key}: the server's batch answer has no result for it")
    status = r["status"]
    if status in (200, 201):
        return PutResult(
            backend_id=str(r.get("key") or item.key),
            version=int(r.get("version") or 1),
            changed=bool(r.get("changed", status == 201)),
        )
    what = f"storing item {item.key!r} in dataset {dataset!r}"
    message = str(r.get("error") or "no message")
    code = str(r.get("code") or "")
    if code == "digest_mismatch" and r.get("expected") in files:
        return changed(files[r["expected"]], r.get("actual"))
    if code == "missing_blobs":
        return RetriableError(f"{what}: the server misses blobs it was sent ({message})")
    if status == 507:
        return no_space(url or "?", what)
    if status in (408, 429) or status >= 500:
        return RetriableError(f"{what}: HTTP {status} ({message})")
    return PermanentError(f"{what}: rejected by the server (HTTP {status}, {code}): {message}")
