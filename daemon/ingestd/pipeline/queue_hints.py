"""Hints from a bucket's event queue (Features.queue): recorded, looked at, settled, planned.

The order keeps every hint through a crash: the feed (sources/queues) hands a batch's
hints to `record`, which commits them to the ledger's `hints` table; only then does the
feed delete the messages. At start every live row of the watch is taken again. A row is
marked done once its key is planned or judged gone, unless a newer message named the
key meanwhile; done rows are kept a while (ledger/hints.py) as the record of what the
queue named.

Settling a hinted object: it is looked at (HEAD) when the hint arrives; it is ready when
its last-modified is at least `settle` ago, or when a second look `settle` after the
first finds the same ETag and size. The event's own ETag and size are not trusted for
the plan: messages come late, twice and out of order, and what is planned must be what
the bucket holds now. A key found gone joins the runner's deletions, judged in batches
once none arrived for `settle` (so the `max_delete` guard sees a mass deletion whole).

A key found gone is HEADed once more just before the batch is applied: a message may
have named it again meanwhile (deleted and written again), and a plan recorded from
that must not be undone by the older judgement.

With a shared ledger every daemon consumes the watch's queue, so one key's messages may
reach different daemons. Each daemon looks at the rows it recorded; a row's stamp is
raised by every recording (ledger/hints.py), so a daemon drops only what no later
message named. Rows left by a daemon that died are taken by the others once older than
ADOPT_AGE (or by any daemon's start). A plan recorded from an older look can land after
a newer one (two daemons, two messages): the sync step then finds the object changed
under it (its ETag no longer matches) and `look_again` HEADs the key, which plans what
the bucket holds now; no listing is needed.

A full listing still runs every `poll_interval` (1 h by default with a queue) and at
start: it repairs anything a message never named, and it is how a queue that does not
receive the bucket's events is noticed (QueueJudge: `listed`, `pass_done`, `run`).
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ingestd.core.model import Entry
from ingestd.core.source import SourceError
from ingestd.ledger import (
    Ledger,
    op_clear_queue_problem,
    op_drop_hint,
    op_hinted,
    op_note_hints,
    op_take_hints,
)
from ingestd.ledger.hints import CLEAN_BATCH, DONE_KEEP, op_clean_hints
from ingestd.pipeline.work import PlanWork
from ingestd.sources.queues import Hint

if TYPE_CHECKING:
    from ingestd.pipeline.runner import WatchRunner

LOOKS_AT_ONCE = 16  # HEADs in flight per watch
LOOK_BATCH = 256  # keys looked at per round
RETRY_LOOK = 5.0  # seconds before a key whose HEAD failed is looked at again
# A bucket sends an object's event within this of writing it (S3: usually in a second).
# It is also how long a receiver has to record a batch before its keys count as unnamed
# (the SQS default visibility timeout: a receiver that died with a batch has it back on
# the queue by then, for another to record).
UNANNOUNCED_GRACE = 30.0
RECENT_KEYS = 200_000  # keys named by messages, remembered to judge the listing
JUDGE_EVERY = 5.0  # seconds between looks at the listing's suspects
# Suspects are checked against the hint rows at least this often while they wait, far
# more often than done rows are kept (DONE_KEEP), so no naming can slip between checks.
CHECK_EVERY = 60.0
assert CHECK_EVERY * 5 <= DONE_KEEP
# Rows noted longer ago than this that this daemon does not hold are taken and looked
# at: their recorder died (or could not drop them). Several leases, so that a live
# daemon's backlog is not looked at twice; at least a minute.
ADOPT_MIN_AGE = 60.0
ADOPT_LEASES = 3


class QueueHints:
    def __init__(self, runner: WatchRunner) -> None:
        self.runner = runner
        self.feed = runner.source.hint_feed()
        self.log = runner.log.bind(queue=self.feed.url)
        self.settle = runner.watch.settle
        self.noted: dict[str, int] = {}  # key -> stamp of the hint being looked at
        self.first_look: dict[str, tuple[Entry, float]] = {}  # key -> (entry, seen at)
        self._heap: list[tuple[float, str]] = []
        self._wake = asyncio.Event()
        self._stamp = 0
        self._gone: dict[str, int] = {}  # key -> stamp, judged with the runner's deletions
        self._gone_at = 0.0  # when the last key was found gone (monotonic)
        lease = float(getattr(getattr(runner.ledger, "at", None), "lease", 0.0) or 0.0)
        self.adopt_age = max(ADOPT_MIN_AGE, ADOPT_LEASES * lease)
        self.judge = QueueJudge(self)

    def tasks(self) -> list[asyncio.Task[Any]]:
        name = self.runner.watch.name
        return [
            asyncio.create_task(self._load(), name=f"hints-load:{name}"),
            asyncio.create_task(self.feed.run(self.record, self.report), name=f"queue:{name}"),
            asyncio.create_task(self._look_loop(), name=f"hints:{name}"),
            asyncio.create_task(self._gone_loop(), name=f"hints-gone:{name}"),
            asyncio.create_task(self._adopt_loop(), name=f"hints-adopt:{name}"),
            asyncio.create_task(self.judge.run(), name=f"queue-judge:{name}"),
        ]

    def __len__(self) -> int:
        return len(self.noted)

    def listed(self, changed: list[Entry]) -> None:
        self.judge.listed(changed)

    async def pass_done(self, *, complete: bool) -> None:
        await self.judge.pass_done(complete=complete)

    # -- from the feed ------------------------------------------------------------------

    async def record(self, hints: list[Hint]) -> None:
        """Commit `hints` to the ledger (the feed deletes their messages after this),
        then look at them. Waits while the ledger cannot be written."""
        r = self.runner
        stamp = self._next_stamp()
        rows = [(h.relpath, h.kind, h.etag, h.size, h.event_time) for h in hints]
        while True:
            try:
                # The stamps as recorded: another daemon may have noted a key later.
                stamps = await r.ledger.write(op_note_hints(r.watch.name, rows, stamp))
                break
            except Exception as e:
                if not r.ledger.is_unwritable(e):
                    raise
                await r.ledger.wait_writable()
        for h in hints:
            self.judge.named(h.relpath)
            self._note(h.relpath, stamps.get(h.relpath, stamp))
            self.log.debug("queue hint", item=h.relpath, kind=h.kind)

    async def report(self, problem: str | None) -> None:
        r = self.runner
        now = time.time()
        try:
            if problem is not None:
                await r.ledger.write(Ledger.op_set_problem(r.watch.name, problem, now))
            else:
                await r.ledger.write(op_clear_queue_problem(r.watch.name, now))
        except Exception:  # the ledger's own problem is shown; the feed retries anyway
            self.log.debug("cannot record the queue's problem")

    def look_again(self, relpaths: Sequence[str]) -> None:
        """The sync step found these objects changed under it (a plan from an older
        look): HEAD them again. Stamp 0 drops no row: only a message's look does."""
        for rel in relpaths:
            if rel not in self.noted:
                self._note(rel, 0)

    async def _load(self, noted_before: int | None = None) -> int:
        """Hints recorded before a crash or a stop (or, with `noted_before`, left by
        another daemon): look at those this daemon does not hold."""
        r = self.runner
        after: str | None = None
        taken = 0
        while True:
            try:
                op = op_take_hints(r.watch.name, after, noted_before=noted_before)
                rows = await r.ledger.write(op)
            except Exception as e:
                if not r.ledger.is_unwritable(e):
                    raise
                await r.ledger.wait_writable()
                continue
            if not rows:
                break
            for row in rows:
                if row.relpath not in self.noted:
                    self._note(row.relpath, row.noted)
                    taken += 1
            after = rows[-1].relpath
        if taken and noted_before is None:
            self.log.info("hints recorded before the start taken again", hints=taken)
        return taken

    async def _adopt_loop(self) -> None:
        # Rows whose recorder died hold keys no message will name again; done rows past
        # DONE_KEEP are cleaned on the same round, by every daemon running the watch.
        while True:
            await asyncio.sleep(self.adopt_age / 2)
            cutoff = time.time_ns() - int(self.adopt_age * 1e9)
            try:
                taken = await self._load(noted_before=cutoff)
                await self._clean()
            except Exception:  # the ledger's own problem is shown; try again next round
                self.log.debug("cannot read or clean old hint rows")
                continue
            if taken:
                self.log.info(
                    "old hint rows taken (recorded by a daemon that stopped)", hints=taken
                )

    async def _clean(self) -> None:
        r = self.runner
        before = time.time() - DONE_KEEP
        while await r.ledger.write(op_clean_hints(r.watch.name, before)) >= CLEAN_BATCH:
            await asyncio.sleep(0)  # a batch per commit: the writers in between go on

    def _next_stamp(self) -> int:
        self._stamp = max(self._stamp + 1, time.time_ns())
        return self._stamp

    def _note(self, relpath: str, stamp: int) -> None:
        if self.noted.get(relpath, -1) >= stamp:
            return
        self.noted[relpath] = stamp
        self.first_look.pop(relpath, None)  # a new version may have come: look afresh
        self._push(relpath, time.monotonic())

    def _push(self, relpath: str, due: float) -> None:
        heapq.heappush(self._heap, (due, relpath))
        self._wake.set()

    # -- looking ------------------------------------------------------------------------

    async def _look_loop(self) -> None:
        while True:
            await self._wait_due()
            now = time.monotonic()
            batch: list[str] = []
            while self._heap and self._heap[0][0] <= now and len(batch) < LOOK_BATCH:
                _, rel = heapq.heappop(self._heap)
                if rel in self.noted and rel not in batch:
                    batch.append(rel)
            if batch:
                await self._look(batch)

    async def _wait_due(self) -> None:
        while True:
            while self._heap and self._heap[0][1] not in self.noted:
                heapq.heappop(self._heap)  # planned or gone since
            delay = self._heap[0][0] - time.monotonic() if self._heap else None
            if delay is not None and delay <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                return

    async def _look(self, batch: list[str]) -> None:
        r = self.runner
        limit = asyncio.Semaphore(LOOKS_AT_ONCE)
        stamps = {rel: self.noted[rel] for rel in batch}

        async def stat(rel: str) -> Entry | SourceError | None:
            async with limit:
                try:
                    return await r.source.stat(rel)
                except SourceError as e:
                    return e

        looks = await asyncio.gather(*(stat(rel) for rel in batch))
        ready: list[Entry] = []
        done: list[str] = []  # dropped without planning: not the watch's, or not usable
        now_wall, now = time.time(), time.monotonic()
        for rel, look in zip(batch, looks, strict=True):
            if isinstance(look, SourceError):
                self.log.warning("cannot look at a hinted object", item=rel, error=look.message)
                self._push(rel, now + RETRY_LOOK)
            elif not r.takes.accepts(rel):
                done.append(rel)
            elif look is None:
                self._gone[rel] = stamps[rel]
                self._gone_at = now
            elif self._settled(rel, look, now_wall, now):
                ready.append(look)
        if ready:
            await self._plan(ready, stamps)
        for rel in done:
            await self._drop(rel, stamps[rel])

    def _settled(self, rel: str, entry: Entry, now_wall: float, now: float) -> bool:
        """Ready now, or looked at again later (scheduled here)."""
        age = now_wall - entry.mtime_ns / 1e9
        first = self.first_look.get(rel)
        if age >= self.settle or (
            first is not None
            and (first[0].size, first[0].etag) == (entry.size, entry.etag)
            and now - first[1] >= self.settle
        ):
            self.first_look.pop(rel, None)
            return True
        if first is None or (first[0].size, first[0].etag) != (entry.size, entry.etag):
            self.first_look[rel] = (entry, now)
            first = self.first_look[rel]
        # Whichever comes first: old enough by its clock, or `settle` after our look.
        due = min(now + self.settle - age, first[1] + self.settle)
        self._push(rel, max(due, now + 0.05))
        return False

    async def _plan(self, ready: list[Entry], stamps: dict[str, int]) -> None:
        r = self.runner
        try:
            await r.plans.plan(PlanWork(entries=ready))
        except SourceError as e:  # a header read failed: look again soon
            self.log.warning("planning hinted objects failed; looking again", error=e.message)
            now = time.monotonic()
            for e2 in ready:
                self._push(e2.relpath, now + RETRY_LOOK)
            return
        for e in ready:
            await self._drop(e.relpath, stamps[e.relpath])

    async def _drop(self, rel: str, stamp: int) -> None:
        """The hint was acted on: forget it and mark its row done (kept a while as the
        record that the queue named the key), unless a newer one came meanwhile."""
        r = self.runner
        if self.noted.get(rel) == stamp:
            del self.noted[rel]
            self.first_look.pop(rel, None)
        if stamp <= 0:
            return  # a look the sync step asked for: no row of its own
        try:
            await r.ledger.write(op_drop_hint(r.watch.name, rel, stamp))
        except Exception:  # kept: taken again at the next start, harmlessly
            self.log.debug("cannot drop a hint row", item=rel)

    async def _gone_loop(self) -> None:
        # Deletions are judged in batches closed by `settle` without a new one, as
        # inotify's are (pipeline/events.py): one guard decision per mass deletion.
        r = self.runner
        quiet = max(self.settle, 0.5)
        while True:
            await asyncio.sleep(quiet / 2)
            if not self._gone or time.monotonic() - self._gone_at < quiet:
                continue
            if time.monotonic() - r.gone_at < quiet:
                continue
            gone, self._gone = self._gone, {}
            back = await self._still_there(list(gone))
            for rel in back:
                if self.noted.get(rel) == gone[rel]:
                    self._push(rel, time.monotonic())  # written again: look at it afresh
                del gone[rel]
            if gone:
                r._on_gone(list(gone))
                try:
                    await r.apply_gone(full_pass=False)
                except Exception:
                    self.log.exception("applying deletions failed; the next listing tries again")
            for rel, stamp in gone.items():
                await self._drop(rel, stamp)

    async def _still_there(self, rels: list[str]) -> set[str]:
        """Of keys found gone, those the bucket holds again (or cannot be asked about:
        kept, and looked at again, rather than deleted on a guess)."""
        limit = asyncio.Semaphore(LOOKS_AT_ONCE)

        async def there(rel: str) -> bool:
            async with limit:
                try:
                    return await self.runner.source.stat(rel) is not None
                except SourceError:
                    return True

        found = await asyncio.gather(*(there(rel) for rel in rels))
        return {rel for rel, yes in zip(rels, found, strict=True) if yes}


