"""A watch over a bucket prefix (s3://, gs://, az://): poll, diff, settle, plan.

Object stores have no change events worth trusting across clouds, so the runner polls:
every `poll_interval` it streams the listing and diffs it page by page against the
ledger's entries (sources/bucket_poll.py). New and changed objects settle (two
consecutive listings unchanged, or older than `settle`), then go through the same
planner as folder files, whose reads here are range reads and prefix listings on the
store. Objects missing from a complete listing are deletions and meet the same
`max_delete` guard as folder watches. A listing that fails part-way deletes nothing.

Everything below the listing is inherited from WatchRunner: planning, recording plans,
judging deletions, and the watch problem a failure sets (shown by `ingestd status`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import random
import tempfile
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import structlog

from ingestd.config import Watch
from ingestd.core.errors import MediaError
from ingestd.core.model import Entry, SlotType
from ingestd.ledger import AsyncLedger, Ledger
from ingestd.media.detect import type_of_prefix
from ingestd.pipeline.planner import MAX_SIDECAR_BYTES, NOT_A_FILE, Planner
from ingestd.pipeline.runner import WatchRunner, _Work
from ingestd.plan.metadata import Sidecar, parse_sidecar
from ingestd.sources.bucket_poll import (
    ListingOutOfOrder,
    PendingObjects,
    StoreHandle,
    diff_pages,
    usable_key,
)
from ingestd.sources.objects import BucketError, ObjectChanged, ObjectInfo, ObjectStore

if TYPE_CHECKING:
    from ingestd.media.dicom import DicomHeader

log = structlog.get_logger("ingestd.bucket")

T = TypeVar("T")

HEADER_BYTES = 256 * 1024  # what an image or DICOM header read fetches first
STORE_TIMEOUT = 300.0  # one store call made from a planning thread
STAT_CACHE = 10_000


def _entry(obj: ObjectInfo) -> Entry:
    return Entry(obj.key, obj.size, obj.mtime_ns, obj.etag)


class BucketFiles:
    """The planner's file access (planning.SourceFiles) on an object store. Called from
    planning threads; each call runs on the daemon's event loop and is waited for."""

    def __init__(self, handle: StoreHandle, timeout: float = STORE_TIMEOUT) -> None:
        self.handle = handle
        self.timeout = timeout
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the runner starts
        # Objects seen by a recent `names` listing, so `stat` on them costs no request.
        self._seen: OrderedDict[str, ObjectInfo] = OrderedDict()

    def _call(self, fn: Callable[[ObjectStore], Coroutine[Any, Any, T]]) -> T:
        loop = self.loop
        assert loop is not None, "BucketFiles used before its runner started"

        async def run() -> T:
            return await fn(self.handle.get())

        fut = asyncio.run_coroutine_threadsafe(run(), loop)
        try:
            return fut.result(self.timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise BucketError(
                "unreachable", f"{self.handle.url}: no answer within {self.timeout:g}s"
            ) from None

    # -- whole small objects ------------------------------------------------------------

    def read_sidecar(self, relpath: str) -> tuple[Sidecar, Entry] | None:
        async def read(store: ObjectStore) -> tuple[Sidecar, Entry] | None:
            for _ in range(3):
                info = await store.head(relpath)
                if info is None:
                    return None
                entry = _entry(info)
                if info.size > MAX_SIDECAR_BYTES:
                    error = "larger than 1 MiB"
                    return Sidecar(relpath, info.size, info.mtime_ns, None, error), entry
                try:
                    raw = b"".join([c async for c in store.stream(relpath, etag=info.etag)])
                except ObjectChanged:
                    continue  # replaced between the HEAD and the GET: look again
                return parse_sidecar(relpath, info.size, info.mtime_ns, raw), entry
            raise BucketError("other", f"{store.object_url(relpath)} keeps changing")

        return self._call(read)

    # -- headers ------------------------------------------------------------------------

    def _head_bytes(self, relpath: str, n: int) -> bytes | None:
        async def read(store: ObjectStore) -> bytes | None:
            try:
                return await store.read_range(relpath, 0, n)
            except ObjectChanged:
                return None
            except BucketError as e:
                if e.kind == "not_found":
                    return None
                raise

        return self._call(read)

    def sniff(self, relpath: str) -> SlotType | None:
        head = self._head_bytes(relpath, 132)
        return type_of_prefix(head) if head is not None else None

    def _with_local_copy(self, relpath: str, read: Callable[[str], T]) -> T:
        """`read` on a local file holding the object's first bytes, and on the whole
        object when the prefix was not enough. The file is named like the object, so
        reasons from the media code name the object."""
        name = relpath.rsplit("/", 1)[-1]
        with tempfile.TemporaryDirectory(prefix="ingestd-plan-") as tmp:
            path = os.path.join(tmp, name)
            head = self._head_bytes(relpath, HEADER_BYTES + 1)
            if head is None:
                raise MediaError(f"{name}: vanished before it could be read")
            with open(path, "wb") as fh:
                fh.write(head)
            if len(head) <= HEADER_BYTES:
                return read(path)  # the whole object
            try:
                return read(path)
            except MediaError:
                pass  # the header runs past the prefix (a big EXIF block, a long DICOM header)

            async def download(store: ObjectStore) -> None:
                await store.download(relpath, path)

            self._call(download)
            return read(path)

    def image_size(self, relpath: str) -> tuple[int, int]:
        from ingestd.media.images import image_size

        return self._with_local_copy(relpath, image_size)

    def dicom_header(self, relpath: str, keywords: Sequence[str]) -> DicomHeader:
        from ingestd.media.dicom import read_header

        return self._with_local_copy(relpath, lambda p: read_header(p, keywords))

    # -- listings -----------------------------------------------------------------------

    def _list(self, subprefix: str, limit: int | None = None) -> list[ObjectInfo]:
        async def collect(store: ObjectStore) -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            pages = store.list_pages(subprefix)
            try:
                async for page in pages:
                    out += page
                    if limit is not None and len(out) >= limit:
                        break
            finally:
                aclose = getattr(pages, "aclose", None)
                if aclose is not None:
                    await aclose()
            return out

        return self._call(collect)

    def names(self, parent: str, start: str) -> set[str] | None:
        base = parent + "/" if parent else ""
        names: set[str] = set()
        for obj in self._list(base + start):
            rest = obj.key[len(base) :]
            names.add(rest.split("/", 1)[0])
            if "/" not in rest:
                self._seen[obj.key] = obj
                while len(self._seen) > STAT_CACHE:
                    self._seen.popitem(last=False)
        return names

    def stat(self, relpath: str) -> Entry | Literal["not-a-file"] | None:
        obj = self._seen.pop(relpath, None)
        if obj is not None:
            return _entry(obj)

        async def head(store: ObjectStore) -> ObjectInfo | None:
            return await store.head(relpath)

        info = self._call(head)
        if info is not None:
            return _entry(info)
        return NOT_A_FILE if self._list(relpath + "/", limit=1) else None

    def list_files(self, reldir: str) -> list[Entry]:
        base = reldir + "/" if reldir else ""
        return [_entry(o) for o in self._list(base) if "/" not in o.key[len(base) :]]


class BucketWatchRunner(WatchRunner):
    """The runner of a bucket watch: a poll loop in place of the observer and walks."""

    backoff_base = 5.0  # first retry after a failed listing, at most
    backoff_cap = 300.0

    def __init__(
        self,
        watch: Watch,
        ledger: AsyncLedger,
        on_planned: Callable[[], None],
        *,
        observe: bool = True,
        deid_key: bytes | None = None,
        store: StoreHandle | None = None,
    ) -> None:
        super().__init__(watch, ledger, on_planned, observe=False, deid_key=deid_key)
        url = watch.bucket
        assert url is not None, "a bucket runner needs a bucket watch"
        self.url = url
        self.handle = store or StoreHandle(url, watch.source_options)
        self.files = BucketFiles(self.handle)
        self.planner = Planner(watch, self.filter, self.planner.deid_key, files=self.files)
        # Duck-types the Settler where WatchRunner asks about settling paths.
        self.settler = PendingObjects(watch.settle)  # type: ignore[assignment]
        self.pending = self.settler
        # One-pass sync waits for young objects: list again sooner than the daemon would.
        self._one_pass = not observe
        self.failures = 0
        self._skipped_logged: set[str] = set()
        self._last_pass = 0.0
        self._polling = 0
        self.log = log.bind(watch=watch.name)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self.files.loop = asyncio.get_running_loop()
        self._tasks = [asyncio.create_task(self._plan_loop(), name=f"plan:{self.watch.name}")]
        await self.check_settings()
        await self.poll()
        self._tasks.append(asyncio.create_task(self._poll_loop(), name=f"poll:{self.watch.name}"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(Exception):
            await self.handle.close()

    def hint_changed(self, relpaths: Sequence[str]) -> None:
        """The sync step saw objects change under it: list again soon."""
        self.request_rescan()

    def next_delay(self) -> float:
        """Seconds until the next listing: the poll interval, backing off after failures
        (from at most `backoff_base` up to `backoff_cap`, jittered)."""
        w = self.watch
        if self.failures:
            base = min(w.poll_interval, self.backoff_base)
            step = min(self.backoff_cap, base * 2 ** min(self.failures - 1, 20))
            return random.uniform(step / 2, step)
        if self._one_pass and len(self.pending):
            return min(w.poll_interval, max(w.settle, 0.5))
        return w.poll_interval

    async def _poll_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rescan.wait(), self.next_delay())
            self._rescan.clear()
            # Hints may come in bursts; a listing may be long: at most one per second.
            await asyncio.sleep(max(0.0, self._last_pass + 1.0 - time.monotonic()))
            try:
                await self.poll()
            except Exception:  # recording the pass failed (the ledger): try at the next
                self.failures += 1
                self.log.exception("bucket pass failed; trying again at the next poll")

    # -- one pass -------------------------------------------------------------------------

    def _takes(self, key: str) -> bool:
        if not usable_key(key):
            if len(self._skipped_logged) < 1000 and key not in self._skipped_logged:
                self._skipped_logged.add(key)
                self.log.warning(
                    "object key cannot name an item (empty, '.' or '..' segment); skipped",
                    key=key,
                )
            return False
        if not self.filter.accepts(key):
            return False
        m = self.planner.membership(key)
        if m.kind == "ignored":
            self._log_ignored(key, m)
            return False
        return True

    def _known_range(
        self, after: str | None, upto: str | None
    ) -> Awaitable[dict[str, tuple[int, int, str | None]]]:
        return self.ledger.call(self.ledger.sync.entries_between, self.watch.name, after, upto)

    @property
    def busy(self) -> bool:
        # A pass takes objects out of `pending` before it plans them: without counting
        # the pass itself, a one-pass sync could see nothing settling and nothing
        # pending in between, and finish with the objects unplanned.
        return bool(self._polling) or super().busy

    async def poll(self) -> bool:
        """One listing pass: plan what is ready, judge what is gone. Returns whether the
        listing completed; a failure becomes the watch's problem and is retried."""
        self._polling += 1
        try:
            return await self._poll()
        finally:
            self._polling -= 1

    async def _poll(self) -> bool:
        self.files.loop = asyncio.get_running_loop()
        self.scans += 1
        pass_no = self.scans
        started = time.monotonic()
        gone: list[str] = []
        changed = listed = 0
        groups: dict[str, _Work] = {}  # group folders the listing is still inside
        replan = self.replan
        try:
            store = self.handle.get()
            pages = store.list_pages("")
            async for page in diff_pages(pages, self._known_range, self._takes, all_changed=replan):
                listed += page.listed
                changed += len(page.changed)
                gone += page.gone
                loose: list[Entry] = []
                for obj in page.changed:
                    # A version waiting to settle is listed again each poll: count it once.
                    self.files_seen += not self.pending.holds(obj)
                    m = self.planner.membership(obj.key)
                    if m.kind == "marker" and m.group_dir is not None:
                        # The writer says the folder is complete: plan it without waiting.
                        work = groups.setdefault(m.group_dir, _Work())
                        work.groups.add(m.group_dir)
                        work.forced = True
                    elif self.pending.observe(obj, pass_no):
                        if m.kind == "member" and m.group_dir is not None:
                            groups.setdefault(m.group_dir, _Work()).entries.append(_entry(obj))
                        else:
                            loose.append(_entry(obj))
                if loose:
                    await self._plan(_Work(entries=loose))
                # Keys sharing a prefix are listed together: once the listing is past a
                # group folder, all its objects have been seen and it can be judged.
                last = page.last_key
                for g in [g for g in groups if last is None or not last.startswith(g + "/")]:
                    await self._plan(groups.pop(g))
            for work in groups.values():
                await self._plan(work)
        except Exception as e:
            await self._listing_failed(e)
            return False
        finally:
            self._last_pass = time.monotonic()
        self.failures = 0
        self.pending.end_pass(pass_no)
        self._gone.update(gone)
        await self._apply_gone(full_pass=True)
        if replan:
            self._full_pass_planned_all()
        self.log.debug(
            "listing done",
            objects=listed,
            changed=changed,
            gone=len(gone),
            pending=len(self.pending),
            seconds=round(time.monotonic() - started, 3),
        )
        return True

    async def _listing_failed(self, e: Exception) -> None:
        self.failures += 1
        if isinstance(e, BucketError):
            problem = f"{e.kind}: {e.message}; retried with backoff, nothing is deleted meanwhile"
        elif isinstance(e, ListingOutOfOrder):
            problem = (
                f"the store listed {self.url} out of key order ({e}); deletions cannot be "
                "detected safely, so none are applied"
            )
        else:
            self.log.exception("bucket listing failed")
            problem = (
                f"listing {self.url} failed: {type(e).__name__}: {e}; retried with backoff, "
                "nothing is deleted"
            )
        if await self.ledger.write(Ledger.op_set_problem(self.watch.name, problem, time.time())):
            self.log.error("bucket listing failed", bucket=str(self.url), problem=problem)
        else:
            self.log.debug("bucket listing failed again", failures=self.failures)

    async def _plan(self, work: _Work) -> None:
        try:
            await super()._plan(work)
        except BucketError:
            if work.groups or work.sidecars_gone:
                # Re-plans after deletions are not found again by a listing (the other
                # entries did not change): try them again later.
                asyncio.get_running_loop().call_later(
                    self.next_delay(), self._plan_queue.put_nowait, work
                )
            raise

    # -- dry run --------------------------------------------------------------------------

    async def listing_changes(self) -> tuple[list[Entry], list[str]]:
        """(new or changed objects, gone keys) of one listing, settled or not, without
        recording anything (for `ingestd sync --dry-run`). Raises BucketError."""
        self.files.loop = asyncio.get_running_loop()
        found: list[Entry] = []
        gone: list[str] = []
        store = self.handle.get()
        async for page in diff_pages(store.list_pages(""), self._known_range, self._takes):
            found += [_entry(o) for o in page.changed]
            gone += page.gone
        return found, gone
