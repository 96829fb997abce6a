"""Payload → the sink call its features allow: a put, a batch put, an in-place metadata
update, a delete, and the delete of an item's old place after an edit moved it.

The sink can be replaced while items are in flight (a reload that switched backends):
each item goes to the sink it was handed, new work to the new one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, cast

import structlog

from ingestd.core.errors import LeaseLost, SyncError
from ingestd.core.model import ItemPayload, item_key
from ingestd.ledger import Claim
from ingestd.pipeline.side import Transfer, WatchSide
from ingestd.sinks.base import BatchItem, BatchLimits, BatchPutter, MetadataUpdater, PutResult, Sink

# Of the (watch, source_id) keys about to be sent, those no longer this daemon's (a
# shared ledger's lease lost while it stalled: pipeline/leases.py).
Fence = Callable[[Sequence[tuple[str, str]]], Awaitable[set[tuple[str, str]]]]

log = structlog.get_logger("ingestd.sync")


class Sender:
    """Calls into the sink. `slots` bounds the calls at once (the pool's `workers`);
    the caller holds one around `send`, the other calls take their own."""

    def __init__(
        self,
        sink: Sink,
        slots: AbstractAsyncContextManager[None],
        fence: Fence | None = None,
    ) -> None:
        self.sink = sink
        self.slots = slots
        self.fence = fence
        self._datasets_ready: set[str] = set()
        self._dataset_lock = asyncio.Lock()

    def replace(self, sink: Sink) -> Sink:
        """Send new work to `sink` from now on; returns the old one."""
        old, self.sink = self.sink, sink
        self._datasets_ready.clear()
        return old

    def batches(self) -> BatchLimits | None:
        """How big a group the sink takes in one batch put (None: it takes none)."""
        return self.sink.capabilities.batch

    def reachable(self) -> bool:
        """False while the sink reports an outage it has already logged."""
        return self.sink.reachable

    def transfer(self, side: WatchSide) -> Transfer:
        """How the items of a source without local paths move: as configured, else by
        what the sink and the source can do (asked per item, so a reload that switches
        the backend switches this too)."""
        if side.transfer is not None:
            return side.transfer
        registrable = self.sink.capabilities.remote_urls and side.source.features.urls
        return "register" if registrable else "copy"

    async def ensure_dataset(self, sink: Sink, dataset: str) -> None:
        """Once per dataset and sink (one call at a time: the first items of a new
        dataset all arrive together)."""
        if dataset in self._datasets_ready:
            return
        async with self._dataset_lock:
            if dataset in self._datasets_ready:
                return
            await sink.ensure_dataset(dataset)
            if sink is self.sink:
                self._datasets_ready.add(dataset)

    async def send(
        self,
        sink: Sink,
        claim: Claim,
        payload: ItemPayload,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> PutResult:
        """One item to `sink` (the caller holds a sink slot)."""
        await self._fenced(claim)
        # An item an edit moved is new where it goes: no update in place, and what the
        # old place held says nothing about the new one.
        synced = _previous(claim)
        if _updates_metadata(sink, synced, payload):
            # Same bytes, new metadata (e.g. a sidecar edit): no re-upload.
            result = await cast(MetadataUpdater, sink).update_metadata(
                claim.dataset, payload, claim.backend_id
            )
            bound.info("metadata updated in place")
            return result
        return await sink.put_item(claim.dataset, payload, previous=synced)

    async def put_group(
        self, sink: Sink, items: list[tuple[Claim, ItemPayload]]
    ) -> list[PutResult | Exception]:
        """Send prepared items: as one batch put, except metadata-only changes (an
        in-place update each). Each item's result or error, in order."""
        out: list[PutResult | Exception | None] = [None] * len(items)
        whole: list[int] = []
        try:
            for dataset in {claim.dataset for claim, _ in items}:
                await self.ensure_dataset(sink, dataset)
        except Exception as e:
            return [e] * len(items)
        for i, (claim, payload) in enumerate(items):
            if _updates_metadata(sink, claim.synced_manifest, payload):
                try:
                    async with self.slots:
                        bound = log.bind(watch=claim.watch, item=claim.key)
                        out[i] = await self.send(sink, claim, payload, bound)
                except Exception as e:
                    out[i] = e
            else:
                whole.append(i)
        if whole and self.fence is not None:
            lost = await self.fence([(items[i][0].watch, items[i][0].source_id) for i in whole])
            for i in whole:
                if (items[i][0].watch, items[i][0].source_id) in lost:
                    out[i] = LeaseLost(items[i][0].key)
            whole = [i for i in whole if out[i] is None]
        if whole:
            batch = [
                BatchItem(items[i][0].dataset, items[i][1], _previous(items[i][0])) for i in whole
            ]
            try:
                async with self.slots:  # a group is one sink call
                    results = await cast(BatchPutter, sink).put_items(batch)
            except Exception as e:  # the whole call failed: each item hears why
                results = [e] * len(whole)
            for i, r in zip(whole, results, strict=True):
                out[i] = r
        return [r for r in out if r is not None]

    async def drop_old_place(
        self,
        sink: Sink,
        claim: Claim,
        side: WatchSide,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> None:
        """An edit moved the item (dataset, path or name): with on_delete: delete, the
        item at its old place goes now that the new one is in. A failure leaves it there
        and says so; the item itself is synced."""
        old = old_place(claim)
        if old is None or side.on_delete != "delete" or not sink.capabilities.delete:
            return
        dataset, path, name = old
        try:
            async with self.slots:
                await sink.delete_item(dataset, path, name)
        except SyncError as e:
            bound.warning(
                "the item moved; its old copy could not be deleted, delete it by hand",
                old_dataset=dataset,
                old_key=item_key(path, name),
                reason=e.reason,
            )
            return
        bound.info(
            "the item moved; deleted its old copy (on_delete: delete)",
            old_dataset=dataset,
            old_key=item_key(path, name),
        )

    async def delete(self, claim: Claim, bound: structlog.typing.FilteringBoundLogger) -> None:
        """The item's source is gone (on_delete: delete planned its removal)."""
        m = claim.synced_manifest
        sink = self.sink
        if m is not None and sink.capabilities.delete:
            await self._fenced(claim)
            async with self.slots:
                await sink.delete_item(m.get("dataset", claim.dataset), m["path"], m["name"])
            bound.info("deleted from the dataset (on_delete: delete)")

    async def _fenced(self, claim: Claim) -> None:
        """Raise LeaseLost when the item is no longer this daemon's to send."""
        if self.fence is not None and await self.fence([(claim.watch, claim.source_id)]):
            raise LeaseLost(claim.key)


def old_place(claim: Claim) -> tuple[str, str, str] | None:
    """(dataset, path, name) the item was synced to, when an edit has moved it since
    (manifests recorded before datasets were recorded count as the same dataset)."""
    m = claim.synced_manifest
    if m is None or claim.plan is None or "path" not in m:
        return None
    old = (str(m.get("dataset", claim.dataset)), str(m["path"]), str(m["name"]))
    return None if old == (claim.dataset, claim.plan.path, claim.plan.name) else old


def _previous(claim: Claim) -> Mapping[str, Any] | None:
    """What the sink was last given for the item at its place (None once an edit moved
    it: the new place holds nothing yet)."""
    return claim.synced_manifest if old_place(claim) is None else None


def _metadata_only(synced: Mapping[str, Any] | None, payload: ItemPayload) -> bool:
    """The item the sink holds differs from `payload` in its metadata alone."""
    if synced is None:
        return False
    now = payload.manifest()
    return (
        all(synced.get(k) == now[k] for k in ("path", "name", "slots"))
        and synced.get("metadata") != now["metadata"]
    )


def _updates_metadata(sink: Sink, synced: Mapping[str, Any] | None, payload: ItemPayload) -> bool:
    """The item goes as an in-place metadata update (sinks that can do one)."""
    return (
        synced is not None and sink.capabilities.metadata_update and _metadata_only(synced, payload)
    )
