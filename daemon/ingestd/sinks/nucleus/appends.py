"""Appending images to a Nucleus dataset as the current SDK does, at the request floor:
local files in multipart requests of 10 to `append?async=1`, remote URLs in one NDJSON
import a job, every request's job awaited, and each job's errors mapped back to the
images they name (by reference_id).

A group's jobs are awaited together: one `POST jobs/` listing (the SDK's `list_jobs`)
answers for all of them, so a group of 500 images costs 50 appends and a few polls,
not a poll per job. Should the listing be refused or leave a job out, that job is
polled by its own `GET job/{id}`.

An answer that cannot be pinned on one image (a request refused as a whole, a job
whose errors name no image of ours) sends those images again one per request, so each
hears its own verdict; the others are not held back.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence

import structlog
from PIL import Image

from ingestd.core.errors import PermanentError, RetriableError, SourceChangedError, SyncError
from ingestd.sinks.base import read_chunks, read_error
from ingestd.sinks.kit.batches import chunked
from ingestd.sinks.kit.client import Answer, ApiClient
from ingestd.sinks.kit.jobs import JobState, poll_job
from ingestd.sinks.kit.verified import VerifiedFile, read_local
from ingestd.sinks.nucleus import api
from ingestd.sinks.nucleus.api import NAME, DatasetGone, FilePart, Job, NucleusRejected
from ingestd.sinks.nucleus.items import (
    Header,
    Part,
    header_of_bytes,
    header_of_file,
    image_mime,
    oversize,
)

log = structlog.get_logger("ingestd.sink.nucleus")

HEADER_BYTES = 4 << 20  # read at most this much of a streamed file to find its header
# Files up to this size are read whole before their request (at most `slots` requests of
# 10 such files in memory at once); bigger ones stream.
READ_WHOLE = 256 << 10

Failures = dict[Part, SyncError]
Sent = tuple[Job | None, list[Part]]  # a job and its images; no job: send them alone


class Appender:
    """`slots` bounds the requests (and the files read for them) in flight across the
    sink; files up to `small` bytes are read whole and checked before their request,
    bigger ones stream, checked as they go."""

    def __init__(
        self, client: ApiClient, url: Callable[..., str], *, slots: int, small: int = READ_WHOLE
    ) -> None:
        self.client = client
        self.url = url
        self.small = small
        self._slots = asyncio.Semaphore(max(1, slots))
        self.listing = True  # poll a group's jobs with one jobs listing
        self.poll_first = 0.05
        self.poll_most = 2.0
        self.job_timeout = 1800.0

    async def send(self, ds: str, parts: Sequence[Part], *, alone: bool = False) -> Failures:
        """Append `parts` (update: true) and wait for their jobs: the images that failed,
        with why. A DatasetGone among them means the dataset was deleted."""
        failed: Failures = {}
        local = [p for p in parts if p.url is None]
        remote = [p for p in parts if p.url is not None]
        per = 1 if alone else api.FILES_PER_APPEND
        calls = [
            self._local(ds, chunk, failed)
            for chunk in chunked(local, per, api.APPEND_BYTES, lambda p: p.file.size)
        ] + [
            self._remote(ds, chunk, failed)
            for chunk in chunked(remote, 1 if alone else api.ITEMS_PER_JOB)
        ]
        sent: list[Sent] = list(await asyncio.gather(*calls))
        jobs = [(job, ps) for job, ps in sent if job is not None]
        again = [p for job, ps in sent if job is None for p in ps]
        ends = await self._wait(ds, [job for job, _ in jobs]) if jobs else {}
        for job, ps in jobs:
            end = ends[job.id]
            if isinstance(end, SyncError):
                failed.update({p: _about(p, end) for p in ps})
            else:
                again += await self._settle(job, end, ps, failed)
        if again:
            log.debug("sending images one by one to tell their results apart", images=len(again))
            failed.update(await self.send(ds, again, alone=True))
        return failed

    # --- requests ---------------------------------------------------------------------

    async def _local(self, ds: str, parts: list[Part], failed: Failures) -> Sent:
        async with self._slots:
            files = await self._load_all(parts)
            ready: list[tuple[Part, FilePart]] = []
            for p, f in zip(parts, files, strict=True):
                if isinstance(f, FilePart):
                    ready.append((p, f))
                elif isinstance(f, SyncError):
                    failed[p] = f
                else:
                    raise f
            if not ready:
                return None, []
            body = api.Multipart(
                [api.local_item(p.reference_id, p.metadata, f.field) for p, f in ready],
                [f for _, f in ready],
            )
            what = f"appending {len(ready)} image(s) to dataset {ds}"
            sent = await self._post(
                ds,
                [p for p, _ in ready],
                failed,
                lambda: self.client.request(
                    "POST",
                    self.url("dataset", ds, "append"),
                    what=what,
                    params={"async": "1"},
                    body=body.body,
                    headers=body.headers,
                ),
                what,
            )
        # A file that changed while it streamed broke the request for all of them: it
        # alone fails, the others go again (one per request: this is rare).
        changed = {p: f.stream.error for p, f in ready if f.stream and f.stream.error}
        if changed:
            rest = [p for p, _ in ready if p not in changed]
            for p in rest:
                failed.pop(p, None)  # the request's error is not theirs
            failed.update(changed)
            return None, rest
        return sent

    async def _remote(self, ds: str, parts: list[Part], failed: Failures) -> Sent:
        rid = uuid.uuid4().hex
        lines = api.ndjson(
            [api.remote_item(p.reference_id, p.metadata, p.url or "") for p in parts]
        )
        what = f"importing {len(parts)} remote image(s) into dataset {ds}"

        async def call() -> Answer:
            ans = await self.client.request(
                "GET", self.url("dataset", ds, "signedUrl", rid), what=what
            )
            body = ans.json()
            signed = body.get("signed_url") if isinstance(body, dict) else None
            if not signed:
                raise RetriableError(f"{NAME} {what}: no signed_url in {ans.text()}")
            # A pre-signed URL: the API key must not go there.
            await self.client.request("PUT", signed, what=what, body=lambda: lines, auth=False)
            return await self.client.request(
                "POST",
                self.url("dataset", ds, "append"),
                what=what,
                params={"async": "1"},
                json_body={"requestId": rid, "update": True},
            )

        async with self._slots:
            return await self._post(ds, parts, failed, call, what)

    async def _post(
        self,
        ds: str,
        parts: list[Part],
        failed: Failures,
        call: Callable[[], Awaitable[Answer]],
        what: str,
    ) -> Sent:
        try:
            answer = await call()
            return api.job_of(answer, what), parts
        except NucleusRejected as e:
            if e.status == 404:
                gone = DatasetGone(f"{NAME} dataset {ds} no longer exists; sent again")
                failed.update({p: _about(p, gone) for p in parts})
            elif len(parts) > 1 and e.status not in (401, 403):
                return None, parts  # refused as a whole: which image is to blame?
            else:
                failed.update({p: _about(p, e) for p in parts})
        except SyncError as e:
            failed.update({p: _about(p, e) for p in parts})
        return None, []

    async def _load_all(self, parts: list[Part]) -> list[FilePart | BaseException]:
        """A request's files, each checked to be an image Nucleus takes (or why not).
        Small local files are read and checked in one thread trip for all of them."""
        whole = {i for i, p in enumerate(parts) if p.file.local_path and p.file.size <= self.small}

        def trip() -> dict[int, FilePart | SyncError]:
            out: dict[int, FilePart | SyncError] = {}
            for i in whole:
                try:
                    out[i] = _checked(i, parts[i], read_local(parts[i].file))
                except SyncError as e:
                    out[i] = e
            return out

        done: dict[int, FilePart | BaseException] = {}
        if whole:
            done.update(await asyncio.to_thread(trip))
        rest = [i for i in range(len(parts)) if i not in whole]
        loaded = await asyncio.gather(
            *(self._load(i, parts[i]) for i in rest), return_exceptions=True
        )
        done.update(zip(rest, loaded, strict=True))
        return [done[i] for i in range(len(parts))]

    async def _load(self, i: int, p: Part) -> FilePart:
        """The `i`th file of a request, streamed or big: read whole when small, else
        its header now and its bytes while they stream."""
        f = p.file
        stream = VerifiedFile(f)
        try:
            if f.size <= self.small:
                return _checked(i, p, await stream.read_all())
            p.mime = image_mime(p, await _header(p))
        except Image.DecompressionBombError as e:
            raise oversize(p, None) from e
        except OSError as e:
            raise read_error(stream.where, e) from e
        except (SyncError, asyncio.CancelledError):
            raise
        except Exception as e:  # a streamed source's own failure (object changed, ...)
            raise RetriableError(f"cannot read {stream.where}: {type(e).__name__}: {e}") from e
        return FilePart(_field(i, p), p.mime, f.size, stream=stream)

    # --- jobs -------------------------------------------------------------------------

    async def _wait(self, ds: str, jobs: list[Job]) -> dict[str, str | SyncError]:
        """Each job's final status, or why it was not awaited to the end."""
        pending = {j.id for j in jobs}
        ends: dict[str, str | SyncError] = {}
        since = min((j.created for j in jobs if j.created), default="")

        async def fetch() -> None:
            statuses = await self._statuses(ds, sorted(pending), since)
            for jid, status in statuses.items():
                if jid in pending and api.state_of(status) is not JobState.RUNNING:
                    ends[jid] = status
                    pending.discard(jid)

        def state(_: object) -> tuple[JobState, str]:
            return (JobState.RUNNING, "running") if pending else (JobState.DONE, "done")

        what = f"{NAME} append job(s) in dataset {ds}"
        try:
            await poll_job(
                fetch,
                state,
                what=what,
                first=self.poll_first,
                most=self.poll_most,
                timeout=self.job_timeout,
            )
        except SyncError as e:
            ends.update({jid: e for jid in pending})
        return ends

    async def _statuses(self, ds: str, jobs: list[str], since: str) -> dict[str, str]:
        """The status of each job: one listing for many, else a poll each."""
        statuses: dict[str, str] = {}
        if len(jobs) > 1 and self.listing:
            try:
                ans = await self.client.request(
                    "POST",
                    self.url("jobs", ""),
                    what=f"listing the jobs of dataset {ds}",
                    json_body=api.list_jobs_body(ds, since),
                )
                statuses = api.listed_statuses(ans.json())
            except NucleusRejected as e:
                if e.status in (401, 403):
                    raise
                self.listing = False  # this server lists no jobs: poll each from now on
                log.info("the jobs listing is refused; polling jobs one by one", reason=e.reason)
        missing = [j for j in jobs if j not in statuses]
        if missing:
            answers = await asyncio.gather(
                *(
                    self.client.request("GET", self.url("job", j), what=f"polling job {j}")
                    for j in missing
                )
            )
            statuses.update(
                {j: api.job_status(a.json()) for j, a in zip(missing, answers, strict=True)}
            )
        return statuses

    async def _settle(
        self, job: Job, status: str, parts: list[Part], failed: Failures
    ) -> list[Part]:
        """Record what a finished job says of each image; return the images it cannot
        speak for (to be sent again one by one)."""
        state = api.state_of(status)
        if state is not JobState.DONE:
            for p in parts:
                failed[p] = RetriableError(
                    f"{NAME} append job {job.id} for {p.what} ended {status or 'with no status'}"
                    "; it is sent again"
                )
            return []
        if status == "Completed":
            log.debug("appended", job=job.id, images=len(parts), first=parts[0].reference_id)
            return []
        ans = await self.client.request(
            "GET", self.url("job", job.id, "errors"), what=f"reading the errors of job {job.id}"
        )
        by_ref = {p.reference_id: p for p in parts}
        refs = {p.reference_id: [p.url] if p.url else [] for p in parts}
        named: dict[str, str] = {}
        unmatched: list[str] = []
        for text in api.job_errors(ans.json()):
            ref, msg = api.error_owner(text, refs)
            if ref is None:
                unmatched.append(text)
            else:
                named.setdefault(ref, msg)
        for ref, msg in named.items():
            failed[by_ref[ref]] = _refused(by_ref[ref], msg)
        rest = [p for p in parts if p.reference_id not in named]
        if not rest or (named and not unmatched):
            return []
        if len(parts) == 1:
            detail = "; ".join(unmatched[:2]) or "no detail given"
            failed[rest[0]] = _refused(rest[0], f"job {job.id} ended {status}: {detail}")
            return []
        log.debug(
            "job errors name no image of ours", job=job.id, status=status, errors=unmatched[:3]
        )
        return rest


