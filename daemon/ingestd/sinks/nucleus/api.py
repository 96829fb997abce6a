"""Scale Nucleus's HTTP API as the current SDK (scale-nucleus 0.22) speaks it: the item
JSON of an append, the multipart body of local files, the answers of jobs and of the
jobs listing, and Nucleus's errors in words. No state and no I/O here; sink.py and
appends.py send what this module builds.

- Local files: `POST dataset/{id}/append?async=1` as multipart/form-data, a part
  `items` (a JSON array of `{metadata, reference_id, image_url, update}`) then one
  `image` part per item whose (percent-encoded) filename is the item's `image_url`, at
  most 10 files a request (nucleus/dataset_item_uploader.py). The answer is a job.
- Remote URLs: `GET dataset/{id}/signedUrl/{uuid}`, a PUT of NDJSON
  `{metadata, reference_id, image_url}` there, `POST dataset/{id}/append?async=1
  {requestId, update}` (nucleus/dataset.py). The answer is a job.
- Jobs: `GET job/{id}`; many at once by `POST jobs/` (the SDK's `list_jobs`);
  `GET job/{id}/errors` lists each failed item's JSON and error.
- Metadata merge: `POST dataset/{id}/metadata?async=0` (nucleus/metadata_manager.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ingestd.core.errors import PermanentError, RetriableError
from ingestd.sinks.kit.client import Answer, Verdict, auth_or_rejection
from ingestd.sinks.kit.jobs import JobState
from ingestd.sinks.kit.verified import VerifiedFile

NAME = "Scale Nucleus"
DEFAULT_BASE_URL = "https://api.scale.com/v1/nucleus"
# Nucleus documents no request budget; this keeps a busy daemon polite by default
# (backend.requests_per_minute overrides it).
DEFAULT_REQUESTS_PER_MINUTE = 600
FILES_PER_APPEND = 10  # the SDK refuses local_files_per_upload_request > 10
APPEND_BYTES = 64 << 20  # keeps one retried request from re-sending gigabytes
ITEMS_PER_JOB = 1000  # remote items in one NDJSON import
METADATA_BATCH = 500  # the SDK refuses a larger synchronous metadata update
JOB_TYPE = "uploadDatasetItems"

# The SDK's JobStatus: it waits while "Running"; Queued is the same wait.
_RUNNING = frozenset({"Queued", "Running"})
_DONE = frozenset({"Completed", "Errored_User", "Errored_Partial"})  # per-item results
_FAILED = frozenset({"Errored", "Errored_Server", "Errored_Hanging"})


class DatasetGone(RetriableError):
    """The dataset was deleted in Nucleus (e.g. by hand): found again, or made anew, on
    the next attempt."""


class NucleusRejected(PermanentError):
    """Nucleus refused a request; `status` says how (404: the dataset or job is gone)."""

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.status = status


# The SDK's RetryStrategy statuses (503, 504, 520, 524: the gateway's timeouts), plus
# 429 with its Retry-After (the SDK does not retry it) and the other transient answers.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 520, 522, 524})


def rule(answer: Answer) -> Verdict:
    """Which answers are worth another attempt of the same request."""
    if 200 <= answer.status < 300:
        return "ok"
    return "retry" if answer.status in RETRY_STATUSES else "reject"


def rejection(key_hint: str) -> Callable[[Answer, str], Exception]:
    """Nucleus's `{"error": ...}` answers in words; 401/403 name the key's setting."""

    def reject(answer: Answer, what: str) -> Exception:
        if answer.status in (401, 403):
            return auth_or_rejection(NAME, key_hint, answer, what)
        body = answer.json()
        message = body.get("error") if isinstance(body, dict) else None
        text = str(message) if message else answer.text() or "no message"
        return NucleusRejected(
            f"{NAME} {what}: rejected (HTTP {answer.status}): {text}", answer.status
        )

    return reject


# --- datasets ---------------------------------------------------------------------------


def dataset_id_named(listing: Any, name: str) -> str | None:
    """The id of the one dataset called `name` in `GET dataset/details`."""
    if not isinstance(listing, list):
        raise ValueError("the dataset listing is not a list")
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
    return ids[0] if ids else None


def create_dataset_body(name: str) -> dict[str, Any]:
    return {"name": name, "is_scene": False}


# --- items ------------------------------------------------------------------------------


def local_item(reference_id: str, metadata: Mapping[str, Any], field: str) -> dict[str, Any]:
    """An item of a multipart append: `field` names its file part (update: replace)."""
    return {
        "metadata": dict(metadata),
        "reference_id": reference_id,
        "image_url": field,
        "update": True,
    }


def remote_item(reference_id: str, metadata: Mapping[str, Any], url: str) -> dict[str, Any]:
    """One NDJSON line of a remote import (the job's `update` applies to all)."""
    return {"metadata": dict(metadata), "reference_id": reference_id, "image_url": url}


def ndjson(items: Sequence[Mapping[str, Any]]) -> bytes:
    return b"".join(
        json.dumps(it, ensure_ascii=False, allow_nan=False).encode() + b"\n" for it in items
    )


def metadata_body(entries: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    return {
        "metadata": [{"reference_id": r, "metadata": dict(m)} for r, m in entries],
        "level": "item",
    }


@dataclass(frozen=True, slots=True)
class FilePart:
    """One `image` part: its bytes read already (`data`) or streamed and checked
    (`stream`, re-opened per attempt)."""

    field: str  # the item's image_url, which names the part
    mime: str
    size: int
    data: bytes | None = None
    stream: VerifiedFile | None = None


class Multipart:
    """The body of one local append, built by hand so that its length is known up front
    (sent with Content-Length, never chunked) and the files stream from disk. `body()`
    starts over on every call (one per attempt); a file whose check failed in an earlier
    attempt raises its error at once instead of being sent again."""

    def __init__(self, items: Sequence[Mapping[str, Any]], files: Sequence[FilePart]) -> None:
        self.files = list(files)
        boundary = uuid.uuid4().hex
        self._head = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="items"\r\n'
                "Content-Type: application/json\r\n\r\n"
            ).encode()
            + json.dumps(list(items), ensure_ascii=False, allow_nan=False).encode()
            + b"\r\n"
        )
        self._part_heads = [
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                f'filename="{quote(f.field, safe="")}"\r\nContent-Type: {f.mime}\r\n\r\n'
            ).encode()
            for f in self.files
        ]
        self._tail = f"--{boundary}--\r\n".encode()
        self.length = (
            len(self._head)
            + sum(len(h) + f.size + 2 for h, f in zip(self._part_heads, self.files, strict=True))
            + len(self._tail)
        )
        self.headers = {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(self.length),
        }

    def body(self) -> AsyncIterator[bytes]:
        for f in self.files:
            if f.stream is not None and f.stream.error is not None:
                raise f.stream.error
        return self._body()

    async def _body(self) -> AsyncIterator[bytes]:
        yield self._head
        for head, f in zip(self._part_heads, self.files, strict=True):
            yield head
            if f.data is not None:
                yield f.data
            elif f.stream is not None:
                async for block in f.stream.body():
                    yield block
            yield b"\r\n"
        yield self._tail


