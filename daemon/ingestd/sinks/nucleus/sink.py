"""The `nucleus` sink: items go to a Scale Nucleus dataset (docs/platforms.md).

A thin sink on the shared parts (sinks/kit): the ApiClient with Nucleus's retry rule
and its key as HTTP Basic auth (never logged), the DatasetCache (datasets found by name
or created once), and the Appender (appends.py), which sends images as the current SDK
does and waits for their jobs. How items become Nucleus images is items.py; the
requests themselves are api.py.

- Groups from the backlog (capabilities.batch) go as few appends as Nucleus allows:
  10 local files a request, all remote URLs of a group in one import, the group's jobs
  awaited together.
- Everything is sent with `update: true` keyed by `reference_id`: a re-send (a change,
  or a redo after a restart mid-upload) replaces the image and its metadata, never
  duplicates it.
- A metadata-only change uses the metadata endpoint, which merges; when keys were
  removed it cannot drop them, so the item is appended again (update: true replaces the
  metadata entirely), which also re-sends its bytes.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any
from urllib.parse import quote

import structlog

from ingestd.config import NucleusBackend
from ingestd.core.errors import RetriableError, SyncError
from ingestd.core.model import ItemPayload, item_key
from ingestd.sinks.base import (
    BatchItem,
    BatchLimits,
    Capabilities,
    Manifest,
    PutResult,
    SinkBase,
)
from ingestd.sinks.kit.client import ApiClient
from ingestd.sinks.kit.datasets import DatasetCache
from ingestd.sinks.kit.errors import worst
from ingestd.sinks.nucleus import api
from ingestd.sinks.nucleus.api import NAME, DatasetGone, NucleusRejected
from ingestd.sinks.nucleus.appends import Appender
from ingestd.sinks.nucleus.items import META_PARTS, RESERVED_KEYS, MetadataTypes, Part, parts_of

log = structlog.get_logger("ingestd.sink.nucleus")

# One group: 50 appends of local files (the SDK splits any number into requests of 10)
# or half a remote import's 1,000 items; files over 1 MiB go alone through put_item.
BATCH = BatchLimits(items=500, bytes=256 << 20, linger=0.05, small=1 << 20)
UPLOAD_SLOTS = 16  # append requests in flight across the sink (the SDK sends 10 at once)


class NucleusSink(SinkBase):
    capabilities = Capabilities(remote_urls=True, metadata_update=True, delete=True, batch=BATCH)

    def __init__(self, backend: NucleusBackend, workers: int = 8) -> None:
        key = backend.api_key()
        self.base = (backend.base_url or api.DEFAULT_BASE_URL).rstrip("/")
        if backend.api_key_file is not None:
            hint = f"backend.api_key_file {backend.api_key_file}"
        else:
            hint = f"the {backend.api_key_env} environment variable (backend.api_key_env)"
        token = base64.b64encode(f"{key}:".encode()).decode("ascii")
        self.client = ApiClient(
            NAME,
            {"Authorization": f"Basic {token}"},
            per_minute=backend.requests_per_minute or api.DEFAULT_REQUESTS_PER_MINUTE,
            key_hint=hint,
            rule=api.rule,
            reject=api.rejection(hint),
            connections=max(UPLOAD_SLOTS, workers + 2),
        )
        self.workers = max(1, workers)
        self.datasets: DatasetCache[str] = DatasetCache(self._find_or_create)
        self.types = MetadataTypes()
        self.appender = Appender(self.client, self._url, slots=UPLOAD_SLOTS)
        self._splits = asyncio.Semaphore(self.workers)

    def __repr__(self) -> str:  # never the key
        return f"NucleusSink({self.base!r})"

    # --- the Sink interface ------------------------------------------------------------

    async def ensure_dataset(self, dataset: str) -> None:
        await self.datasets.get(dataset)

    async def put_item(
        self, dataset: str, item: ItemPayload, previous: Manifest | None = None
    ) -> PutResult:
        (result,) = await self.put_items([BatchItem(dataset, item, previous)])
        if isinstance(result, Exception):
            raise result
        return result

    async def put_items(self, items: Sequence[BatchItem]) -> list[PutResult | Exception]:
        """Plain images of a dataset go in shared appends; split items (slots, frames)
        each on their own, anchor first. `previous` changes nothing: every append is an
        upsert by reference_id, so no item needs a lookup first."""
        results: list[PutResult | Exception | None] = [None] * len(items)
        plain: dict[str, list[tuple[int, Part]]] = {}
        calls: list[Coroutine[Any, Any, None]] = []
        for i, b in enumerate(items):
            try:
                parts, split = parts_of(b.item)
                self.types.check(b.dataset, b.item.key, [p.metadata for p in parts])
            except SyncError as e:
                results[i] = e
                continue
            if split:
                calls.append(self._put_split(i, b.dataset, b.item, parts, results))
            else:
                plain.setdefault(b.dataset, []).append((i, parts[0]))
        calls += [self._put_plain(d, group, results) for d, group in plain.items()]
        await asyncio.gather(*calls)
        return [r if r is not None else RetriableError(f"{NAME}: not sent") for r in results]

    async def update_metadata(
        self, dataset: str, item: ItemPayload, backend_id: str | None
    ) -> PutResult:
        """Change only metadata. The endpoint merges, so it is used when keys were only
        added or changed: the new values go to the item's image and every part its
        anchor records (read from Nucleus, so the payload's files are not needed).
        When a key was removed the item is appended again, which replaces its metadata
        entirely (and re-sends its bytes): that needs the payload put_item takes."""
        ds = await self.datasets.get(dataset)
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
        self.types.check(dataset, item.key, [metadata])
        await self._merge_metadata(dataset, ds, [(r, metadata) for r in refs], item.key)
        return PutResult(backend_id=item.key, version=1, changed=True)

    async def delete_item(self, dataset: str, path: str, name: str) -> None:
        ds = self.datasets.peek(dataset) or await self._find(dataset)
        if ds is None:
            return  # no such dataset: nothing to delete
        key = item_key(path, name)
        parts = await self._recorded_parts(ds, key)
        await self._delete_refs(ds, [*parts, key])

    async def close(self) -> None:
        await self.client.close()

    # --- sending -----------------------------------------------------------------------

    async def _put_plain(
        self, dataset: str, group: list[tuple[int, Part]], results: list[Any]
    ) -> None:
        try:
            ds = await self.datasets.get(dataset)
            failed = await self.appender.send(ds, [p for _, p in group])
        except Exception as e:  # the dataset could not be had: every image hears why
            for i, _ in group:
                results[i] = e
            return
        self._forget_if_gone(dataset, failed.values())
        for i, p in group:
            results[i] = failed.get(p) or PutResult(
                backend_id=p.reference_id, version=1, changed=True
            )

    async def _put_split(
        self, i: int, dataset: str, item: ItemPayload, parts: list[Part], results: list[Any]
    ) -> None:
        """The anchor goes first and lists every part that may exist (old and new), so
        an interruption anywhere leaves a record from which the next put or a delete
        finds them all; parts the item no longer has are deleted last."""
        try:
            async with self._splits:
                ds = await self.datasets.get(dataset)
                anchor, others = parts[0], parts[1:]
                new = [p.reference_id for p in others]
                old = await self._recorded_parts(ds, item.key)
                stale = [r for r in old if r not in set(new) and r != item.key]
                anchor.metadata[META_PARTS] = new + stale
                await self._send(dataset, ds, [anchor])
                await self._send(dataset, ds, others)
                if stale:
                    await self._delete_refs(ds, stale)
                    await self._merge_metadata(
                        dataset, ds, [(item.key, {META_PARTS: new})], item.key
                    )
                    log.debug(
                        "removed stale parts", dataset=dataset, item=item.key, parts=len(stale)
                    )
            results[i] = PutResult(backend_id=item.key, version=1, changed=True)
        except Exception as e:
            results[i] = e

    async def _send(self, dataset: str, ds: str, parts: list[Part]) -> None:
        failed = await self.appender.send(ds, parts)
        self._forget_if_gone(dataset, failed.values())
        err = worst(failed.values())
        if err is not None:
            raise err

    def _forget_if_gone(self, dataset: str, errors: Iterable[Exception]) -> None:
        if any(isinstance(e, DatasetGone) for e in errors):
            log.warning("dataset no longer exists in Nucleus", dataset=dataset)
            self.datasets.forget(dataset)

    # --- datasets ----------------------------------------------------------------------

    def _url(self, *segments: str) -> str:
        return "/".join([self.base, *segments])

    async def _find(self, name: str) -> str | None:
        ans = await self.client.request(
            "GET", self._url("dataset", "details"), what="listing datasets"
        )
        try:
            return api.dataset_id_named(ans.json(), name)
        except ValueError as e:
            raise RetriableError(f"{NAME} listing datasets: unexpected answer {ans.text()}") from e

    async def _find_or_create(self, name: str) -> str:
        found = await self._find(name)
        if found is not None:
            return found
        ans = await self.client.request(
            "POST",
            self._url("dataset", "create"),
            what=f"creating dataset {name!r}",
            json_body=api.create_dataset_body(name),
        )
        body = ans.json()
        ds = body.get("dataset_id") if isinstance(body, dict) else None
        if not ds:
            raise RetriableError(f"{NAME} creating dataset {name!r}: no dataset_id in {ans.text()}")
        log.info("created dataset", backend="nucleus", dataset=name, id=ds)
        return str(ds)

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
        md = current.get("metadata") if current is not None else None
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
        err = worst(r for r in results if isinstance(r, BaseException))
        if err is not None:
            raise err

    async def _merge_metadata(
        self, dataset: str, ds: str, entries: list[tuple[str, dict[str, Any]]], key: str
    ) -> None:
        """The metadata merge as the SDK sends it (synchronous: `?async=0`)."""
        for i in range(0, len(entries), api.METADATA_BATCH):
            try:
                await self.client.request(
                    "POST",
                    self._url("dataset", ds, "metadata"),
                    what=f"updating the metadata of {key}",
                    params={"async": "0"},
                    json_body=api.metadata_body(entries[i : i + api.METADATA_BATCH]),
                )
            except NucleusRejected as e:
                if e.status == 404:
                    self._forget_if_gone(dataset, [DatasetGone(e.reason)])
                    raise DatasetGone(f"{NAME} dataset {ds} no longer exists; sent again") from e
                raise