async def _header(p: Part) -> Header | None:
    """An image's header: from its local file, or from the first bytes of its stream."""
    if p.file.local_path:
        return await asyncio.to_thread(header_of_file, p.file.local_path)
    buf = bytearray()
    chunks = read_chunks(p.file, chunk=64 << 10)
    try:
        async for chunk in chunks:
            buf += chunk
            header = header_of_bytes(bytes(buf))
            if header is not None or len(buf) >= HEADER_BYTES:
                return header
    finally:
        await chunks.aclose()
    return header_of_bytes(bytes(buf))


def _field(i: int, p: Part) -> str:
    """What names the `i`th file part of a request: unique in it, and a path as the
    SDK's is, whose last segment is the file's name."""
    return f"{i}/{p.file.name}"


def _checked(i: int, p: Part, data: bytes) -> FilePart:
    """The whole bytes of a file as the `i`th part of a request, once they are known to
    be an image Nucleus takes."""
    try:
        p.mime = image_mime(p, header_of_bytes(data))
    except Image.DecompressionBombError as e:
        raise oversize(p, None) from e
    return FilePart(_field(i, p), p.mime, len(data), data=data)


def _refused(p: Part, msg: str) -> PermanentError:
    if p.url is not None:
        return PermanentError(
            f"{NAME} could not import {p.url} ({p.what}): {msg}. Check that Nucleus may "
            "read the bucket and that the object is a JPEG/PNG image"
        )
    return PermanentError(
        f"{NAME} refused {p.what}: {msg}. Check that the file is a valid JPEG/PNG image; "
        "it is retried when it changes or on `ingestd retry`"
    )


def _about(p: Part, e: SyncError) -> SyncError:
    """An error of a request that carried this image, naming the image's file."""
    if p.item in e.reason:
        return e
    reason = f"{e.reason} ({p.what})"
    if isinstance(e, DatasetGone):
        return DatasetGone(reason)
    if isinstance(e, RetriableError):
        return RetriableError(reason, e.retry_after)
    if isinstance(e, SourceChangedError):
        return SourceChangedError(reason)
    return PermanentError(reason)
