"""The bodies of bucket event messages, read into hints. Pure: no I/O, no clock.

- S3 event notifications (what S3 sends to SQS, and the same inside an SNS envelope
  when the bucket notifies a topic the queue subscribes to): `Records[]` with
  `eventName` `ObjectCreated:*` or `ObjectRemoved:*`, `s3.bucket.name`, `s3.object.key`
  URL-encoded as a form value (`+` is a space), `size`, `eTag`. The `s3:TestEvent` S3
  sends when a notification is configured is recognised and ignored.
- Event Grid blob events (what Event Grid writes to an Azure Storage queue): one event
  per message, the JSON base64-encoded; `eventType` `Microsoft.Storage.BlobCreated` or
  `BlobDeleted`, `subject` `/blobServices/default/containers/C/blobs/KEY`,
  `data.contentLength`, `data.eTag`, `eventTime`. The CloudEvents 1.0 schema (`type`,
  `subject`, `time`) is read the same way.

Each parser returns the hints under the watch's bucket prefix; anything else (another
bucket, another prefix, another event type) yields none. A body that is not an event at
all raises `NotAnEvent` with a short reason, for the log.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import unquote_plus

HintKind = Literal["created", "removed"]


@dataclass(frozen=True, slots=True)
class Hint:
    """A key an event named: look at it again. `etag`/`size` as the event gave them
    (informational: the object is looked at again before anything is planned)."""

    relpath: str  # relative to the watch's prefix
    kind: HintKind
    event_time: float  # seconds since the epoch (0 when the event has none)
    etag: str | None = None
    size: int | None = None


class NotAnEvent(ValueError):
    """A message body that is no bucket event (logged, then deleted like any other)."""


@dataclass(frozen=True, slots=True)
class Parsed:
    hints: list[Hint]
    test_event: bool = False  # the notification set-up's test message
    events: int = 0  # events in the message, ours or not


def _time(text: Any) -> float:
    if not isinstance(text, str) or not text:
        return 0.0
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _relpath(key: str, prefix: str) -> str | None:
    if not key.startswith(prefix) or key.endswith("/"):
        return None  # outside the watch, or a folder placeholder
    return key[len(prefix) :] or None


def _json(body: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise NotAnEvent(f"not JSON: {body[:80]!r}") from None


# --- S3 ---------------------------------------------------------------------------------


def parse_s3(body: str, bucket: str, prefix: str) -> Parsed:
    """An SQS message body: an S3 event notification, or one in an SNS envelope."""
    doc = _json(body)
    if isinstance(doc, dict) and doc.get("Type") == "Notification" and "Message" in doc:
        doc = _json(str(doc["Message"]))  # SNS → SQS without raw message delivery
    if not isinstance(doc, dict):
        raise NotAnEvent("not an S3 event notification (no JSON object)")
    if doc.get("Event") == "s3:TestEvent":
        return Parsed([], test_event=True)
    records = doc.get("Records")
    if not isinstance(records, list):
        raise NotAnEvent("not an S3 event notification (no Records)")
    hints: list[Hint] = []
    for rec in records:
        if not isinstance(rec, dict):
            continue
        name = str(rec.get("eventName", ""))
        if name.startswith("ObjectCreated:"):
            kind: HintKind = "created"
        elif name.startswith("ObjectRemoved:"):
            kind = "removed"
        else:
            continue  # restores, replication, lifecycle transitions: no new content
        s3 = rec.get("s3") or {}
        if (s3.get("bucket") or {}).get("name") != bucket:
            continue
        obj = s3.get("object") or {}
        rel = _relpath(unquote_plus(str(obj.get("key", ""))), prefix)
        if rel is None:
            continue
        size = obj.get("size")
        etag = obj.get("eTag")
        hints.append(
            Hint(
                rel,
                kind,
                _time(rec.get("eventTime")),
                str(etag).strip('"') if etag else None,
                int(size) if isinstance(size, int) else None,
            )
        )
    return Parsed(hints, events=len(records))


# --- Azure ------------------------------------------------------------------------------

_AZURE_KINDS: dict[str, HintKind] = {
    "Microsoft.Storage.BlobCreated": "created",
    "Microsoft.Storage.BlobDeleted": "removed",
}
_BLOBS = "/blobServices/default/containers/"


def decode_queue_text(text: str) -> str:
    """Event Grid writes each event base64-encoded into the queue; a tool that wrote
    plain JSON is accepted too."""
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        return stripped
    try:
        return base64.b64decode(stripped, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise NotAnEvent(f"neither base64 nor JSON: {text[:80]!r}") from None


def parse_event_grid(text: str, container: str, prefix: str) -> Parsed:
    """An Azure Storage queue message holding one Event Grid (or CloudEvents) blob
    event, or a JSON array of them."""
    doc = _json(decode_queue_text(text))
    events = doc if isinstance(doc, list) else [doc]
    hints: list[Hint] = []
    for ev in events:
        if not isinstance(ev, dict):
            raise NotAnEvent("not an Event Grid event (no JSON object)")
        etype = ev.get("eventType", ev.get("type"))
        if etype is None or "subject" not in ev:
            raise NotAnEvent("not an Event Grid event (no eventType or subject)")
        kind = _AZURE_KINDS.get(str(etype))
        subject = str(ev.get("subject", ""))
        if kind is None or not subject.startswith(_BLOBS):
            continue
        c, sep, key = subject[len(_BLOBS) :].partition("/blobs/")
        if not sep or c != container:
            continue
        rel = _relpath(key, prefix)
        if rel is None:
            continue
        data = ev.get("data") or {}
        size = data.get("contentLength")
        etag = data.get("eTag")
        hints.append(
            Hint(
                rel,
                kind,
                _time(ev.get("eventTime", ev.get("time"))),
                str(etag).strip('"') if etag else None,
                int(size) if isinstance(size, int) else None,
            )
        )
    return Parsed(hints, events=len(events))
