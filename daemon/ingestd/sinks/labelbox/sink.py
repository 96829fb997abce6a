"""The `labelbox` sink: items become Labelbox data rows, on the shared sink kit.

A group of items (put_items; put_item is a group of one) costs what labelbox-python's
`upsert_data_rows` costs for the same rows: every file uploaded through `uploadFile`
(up to `UPLOADS` at once, like the SDK's 20 threads), then one import task for all
rows (tasks.py). Registered bucket objects move no bytes: their https URL is the row's
asset, read by Labelbox through the dataset's delegated-access integration
(datasets.py).

Retries, the request budget (none by default, as in the SDK: a 429's Retry-After
pauses every request of the key) and auth errors are the kit's ApiClient with
Labelbox's retry rule (graphql.py). The key is never logged.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast

import structlog

from ingestd.config import LabelboxBackend
from ingestd.core.errors import PermanentError, RetriableError, SyncError
from ingestd.core.model import FilePayload, ItemPayload, item_key
from ingestd.sinks.base import (
    BatchFirstSink,
    BatchItem,
    BatchLimits,
    Capabilities,
    PutResult,
)
from ingestd.sinks.kit.batches import chunked
from ingestd.sinks.kit.client import ApiClient
from ingestd.sinks.kit.datasets import DatasetCache
from ingestd.sinks.kit.errors import worst
from ingestd.sinks.kit.jobs import JobState, poll_job
from ingestd.sinks.kit.verified import VerifiedFile, read_local_many
from ingestd.sinks.labelbox import graphql as gq
from ingestd.sinks.labelbox import rows as rw
from ingestd.sinks.labelbox import tasks
from ingestd.sinks.labelbox.datasets import Dataset, NoIntegration, find_or_create
from ingestd.sinks.labelbox.metadata import Ontology, RowMissing, replace_fields

log = structlog.get_logger("ingestd.sinks")
T = TypeVar("T")

DEFAULT_ENDPOINT = "https://api.labelbox.com/graphql"
UPLOADS = 20  # files uploaded at once per sink (labelbox-python FILE_UPLOAD_THREAD_COUNT)
READ_WHOLE = 1 << 20  # files up to this size are read (and checked) before they are sent
READ_FILES, READ_BYTES = 64, 8 << 20  # small local files read in one thread trip
READ_AHEAD = 3  # such batches in memory at once, waiting for their uploads
# A group is one import task. A task takes up to 150,000 rows (rows.ROWS_PER_TASK), but
# the sync step claims two groups ahead and redoes a whole group that fails or is cut
# off by a stop; at 5,000 rows the task's own requests (a chunk, a manifest, the upsert,
# a poll or two, the failures) already cost under 0.002 per file. A short backlog waits
# 0.1 s to fill a group: every task costs those five requests and seconds on Labelbox.
GROUP = BatchLimits(items=5000, bytes=1 << 30, linger=0.1, small=64 << 20)


@dataclass(slots=True)
class _Prepared:
    """An item of a group on its way to a row."""

    index: int
    dataset: Dataset
    item: ItemPayload
    gk: str
    parts: list[rw.Asset]
    metadata: list[dict[str, Any]]
    urls: list[str | None]  # None: a file still to upload
    error: SyncError | None = None

    def fail(self, e: SyncError) -> None:
        # The error that says most about the item wins (a changed source, then a
        # rejection, then the rest).
        self.error = cast(SyncError, worst([self.error, e]))


async def _attempt(call: Awaitable[T]) -> T | SyncError:
    try:
        return await call
    except SyncError as e:
        return e


def _small_local(f: FilePayload) -> bool:
    return bool(f.local_path) and f.opener is None and f.size <= READ_WHOLE


def _hint(backend: LabelboxBackend) -> str:
    if backend.api_key_file is not None:
        return f"backend.api_key_file {backend.api_key_file}"
    return f"the {backend.api_key_env} environment variable (backend.api_key_env)"


class LabelboxSink(BatchFirstSink):
    capabilities = Capabilities(remote_urls=True, metadata_update=True, delete=True, batch=GROUP)

    # Tunables, as attributes so tests can tighten them.
    poll_first = 0.05  # the first task poll (small tasks end within one or two)
    poll_most = 2.0  # labelbox-python's check frequency, the longest wait between polls
    task_timeout = 900.0

    def __init__(self, backend: LabelboxBackend, *, workers: int = 8) -> None:
        base = (backend.base_url or "").rstrip("/")
        if not base:
            self.endpoint = DEFAULT_ENDPOINT
        else:
            self.endpoint = base if base.endswith("/graphql") else f"{base}/graphql"
        hint = _hint(backend)
        self.client = ApiClient(
            "Labelbox",
            {"Authorization": f"Bearer {backend.api_key()}"},
            per_minute=backend.requests_per_minute,
            key_hint=hint,
            rule=gq.labelbox_rule,
            reject=lambda answer, what: gq.refusal(answer, what, hint),
            connections=UPLOADS + max(1, workers),
        )
        self._datasets: DatasetCache[Dataset] = DatasetCache(partial(find_or_create, self._gql))
        self._ontology = Ontology(self._gql)
        self._uploads = asyncio.Semaphore(UPLOADS)

    def __repr__(self) -> str:  # never the key
        return f"LabelboxSink({self.endpoint!r})"

    async def _gql(self, query: str, variables: Mapping[str, Any], what: str) -> dict[str, Any]:
        ans = await self.client.request(
            "POST",
            self.endpoint,
            what=what,
            json_body={"query": query, "variables": dict(variables)},
        )
        return gq.data_of(ans, what)

    # --- the Sink interface ----------------------------------------------------------

    async def ensure_dataset(self, dataset: str) -> None:
        await self._datasets.get(dataset)

    async def dataset(self, name: str) -> Dataset:
        """The Labelbox dataset items of `name` go to (found or created once)."""
        return await self._datasets.get(name)

    async def put_items(self, items: Sequence[BatchItem]) -> list[PutResult | Exception]:
        """Prepare every item, upload every file, then one import task per dataset.
        `previous` is not needed: a row is upserted by its global key either way."""
        out: list[PutResult | Exception | None] = [None] * len(items)
        # Each dataset once, before the items: a dataset that cannot be had fails its
        # items with one lookup, not one per item.
        names = list(dict.fromkeys(b.dataset for b in items))
        found = await asyncio.gather(*(_attempt(self._datasets.get(n)) for n in names))
        datasets = dict(zip(names, found, strict=True))
        ready = await asyncio.gather(
            *(self._prepare(i, b, datasets[b.dataset]) for i, b in enumerate(items))
        )
        prepared = [p for p in ready if isinstance(p, _Prepared)]
        for i, p in enumerate(ready):
            if isinstance(p, Exception):
                out[i] = p
        await self._upload_all(prepared)
        rows: dict[str, list[rw.Row]] = {}
        for p in prepared:
            if p.error is not None:
                out[p.index] = p.error
                continue
            urls = [u for u in p.urls if u is not None]
            payload = rw.payload(p.dataset.id, p.gk, p.item, p.parts, urls, p.metadata)
            rows.setdefault(p.dataset.id, []).append(rw.Row(p.index, p.item.key, p.gk, payload))
        for done in await asyncio.gather(*(self._import(r) for r in rows.values())):
            for index, result in done:
                out[index] = result
        for b, r in zip(items, out, strict=True):
            if isinstance(r, NoIntegration):  # look the dataset up again once it is fixed
                self._datasets.forget(b.dataset)
        return [r if r is not None else RetriableError("Labelbox: no result") for r in out]

    async def update_metadata(
        self, dataset: str, item: ItemPayload, backend_id: str | None
    ) -> PutResult:
        gk = rw.global_key(dataset, item.key)
        fields = await self._ontology.fields(item.metadata, f"{item.key} (dataset {dataset})")
        try:
            await replace_fields(self._gql, gk, item.key, fields)
        except RowMissing:
            log.info(
                "no Labelbox row for a metadata update; sending the whole item",
                dataset=dataset,
                item=item.key,
            )
            return await self.put_item(dataset, item)
        return PutResult(backend_id=gk, version=1, changed=True)

    async def delete_item(self, dataset: str, path: str, name: str) -> None:
        """The row is looked up by global key (a dataRowsForGlobalKeys job) and deleted;
        a row that is not there is fine."""
        key = item_key(path, name)
        gk = rw.global_key(dataset, key)
        what = f"looking up {key} to delete it"
        data = await self._gql(gq.Q_KEYS_JOB, {"globalKeys": [gk]}, what)
        job_id = str(data["dataRowsForGlobalKeys"]["jobId"])

        async def fetch() -> dict[str, Any]:
            data = await self._gql(gq.Q_KEYS_RESULT, {"jobId": job_id}, what)
            return dict(data["dataRowsForGlobalKeysResult"])

        end = await poll_job(
            fetch,
            lambda r: (rw.task_state(str(r.get("jobStatus") or "")), str(r.get("jobStatus"))),
            what=f"Labelbox global key lookup {job_id}",
            first=self.poll_first,
            most=self.poll_most,
            timeout=self.task_timeout,
        )
        if end.state is not JobState.DONE:
            raise RetriableError(f"Labelbox global key lookup {job_id} ended {end.status}")
        found = end.body.get("data") or {}
        if gk in (found.get("accessDeniedGlobalKeys") or []):
            raise PermanentError(
                f"Labelbox would not let the API key see the row of {key} (global key {gk}); "
                "check the key's role"
            )
        ids = [str(r.get("id") or "") for r in found.get("fetchedDataRows") or []]
        if ids := [i for i in ids if i]:
            await self._gql(gq.M_DELETE_ROWS, {"ids": ids}, f"deleting {key}")

    async def close(self) -> None:
        await self.client.close()

    # --- a group: prepare, upload, import --------------------------------------------

    async def _prepare(
        self, index: int, b: BatchItem, ds: Dataset | SyncError
    ) -> _Prepared | Exception:
        """The item's global key, files and metadata fields; a bad metadata key or an
        unusable URL fails the item before any bytes move."""
        if isinstance(ds, SyncError):
            return ds
        item = b.item
        where = f"{item.key} (dataset {b.dataset})"
        try:
            parts = rw.assets(item)
            urls: list[str | None] = []
            for a in parts:
                f = a.file
                if f.url is None:
                    urls.append(None)
                elif ds.signer is None and rw.needs_integration(f):
                    raise NoIntegration(where, f, ds)
                else:
                    urls.append(rw.fetchable_url(f))
            metadata = await self._ontology.fields(item.metadata, where)
        except SyncError as e:
            return e
        gk = rw.global_key(b.dataset, item.key)
        return _Prepared(index, ds, item, gk, parts, metadata, urls)

    async def _upload_all(self, prepared: Sequence[_Prepared]) -> None:
        """Every local or streamed file of the group, `UPLOADS` at a time across the
        sink; the remaining files of an item that already failed are skipped. Small
        local files are read (and checked) a batch per thread trip, at most
        `READ_AHEAD` batches ahead of their uploads."""
        jobs = [(p, i) for p in prepared for i, u in enumerate(p.urls) if u is None]
        small = [(p, i) for p, i in jobs if _small_local(p.parts[i].file)]
        ahead = asyncio.Semaphore(READ_AHEAD)
        async with asyncio.TaskGroup() as group:
            for p, i in jobs:
                if not _small_local(p.parts[i].file):
                    group.create_task(self._send(p, i, None))
            for batch in chunked(
                small, READ_FILES, READ_BYTES, lambda j: j[0].parts[j[1]].file.size
            ):
                await ahead.acquire()
                files = [p.parts[i].file for p, i in batch]
                datas = await asyncio.to_thread(read_local_many, files)
                group.create_task(self._send_batch(batch, datas, ahead))

    async def _send_batch(
        self,
        batch: list[tuple[_Prepared, int]],
        datas: list[bytes | SyncError],
        ahead: asyncio.Semaphore,
    ) -> None:
        try:
            for (p, _), d in zip(batch, datas, strict=True):
                if isinstance(d, SyncError):
                    p.fail(d)
            await asyncio.gather(
                *(
                    self._send(p, i, d)
                    for (p, i), d in zip(batch, datas, strict=True)
                    if isinstance(d, bytes)
                )
            )
        finally:
            ahead.release()

    async def _send(self, p: _Prepared, i: int, data: bytes | None) -> None:
        async with self._uploads:
            if p.error is not None:
                return
            try:
                p.urls[i] = await self._upload(p.parts[i].file, p.item.key, data)
            except SyncError as e:
                p.fail(e)

    async def _upload(self, f: FilePayload, key: str, data: bytes | None = None) -> str:
        """One file through uploadFile: `data` (already read and checked), a small file
        read whole, or a bigger one streamed and checked on the way."""
        if f.size > rw.DIRECT_UPLOAD_MAX:
            raise PermanentError(
                f"{f.local_path or f.name} is {f.size / 1e6:.0f} MB, over Labelbox's "
                f"{rw.DIRECT_UPLOAD_MAX // 1_000_000} MB limit for uploaded files; put it in "
                "a bucket and register it (transfer: register) instead"
            )
        verified = VerifiedFile(f)
        form = gq.Multipart(rw.upload_name(f.name), rw.content_type(f), f.size)
        body: Callable[[], Any]
        if data is not None or f.size <= READ_WHOLE:
            whole = form.head + (data if data is not None else await verified.read_all())
            whole += form.tail
            body = lambda: whole  # noqa: E731 - the same checked bytes on every attempt
        else:

            async def stream() -> AsyncIterator[bytes]:
                yield form.head
                async for block in verified.body():
                    yield block
                yield form.tail

            body = stream
        what = f"uploading {f.name} of {key}"
        ans = await self.client.request(
            "POST", self.endpoint, what=what, body=body, headers=form.headers
        )
        if verified.error is not None:  # the server answered before the body went wrong
            raise verified.error
        url = gq.uploaded_url(ans, what)
        log.debug("uploaded", item=key, file=f.name, bytes=f.size)
        return url

    async def _upload_doc(self, data: bytes, filename: str, what: str) -> str:
        """A JSON chunk or manifest through uploadFile."""
        form = gq.Multipart(filename, "application/json", len(data))
        whole = form.head + data + form.tail
        ans = await self.client.request(
            "POST", self.endpoint, what=what, body=lambda: whole, headers=form.headers
        )
        return gq.uploaded_url(ans, what)

    async def _import(self, rows: list[rw.Row]) -> list[tuple[int, PutResult | Exception]]:
        """One dataset's rows, in as few import tasks as it takes (one after the other:
        a key that comes twice is put in order): each row's result, by its index."""
        out: list[tuple[int, PutResult | Exception]] = []
        for task in tasks.split(rows):
            try:
                results = await tasks.run_task(
                    self._gql,
                    self._upload_doc,
                    task,
                    first=self.poll_first,
                    most=self.poll_most,
                    timeout=self.task_timeout,
                )
            except SyncError as e:
                results = [e] * len(task)
            out += [(r.index, res) for r, res in zip(task, results, strict=True)]
        return out
