"""The sync step for claimed items: prepare each, send it, and say what became of it.

One item at a time (`sync_one`), or a group of small local items together
(`sync_group`, for a sink with the batch put): one thread hop hashes the group, one
sink call stores it, and each item's outcome is still its own. What to prepare is
prepare.py's, which sink call send.py's, and what a failure means outcome.py's; the
pool (pool.py) claims the items and records the results.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from typing import Any

import structlog

from ingestd.core.errors import Abandoned, SyncError
from ingestd.core.model import ItemPayload, ItemPlan
from ingestd.ledger import Claim, Ledger, LedgerOp, key_conflict_reason
from ingestd.media.transform import transforms
from ingestd.pipeline.outcome import Conflict, Outcome, failed
from ingestd.pipeline.prepare import PART_ITEMS, Preparer, bucket_source_key, register_payload
from ingestd.pipeline.send import Sender, old_place
from ingestd.pipeline.side import WatchSide

log = structlog.get_logger("ingestd.sync")

# Bucket objects of a group whose stat (one request each) runs at once.
REMOTE_STATS_AT_ONCE = 16


class SyncStep:
    def __init__(self, preparer: Preparer, sender: Sender) -> None:
        self.preparer = preparer
        self.sender = sender
        self._big_prep = asyncio.Lock()

    async def sync_one(self, claim: Claim, side: WatchSide) -> tuple[Outcome, LedgerOp]:
        """Do the work for one claim; return its outcome and the ledger op recording it."""
        # Each item runs in its own task: what the sink logs names the watch and item too.
        structlog.contextvars.bind_contextvars(watch=claim.watch, item=claim.key)
        bound = log.bind(watch=claim.watch, item=claim.key)
        now = time.time
        sender = self.sender
        try:
            if claim.plan is None:
                await sender.delete(claim, bound)
                return Outcome(claim, "deleted"), Ledger.op_synced(claim, None, None, now())
            if claim.key_owner is not None:
                raise Conflict(key_conflict_reason(claim.key, claim.source_id, claim.key_owner))
            source_key, digests = await self.preparer.source_key(side, claim.plan)
            synced = claim.synced_manifest
            if unchanged(claim, source_key):
                assert synced is not None
                # touched, or re-planned with identical content: nothing to send
                bound.debug("unchanged content, nothing sent")
                op = Ledger.op_synced(claim, synced, claim.backend_id, now())
                return Outcome(claim, "unchanged"), op
            media = side.media
            spooled = media is not None and any(transforms(s.type, media) for s in claim.plan.slots)
            sink = sender.sink
            if side.source.features.local_paths and not spooled:
                # Local files as they are: nothing to read to prepare them, so the item
                # takes a sink slot only to be sent.
                payload = self.preparer.as_is(side, claim.plan, digests)
                await sender.ensure_dataset(sink, claim.dataset)
                async with sender.slots:
                    result = await sender.send(sink, claim, payload, bound)
            else:
                # Downloads and derived media take room in the spool: only `workers`
                # items make theirs at once, as they are sent.
                spool = self.preparer.spool_for(claim)
                async with sender.slots:
                    try:
                        payload = await self.preparer.payload(
                            side, claim.plan, digests, spool, spooled
                        )
                        await sender.ensure_dataset(sink, claim.dataset)
                        result = await sender.send(sink, claim, payload, bound)
                    finally:
                        if spooled:
                            await asyncio.to_thread(shutil.rmtree, spool, True)
            size = payload_bytes(payload)
            bound.info("synced", version=result.version, bytes=size, changed=result.changed)
            await sender.drop_old_place(sink, claim, side, bound)
            manifest = synced_manifest(payload, source_key, claim.dataset)
            op = Ledger.op_synced(claim, manifest, result.backend_id, now())
            return Outcome(claim, "synced", bytes=size), op
        except (SyncError, Abandoned) as e:
            return self.failed(claim, side, e, bound)

    async def sync_group(
        self, claims: list[Claim], sides: list[WatchSide]
    ) -> tuple[list[tuple[Outcome, LedgerOp | None]], LedgerOp | None]:
        """sync_one for a group of small local items (see pool.groupable). Each
        item's outcome with the op recording it, except that the items the sink took
        are recorded together by the second value."""
        done: list[tuple[Outcome, LedgerOp | None] | None] = [None] * len(claims)
        recorded: list[tuple[Claim, dict[str, Any], str | None]] = []
        spools: list[str] = []
        # A big group spreads its hashing and image checks over every core itself
        # (Preparer, PART_ITEMS): big groups prepare one at a time, so the first is sent
        # while the next prepares, instead of all finishing their CPU work together.
        prep = self._big_prep if len(claims) > PART_ITEMS else contextlib.nullcontext()
        try:
            async with prep:
                todo = await self._group_todo(claims, sides, done)
                send = await self._group_payloads(claims, sides, todo, done, spools)
            if send:
                await self._put_group(claims, sides, send, done, recorded)
        finally:
            if spools:
                await asyncio.to_thread(_remove_all, spools)
        synced = Ledger.op_synced_many(recorded, time.time()) if recorded else None
        return [d for d in done if d is not None], synced

    async def _group_todo(
        self,
        claims: list[Claim],
        sides: list[WatchSide],
        done: list[tuple[Outcome, LedgerOp | None] | None],
    ) -> list[tuple[int, str, list[str]]]:
        """(index, source key, digests) of each item with something to send; the
        outcomes of the unchanged and the unreadable go into `done`."""
        # Bound once: each call on the module's lazy logger builds a logger anew.
        glog = log.bind()
        hashed = await self._group_keys(claims, sides)
        todo: list[tuple[int, str, list[str]]] = []
        for i, (claim, side, h) in enumerate(zip(claims, sides, hashed, strict=True)):
            try:
                if isinstance(h, Exception):
                    raise h
                assert claim.plan is not None
                source_key, digests = h
                synced = claim.synced_manifest
                if unchanged(claim, source_key):
                    assert synced is not None
                    glog.debug("unchanged content, nothing sent", watch=claim.watch, item=claim.key)
                    op = Ledger.op_synced(claim, synced, claim.backend_id, time.time())
                    done[i] = Outcome(claim, "unchanged"), op
                    continue
                todo.append((i, source_key, digests))
            except Exception as e:
                done[i] = self.failed(claim, side, e)
        return todo

    async def _group_payloads(
        self,
        claims: list[Claim],
        sides: list[WatchSide],
        todo: list[tuple[int, str, list[str]]],
        done: list[tuple[Outcome, LedgerOp | None] | None],
        spools: list[str],
    ) -> list[tuple[int, str, ItemPayload]]:
        """(index, source key, payload) of each item to send: local files as they are,
        images checked (and maybe downscaled into their spools) in one trip to the media
        pool, bucket objects as references. An item that cannot be prepared fails alone."""
        send: list[tuple[int, str, ItemPayload]] = []
        checked: list[tuple[int, str, tuple[WatchSide, ItemPlan, list[str], str]]] = []
        remote: list[tuple[int, str]] = []
        for i, source_key, digests in todo:
            side, plan = sides[i], claims[i].plan
            assert plan is not None
            try:
                if not side.source.features.local_paths:  # registered by URL
                    remote.append((i, source_key))
                elif side.media is not None and any(
                    transforms(s.type, side.media) for s in plan.slots
                ):
                    spool = self.preparer.spool_for(claims[i])
                    spools.append(spool)
                    checked.append((i, source_key, (side, plan, digests, spool)))
                else:
                    send.append((i, source_key, self.preparer.as_is(side, plan, digests)))
            except Exception as e:
                done[i] = self.failed(claims[i], side, e)
        if remote:
            # Each reference costs a stat of its object (a request to the bucket): a
            # group's run at once, bounded, not one after another.
            stats = asyncio.Semaphore(REMOTE_STATS_AT_ONCE)

            async def reference(i: int) -> ItemPayload:
                plan = claims[i].plan
                assert plan is not None
                async with stats:
                    return await register_payload(sides[i], plan)

            refs = await asyncio.gather(*(reference(i) for i, _ in remote), return_exceptions=True)
            for (i, source_key), r in zip(remote, refs, strict=True):
                if isinstance(r, Exception):
                    done[i] = self.failed(claims[i], sides[i], r)
                elif isinstance(r, BaseException):  # cancelled: the daemon is stopping
                    raise r
                else:
                    send.append((i, source_key, r))
        if checked:
            built = await self.preparer.checked_many([job for _, _, job in checked])
            for (i, source_key, _), b in zip(checked, built, strict=True):
                if isinstance(b, Exception):
                    done[i] = self.failed(claims[i], sides[i], b)
                else:
                    send.append((i, source_key, b))
        return send

    async def _put_group(
        self,
        claims: list[Claim],
        sides: list[WatchSide],
        send: list[tuple[int, str, ItemPayload]],
        done: list[tuple[Outcome, LedgerOp | None] | None],
        recorded: list[tuple[Claim, dict[str, Any], str | None]],
    ) -> None:
        """One batch put of the prepared items; each item's outcome into `done`, and the
        items the sink took into `recorded` (written in one ledger transaction)."""
        glog = log.bind()
        sender = self.sender
        results = await sender.put_group(sender.sink, [(claims[i], p) for i, _, p in send])
        for (i, source_key, payload), result in zip(send, results, strict=True):
            claim = claims[i]
            if isinstance(result, Exception):
                done[i] = self.failed(claim, sides[i], result)
                continue
            size = payload_bytes(payload)
            glog.info(
                "synced",
                watch=claim.watch,
                item=claim.key,
                version=result.version,
                bytes=size,
                changed=result.changed,
            )
            manifest = synced_manifest(payload, source_key, claim.dataset)
            recorded.append((claim, manifest, result.backend_id))
            done[i] = Outcome(claim, "synced", bytes=size), None

    async def _group_keys(
        self, claims: list[Claim], sides: list[WatchSide]
    ) -> list[tuple[str, list[str]] | Exception]:
        """Each item's source key: local files hashed in one thread hop, registered
        bucket objects keyed by ETag and size (nothing read)."""
        out: list[tuple[str, list[str]] | Exception] = [("", [])] * len(claims)
        local = [i for i, s in enumerate(sides) if s.source.features.local_paths]
        for i, (claim, side) in enumerate(zip(claims, sides, strict=True)):
            if not side.source.features.local_paths:
                assert claim.plan is not None
                out[i] = (bucket_source_key(side, claim.plan, "register"), [])
        if local:
            jobs = [(sides[i], claims[i].plan) for i in local]
            try:
                hashed = await self.preparer.source_keys(jobs)  # type: ignore[arg-type]
            except Exception as e:
                hashed = [e] * len(local)
            for i, h in zip(local, hashed, strict=True):
                out[i] = h
        return out

    def failed(
        self,
        claim: Claim,
        side: WatchSide,
        e: Exception,
        bound: structlog.typing.FilteringBoundLogger | None = None,
    ) -> tuple[Outcome, LedgerOp]:
        """The outcome of an item whose sync step raised `e`, and the op recording it."""
        return failed(
            claim,
            e,
            settle=side.settle,
            sink_reachable=self.sender.reachable(),
            stopping=self.preparer.stop,
            bound=bound,
        )


def _remove_all(folders: list[str]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def unchanged(claim: Claim, source_key: str) -> bool:
    """The sink already holds exactly this, at this place: nothing to send."""
    synced = claim.synced_manifest
    return (
        synced is not None and synced.get("source_key") == source_key and old_place(claim) is None
    )


def synced_manifest(payload: ItemPayload, source_key: str, dataset: str) -> dict[str, Any]:
    """What the ledger records of a synced item: its content identity, the key of what
    it was made from, and where it went (to tell when an edit moves it)."""
    return {**payload.manifest(), "source_key": source_key, "dataset": dataset}


def payload_bytes(payload: ItemPayload) -> int:
    """The bytes an item moves (registered objects move none)."""
    return sum(f.size for s in payload.slots for f in s.files if not f.is_remote)
