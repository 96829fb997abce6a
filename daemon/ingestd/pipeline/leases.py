"""The leases of the items this daemon has in flight, with a shared ledger.

A claim in PostgreSQL is a lease (`Ledger.due`): the item is this daemon's until
`lease` seconds after the claim, and the pool renews it every third of that while the
item is in flight. A daemon that stalls longer than its lease (a paused VM, a starved
CPU, its ledger server unreachable) may find the item claimed by another daemon when it
wakes, and the other sends it too. Two rules keep that from turning into a second
upload:

- **The fence.** Right before a sink call the sender asks `fence` whether the items are
  still ours. Each key's lease is known here as a local deadline (monotonic, measured
  from before the claim or renewal was sent, so it is never later than the ledger's).
  While more than half of it is left the answer is immediate: no round trip on the
  normal path, where renewals come every third. Otherwise the keys are renewed then and
  there, and those the renewal did not keep are lost: the sender drops them (LeaseLost,
  an abandoned outcome whose op is a no-op, since outcome ops apply only while the
  claim is held).
- **Lost in flight.** A renewal that no longer holds a key (another daemon has it)
  calls `on_lost`: the pool cancels an upload of that item alone that is under way.

What is left is a stall in the middle of an upload itself, longer than the lease: the
other daemon starts while this one's upload is suspended, and the renewal after the
stall cancels this one's, which may still have completed a moment before.
docs/multi-daemon.md says so: a lease must outlast the longest stall.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence

import structlog

from ingestd.ledger import AsyncLedger, Claim

Key = tuple[str, str]  # (watch, source_id)

log = structlog.get_logger("ingestd.leases")


class Leases:
    def __init__(self, ledger: AsyncLedger, on_lost: Callable[[set[Key]], None]) -> None:
        self.ledger = ledger
        self.shared = bool(ledger.shared)
        self.lease = float(ledger.at.lease) if self.shared else 0.0
        self._on_lost = on_lost
        self._until: dict[Key, float] = {}  # key -> local deadline (monotonic)
        self._names: dict[Key, str] = {}  # key -> item key, for the log
        self._lost: set[Key] = set()  # in flight still, another daemon's now

    def claimed(self, claims: Iterable[Claim], asked_at: float) -> None:
        """`claims` were made by a call sent at `asked_at` (time.monotonic())."""
        if self.shared:
            for c in claims:
                k = (c.watch, c.source_id)
                self._until[k] = asked_at + self.lease
                self._names[k] = c.key
                self._lost.discard(k)

    def done(self, key: Key) -> None:
        self._until.pop(key, None)
        self._names.pop(key, None)
        self._lost.discard(key)

    async def run(self) -> None:
        """Renew the leases of the items in flight every third of the lease (until
        cancelled; only with a shared ledger)."""
        while True:
            await asyncio.sleep(self.lease / 3)
            keys = list(self._until)
            if keys:
                try:
                    await self._renew(keys)
                except Exception:  # a lost server is the ledger's problem; the fence waits
                    log.debug("renewing leases failed", items=len(keys))

    async def fence(self, keys: Sequence[Key]) -> set[Key]:
        """Of `keys` about to be sent, those no longer this daemon's. A renewal that
        fails (the ledger's server unreachable) loses the keys whose lease it could not
        confirm: sending them might send them twice."""
        if not self.shared:
            return set()
        lost = {k for k in keys if k in self._lost}
        now = time.monotonic()
        near = [k for k in keys if k not in lost and self._until.get(k, 0.0) - now < self.lease / 2]
        if not near:
            return lost
        try:
            return lost | await self._renew(near)
        except Exception:
            log.warning(
                "cannot confirm the lease of items about to be sent; leaving them for later",
                items=len(near),
            )
            return lost | set(near)

    async def _renew(self, keys: list[Key]) -> set[Key]:
        asked_at = time.monotonic()
        held = await self.ledger.call(self.ledger.sync.renew, keys)
        lost: set[Key] = set()
        for k in keys:
            if k not in self._until:
                continue  # finished meanwhile, or lost already
            if k in held:
                self._until[k] = asked_at + self.lease
            else:
                lost.add(k)
                del self._until[k]  # not renewed again
        if lost:
            self._lost |= lost
            for k in sorted(lost):
                log.warning(
                    "lease lost: another daemon took this item after this one stalled"
                    " past its lease; leaving it to that daemon",
                    watch=k[0],
                    item=self._names.get(k, k[1]),
                    lease=self.lease,
                )
            self._on_lost(lost)
        return lost