# --- jobs -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Job:
    """A job an append answered with."""

    id: str
    created: str  # job_creation_time, in the server's own clock


def job_of(answer: Answer, what: str) -> Job:
    body = answer.json()
    job = body.get("job_id") if isinstance(body, dict) else None
    if not job:
        raise PermanentError(f"{NAME} {what}: the answer names no job ({answer.text()})")
    return Job(str(job), str(body.get("job_creation_time") or ""))


def state_of(status: str) -> JobState:
    if status in _RUNNING:
        return JobState.RUNNING
    if status in _DONE:
        return JobState.DONE
    if status in _FAILED:
        return JobState.FAILED
    if status == "Cancelled":
        return JobState.CANCELED
    return JobState.UNKNOWN  # "Retried" and anything newer: ends the wait, sent again


def job_status(body: Any) -> str:
    """`GET job/{id}`'s status word ("" when the answer has none)."""
    return str(body.get("status") or "") if isinstance(body, dict) else ""


def list_jobs_body(dataset_id: str, since: str) -> dict[str, Any]:
    """The SDK's list_jobs payload (JobInfoRequestPayload) for one dataset's uploads."""
    return {
        "dataset_id": dataset_id,
        "job_types": [JOB_TYPE],
        "from_date": since or None,
        "to_date": None,
        "limit": 50_000,
        "show_completed": True,
    }


def listed_statuses(body: Any) -> dict[str, str]:
    """job id -> job_last_known_status from a jobs listing."""
    if not isinstance(body, list):
        return {}
    return {
        str(j["job_id"]): str(j.get("job_last_known_status") or "")
        for j in body
        if isinstance(j, dict) and j.get("job_id")
    }


def job_errors(body: Any) -> list[str]:
    if not isinstance(body, list):
        return []
    return [e if isinstance(e, str) else json.dumps(e) for e in body]


def error_owner(text: str, refs: Mapping[str, Sequence[str]]) -> tuple[str | None, str]:
    """Which reference_id a job error names, and its message. `refs` maps each
    reference_id to other strings that identify it (its URL). By the error JSON's
    item reference_id; else by a quoted reference_id or URL in the text (longest wins)."""
    msg, ref = text, None
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
    if isinstance(ref, str) and ref in refs:
        return ref, msg
    best, best_len = None, -1
    for r, others in refs.items():
        for needle in (json.dumps(r), *others):
            if needle and needle in text and len(needle) > best_len:
                best, best_len = r, len(needle)
    return best, msg
