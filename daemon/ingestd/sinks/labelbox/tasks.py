"""One Labelbox import task for a set of rows, as labelbox-python's
`Dataset._exec_upsert_data_rows` and `DataUpsertTask` run it: the rows as JSON chunks
of at most 10 MB and a manifest naming them, each uploaded through `uploadFile`; one
`upsertDataRows(manifestUri)`; the task polled (a quick first look, then kit
poll_job from a wait that grows with the task's rows, doubling to the SDK's 2 s)
until any state but IN_PROGRESS; then `failedDataRowImports` names the rows it
refused."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from ingestd.core.errors import RetriableError
from ingestd.sinks.base import PutResult
from ingestd.sinks.kit.batches import chunked
from ingestd.sinks.kit.jobs import JobState, poll_job
from ingestd.sinks.labelbox import graphql as gq
from ingestd.sinks.labelbox import rows as rw

log = structlog.get_logger("ingestd.sinks")

PAGE = 5000  # labelbox-python DOWNLOAD_RESULT_PAGE_SIZE
SECOND_LOOK = 0.5  # seconds after the upsert, at least, for the second status poll
POLL_PER_ROW = 0.0005  # and this per row (5,000 rows: 2.5 s, so the SDK's 2 s at most)
UploadDoc = Callable[[bytes, str, str], Awaitable[str]]  # (data, filename, what) -> URL


async def run_task(
    gql: gq.Gql,
    upload_doc: UploadDoc,
    rows: list[rw.Row],
    *,
    first: float,
    most: float,
    timeout: float,
) -> list[PutResult | Exception]:
    """Each row's result, in order."""
    chunks = rw.json_chunks([r.spec() for r in rows])
    uris = await asyncio.gather(
        *(upload_doc(c, "json_import.json", "uploading rows") for c in chunks)
    )
    manifest_uri = await upload_doc(
        rw.manifest(uris, len(rows)), "manifest.json", "uploading a manifest"
    )
    data = await gql(gq.M_UPSERT_ROWS, {"manifestUri": manifest_uri}, "upserting rows")
    task = data["upsertDataRows"]
    task_id, status = str(task["id"]), str(task.get("status") or "")
    log.debug("upsert task started", task=task_id, rows=len(rows))
    state = rw.task_state(status)
    if state is JobState.RUNNING:
        # One quick look (a small task is done by then), then kit poll_job from when a
        # task of this size may be done (its time grows with its rows), doubling to
        # the SDK's 2 s: a task costs two or three polls, not six.
        await asyncio.sleep(first)
        status = await _status(gql, task_id)
        state = rw.task_state(status)
    if state is JobState.RUNNING:
        end = await poll_job(
            lambda: _status(gql, task_id),
            lambda s: (rw.task_state(s), s),
            what=f"Labelbox task {task_id}",
            first=min(most, max(SECOND_LOOK, len(rows) * POLL_PER_ROW) - first),
            most=most,
            timeout=timeout,
        )
        state, status = end.state, end.status
    # A canceled or unknown end names no rows: they are all sent again later.
    failed = await failed_rows(gql, task_id) if state in (JobState.DONE, JobState.FAILED) else {}
    for r in rows:
        if r.gk in failed and state is JobState.DONE:
            log.warning("Labelbox refused a data row", item=r.key, reason=failed[r.gk])
    return rw.outcomes(rows, task_id, state, status, failed)


async def _status(gql: gq.Gql, task_id: str) -> str:
    data = await gql(gq.Q_TASK, {"taskId": task_id}, f"polling task {task_id}")
    tasks = (data.get("user") or {}).get("createdTasks") or []
    if not tasks:
        raise RetriableError(f"Labelbox task {task_id} vanished while it was polled")
    return str(tasks[0].get("status") or "")


async def failed_rows(gql: gq.Gql, task_id: str) -> dict[str, str]:
    """global key -> message for the rows a task refused ("" for rows without one)."""
    out: dict[str, str] = {}
    cursor: str | None = None
    seen = 0
    while True:
        data = await gql(
            gq.Q_FAILED_ROWS,
            {"taskId": task_id, "first": PAGE, "from": cursor},
            f"reading the failures of task {task_id}",
        )
        page = data.get("failedDataRowImports") or {}
        results = page.get("results") or []
        for r in results:
            gk = str((r.get("spec") or {}).get("globalKey") or "")
            message = str(r.get("message") or "refused without a message")
            out[gk] = f"{out[gk]}; {message}" if gk in out else message
        seen += len(results)
        cursor = page.get("after")
        if not results or not cursor or seen >= int(page.get("total") or 0):
            return out


def split(rows: list[rw.Row]) -> list[list[rw.Row]]:
    """The import tasks for one dataset's rows: as few as the platform allows, but a
    global key at most once per task (Labelbox refuses a duplicate in one task)."""
    rounds: list[list[rw.Row]] = []
    keys: list[set[str]] = []
    for r in rows:
        n = next((i for i, ks in enumerate(keys) if r.gk not in ks), len(rounds))
        if n == len(rounds):
            rounds.append([])
            keys.append(set())
        rounds[n].append(r)
        keys[n].add(r.gk)
    return [t for rnd in rounds for t in chunked(rnd, rw.ROWS_PER_TASK)]