@dataclass(slots=True)
class Suspect:
    """An object a listing found new that no message had named (yet)."""

    due: float  # wall time from which its message can no longer be merely on its way
    found: int  # complete passes before the one that found it
    drained: float | None = None  # a receive found the queue empty at this time, ≥ due


class QueueJudge:
    """Whether the queue receives the bucket's events, judged by the listing: objects a
    listing found new, written since the queue was first read, that no message named.

    A message is named by whichever daemon received it, and that one may plan the key
    (so a later listing no longer finds it new) long before this one judges. So the
    record of what was named is the hint rows, live or done (ledger/hints.py keeps done
    rows DONE_KEEP), and a suspect is checked against them every CHECK_EVERY while it
    waits: whoever was named it, at any time up to the judgement, it is seen.

    When to judge, so that a queue that lags far behind the bucket is not called deaf:
    once every message sent for the suspect must have reached some receiver, and that
    receiver had time to record it. A receive that found the queue empty, begun after
    the object's event was due (its last-modified plus UNANNOUNCED_GRACE), shows the
    first; UNANNOUNCED_GRACE more shows the second (and by then a batch whose receiver
    died is back on the queue, under SQS's default visibility timeout, and recorded by
    another). A queue that really receives nothing is always empty, so it is named
    within about a minute. A queue so busy that it is never empty gets a judgement at
    the end of the next complete pass instead (a `poll_interval` later, an hour by
    default): a backlog older than that is worth naming anyway, and the problem says
    the queue may be lagging rather than missing events.

    Never judged while the queue's own receive or delete fails (that is its problem)."""

    def __init__(self, hints: QueueHints) -> None:
        self.hints = hints
        self.feed = hints.feed
        self.settle = hints.settle
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._suspects: OrderedDict[str, Suspect] = OrderedDict()
        self.passes = 0  # complete passes so far
        self._checked = 0.0  # when every suspect was last checked against the rows
        self._problem: str | None = None  # as this daemon named it, while it holds
        self._named_at = 0  # feed.messages then

    def named(self, relpath: str) -> None:
        self._recent[relpath] = None
        self._recent.move_to_end(relpath)
        while len(self._recent) > RECENT_KEYS:
            self._recent.popitem(last=False)
        self._suspects.pop(relpath, None)  # late, but the queue did name it

    def listed(self, changed: list[Entry]) -> None:
        """A listing found these new or changed: those written since the queue was
        first read that no message named here are suspects, judged by `run` once
        their message can no longer be merely late."""
        # S3 gives last-modified in whole seconds, truncated: an object written in the
        # second the queue was first read may look older than that moment.
        since = math.floor(self.feed.started_at)
        held = self.hints.noted
        for e in changed:
            t = e.mtime_ns / 1e9
            if t < since or e.relpath in self._recent or e.relpath in held:
                continue
            due = t + 1.0 + UNANNOUNCED_GRACE + self.settle  # + the truncated second
            known = self._suspects.get(e.relpath)
            if known is not None and known.due == due:
                continue  # listed again, unchanged: it keeps the pass that found it
            self._suspects[e.relpath] = Suspect(due, self.passes)
            self._suspects.move_to_end(e.relpath)
            while len(self._suspects) > RECENT_KEYS:
                self._suspects.popitem(last=False)

    async def pass_done(self, *, complete: bool) -> None:
        """After a full pass (which cleared the watch's problem): judge what is due. The
        problem is named again while it holds: until nothing is suspected any more and
        the queue has delivered since it was named (a queue that still delivers
        nothing stays named, however quiet the bucket)."""
        if not complete or self.feed.problem is not None:
            return
        self.passes += 1
        try:
            unnamed = await self.judge()
        except Exception:  # the ledger's own problem is shown; judged again soon
            self.hints.log.debug("cannot judge the queue now")
            return
        if unnamed:
            return
        if self._problem is not None:
            if self._suspects or self.feed.messages <= self._named_at:
                await self.hints.report(self._problem)
                return
            self._problem = None
        if not self._suspects:
            await self.hints.report(None)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(JUDGE_EVERY)
            if not self._suspects:
                continue
            try:
                await self.judge()
            except Exception:  # the ledger's own problem is shown; judged again soon
                self.hints.log.debug("cannot judge the queue now")

    async def judge(self) -> int:
        """Drop suspects some daemon was named; name the queue for those due that none
        was. Returns how many it named the queue for."""
        if self.feed.problem is not None:
            return 0
        now = time.time()
        drained = self.feed.drained_at
        due: list[str] = []
        lagging = False
        for k, s in self._suspects.items():
            if now < s.due:
                continue
            if s.drained is None and drained is not None and drained >= s.due:
                s.drained = drained
            if s.drained is not None and now >= s.drained + UNANNOUNCED_GRACE:
                due.append(k)
            elif self.passes >= s.found + 2:  # a whole pass ended after the finding one
                due.append(k)
                lagging = True
        every = now >= self._checked + CHECK_EVERY
        check = list(self._suspects) if every else due
        if not check:
            return 0
        named = await self._hinted(check)
        if every:
            self._checked = now
        for k in named:
            self._suspects.pop(k, None)
        unnamed = [k for k in due if k not in named]
        for k in unnamed:
            del self._suspects[k]
        if unnamed:
            await self._name(unnamed, lagging)
        return len(unnamed)

    async def _hinted(self, keys: list[str]) -> set[str]:
        r = self.hints.runner
        return await r.ledger.write(op_hinted(r.watch.name, keys))

    async def _name(self, unnamed: list[str], lagging: bool) -> None:
        n, examples = len(unnamed), unnamed[:3]
        heard = (
            f"{self.feed.messages} messages since the start"
            if self.feed.messages
            else "no message at all since the start, not even S3's test event"
        )
        when = (
            "; the queue has not been empty since they were written, so it may instead be"
            " lagging more than a listing interval behind the bucket"
            if lagging
            else ", and the queue has been empty since"
        )
        problem = (
            f"queue not receiving: {self.feed.url} named none of {n} objects the listing "
            f"found new (e.g. {', '.join(examples)}) though they were written after it was "
            f"first read{when} ({heard}); check the bucket's event notifications to this "
            "queue (docs/bucket-events.md). The listing syncs them meanwhile"
        )
        self.hints.log.error(
            "queue misses the bucket's events", objects=n, examples=examples, lagging=lagging
        )
        self._problem, self._named_at = problem, self.feed.messages
        await self.hints.report(problem)
