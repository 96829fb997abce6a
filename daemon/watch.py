"""One running watch: source hints → settle → plan → ledger.

The runner owns a watch's source (observer + walks), its settler, the planning of
settled files and the judgement of deletions (with the mass-deletion guard). It only
writes to the ledger; the shared sync pool takes it from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from daemon.config import Watch
from daemon.ledger import ITEM, SIDECAR, AsyncLedger, Ledger, connect
from daemon.model import Entry, ItemPlan
from daemon.plan.fingerprint import fingerprint
from daemon.plan.layout import PlanError, dataset_folder, plan_file
from daemon.plan.metadata import (
    Sidecar,
    is_sidecar_name,
    parse_sidecar,
    sidecar_name,
    sidecar_targets,
    type_conflicts,
    value_type,
)
from daemon.sources.filters import PathFilter
from daemon.sources.local import LocalSource, ScanResult
from daemon.sources.settle import Settler, stat_many

log = structlog.get_logger("ingestd.watch")

MAX_SIDECAR_BYTES = 1 << 20


@dataclass(slots=True)
class Planned:
    """What planning one settled file produced (used by dry runs as well)."""

    entry: Entry
    plan: ItemPlan | None
    error: str | None
    entries: list[tuple[Entry, str]] = field(default_factory=list)


def read_sidecar(root: str, relpath: str) -> Sidecar | None:
    """Stat and parse a sidecar file; None when there is none."""
    path = os.path.join(root, relpath)
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_size > MAX_SIDECAR_BYTES:
                return Sidecar(relpath, st.st_size, st.st_mtime_ns, None, "larger than 1 MiB")
            raw = fh.read(MAX_SIDECAR_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as e:
        return Sidecar(relpath, 0, 0, None, f"cannot be read: {e.strerror}")
    return parse_sidecar(relpath, st.st_size, st.st_mtime_ns, raw)


def plan_entry(watch: Watch, root: str, entry: Entry) -> Planned:
    """Plan one settled item file, reading its sidecar if the watch has one (blocking)."""
    sidecar = None
    entries: list[tuple[Entry, str]] = [(entry, ITEM)]
    template = watch.metadata.sidecar
    if template is not None:
        parent = entry.parent
        rel = sidecar_name(template, entry.name)
        rel = f"{parent}/{rel}" if parent else rel
        sidecar = read_sidecar(root, rel)
        if sidecar is not None:
            entries.append((Entry(rel, sidecar.size, sidecar.mtime_ns), SIDECAR))
    try:
        return Planned(entry, plan_file(watch, entry, sidecar), None, entries)
    except PlanError as e:
        return Planned(entry, None, e.reason, entries)


def sidecar_target_entries(
    watch: Watch, root: str, path_filter: PathFilter, sidecar_rel: str
) -> list[Entry]:
    """The item files beside a sidecar that it gives metadata to (blocking)."""
    assert watch.metadata.sidecar is not None
    parent, _, name = sidecar_rel.rpartition("/")
    absdir = os.path.join(root, parent) if parent else root
    try:
        siblings = set(os.listdir(absdir))
    except OSError:
        return []
    out = []
    for target in sidecar_targets(watch.metadata.sidecar, name, siblings):
        rel = f"{parent}/{target}" if parent else target
        if not path_filter.accepts(rel):
            continue
        try:
            st = os.stat(os.path.join(root, rel), follow_symlinks=watch.follow_symlinks)
        except OSError:
            continue
        out.append(Entry(rel, st.st_size, st.st_mtime_ns))
    return out


def _with_sidecars(watch: Watch) -> list[str]:
    """The include list, widened so sidecars are seen even when include names only media:
    a sidecar edit alone must update its item."""
    template = watch.metadata.sidecar
    if not watch.include or template is None:
        return list(watch.include)
    return [*watch.include, template.replace("{name}", "*").replace("{stem}", "*")]


class WatchRunner:
    def __init__(
        self,
        watch: Watch,
        ledger: AsyncLedger,
        on_planned: Callable[[], None],
        *,
        observe: bool = True,
    ) -> None:
        self.watch = watch
        self.ledger = ledger
        self.root = str(watch.source)
        self.filter = PathFilter(_with_sidecars(watch), watch.exclude)
        self.source = LocalSource(watch.source, self.filter, follow_symlinks=watch.follow_symlinks)
        self.settler = Settler(
            watch.settle,
            lambda rels: stat_many(self.root, rels, watch.follow_symlinks),
            self._on_ready,
            self._on_gone,
            on_overflow=self.request_rescan,
        )
        self.log = log.bind(watch=watch.name)
        self._on_planned = on_planned
        self._observe = observe
        self._plan_queue: asyncio.Queue[list[Entry]] = asyncio.Queue()
        self._planning = 0
        self._gone: set[str] = set()
        self._gone_at = 0.0
        self._rescan = asyncio.Event()
        self._subtrees: set[str] = set()
        self._subtree_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.scans = 0
        self.overflows = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Install the observer first, then scan, so nothing created meanwhile is missed."""
        if self._observe:
            # Installing inotify watches walks the tree: keep that off the event loop.
            await self._start_observer()
        self._tasks = [
            asyncio.create_task(self.settler.run(), name=f"settle:{self.watch.name}"),
            asyncio.create_task(self._plan_loop(), name=f"plan:{self.watch.name}"),
        ]
        await self.scan("")
        if self._observe:
            self._tasks += [
                asyncio.create_task(self._rescan_loop(), name=f"rescan:{self.watch.name}"),
                asyncio.create_task(self._subtree_loop(), name=f"subtree:{self.watch.name}"),
                asyncio.create_task(self._gone_loop(), name=f"gone:{self.watch.name}"),
                asyncio.create_task(self._health_loop(), name=f"health:{self.watch.name}"),
            ]

    async def _start_observer(self) -> None:
        loop = asyncio.get_running_loop()

        def deliver(kind: str, rel: str, is_dir: bool) -> None:
            loop.call_soon_threadsafe(self._on_event, kind, rel, is_dir)

        def overflow() -> None:
            loop.call_soon_threadsafe(self._on_overflow)

        try:
            await asyncio.to_thread(self.source.start, deliver, overflow)
        except OSError as e:
            self.log.error("cannot watch the source folder; relying on rescans", error=str(e))

    async def stop(self) -> None:
        self.source.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def request_rescan(self) -> None:
        self._rescan.set()

    @property
    def busy(self) -> bool:
        """Files are still settling or being planned (one-pass sync waits for this)."""
        return bool(len(self.settler) or self._planning or not self._plan_queue.empty())

    # -- hints ----------------------------------------------------------------------------

    def _on_event(self, kind: str, rel: str, is_dir: bool) -> None:
        if is_dir:
            if not self.filter.prunes_dir(rel):
                self._subtrees.add(rel)
                self._subtree_event.set()
            return
        if not self.filter.accepts(rel):
            return
        self.settler.hint(rel)

    def _on_overflow(self) -> None:
        self.overflows += 1
        self.log.warning("filesystem events were lost (inotify queue overflow); rescanning")
        self.request_rescan()

    def hint_changed(self, relpaths: Sequence[str]) -> None:
        """The sync step saw these files change under it: look again."""
        for rel in relpaths:
            self.settler.hint(rel)

    # -- scanning -------------------------------------------------------------------------

    async def scan(self, subdir: str) -> ScanResult:
        loop = asyncio.get_running_loop()
        started = time.monotonic()

        def emit(chunk: list[Entry]) -> None:
            loop.call_soon_threadsafe(self._hint_scanned, chunk)

        result = await asyncio.to_thread(self._scan_blocking, subdir, emit)
        self.scans += 1
        now = time.time()
        if result.root_missing:
            problem = (
                f"source folder {self.root} is missing (unmounted disk? deleted?); "
                "nothing is deleted while it is missing, and it is checked again on every rescan"
            )
            if await self.ledger.write(Ledger.op_set_problem(self.watch.name, problem, now)):
                self.log.error("source folder missing", folder=self.root)
            return result
        for rel in result.errors:
            self.log.warning("cannot read folder or file during scan", path=rel)
        self._gone.update(result.gone)
        if not subdir:
            # A full pass judges all its deletions together, as one batch.
            await self._apply_gone(full_pass=True)
        else:
            self._gone_at = time.monotonic()
        self.log.debug(
            "scan done",
            subdir=subdir or "/",
            files=result.files,
            changed=result.changed,
            gone=len(result.gone),
            seconds=round(time.monotonic() - started, 3),
        )
        return result

    def _scan_blocking(self, subdir: str, emit: Callable[[list[Entry]], None]) -> ScanResult:
        conn = connect(self.ledger.sync.path, readonly=True)
        name = self.watch.name
        try:

            def known_in_dir(reldir: str) -> dict[str, tuple[int, int]]:
                return {
                    r: (s, m)
                    for r, s, m in conn.execute(
                        "SELECT relpath, size, mtime_ns FROM entries WHERE watch=? AND parent=?",
                        (name, reldir),
                    )
                }

            def known_dirs(sub: str) -> set[str]:
                if not sub:
                    q = conn.execute("SELECT DISTINCT parent FROM entries WHERE watch=?", (name,))
                else:
                    q = conn.execute(
                        "SELECT DISTINCT parent FROM entries WHERE watch=? AND"
                        " (parent=? OR (parent >= ? AND parent < ?))",
                        (name, sub, sub + "/", sub + "0"),
                    )
                return {r for (r,) in q}

            return self.source.scan(subdir, known_in_dir, known_dirs, emit)
        finally:
            conn.close()

    def _hint_scanned(self, chunk: list[Entry]) -> None:
        for e in chunk:
            self.settler.hint(e.relpath, stat=(e.size, e.mtime_ns))

    async def _rescan_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rescan.wait(), self.watch.rescan)
            self._rescan.clear()
            try:
                await self.scan("")
            except Exception:
                self.log.exception("rescan failed; trying again at the next one")

    async def _subtree_loop(self) -> None:
        while True:
            await self._subtree_event.wait()
            self._subtree_event.clear()
            subtrees, self._subtrees = self._subtrees, set()
            # A parent's walk covers its children.
            for sub in sorted(subtrees):
                if any(sub.startswith(p + "/") for p in subtrees if p != sub):
                    continue
                try:
                    await self.scan(sub)
                except Exception:
                    self.log.exception("folder scan failed", folder=sub)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(5)
            if not self.source.alive() and os.path.isdir(self.root):
                self.log.warning("file watcher stopped; restarting it and rescanning")
                await asyncio.to_thread(self.source.stop)
                await self._start_observer()
                self.request_rescan()

    # -- planning -------------------------------------------------------------------------

    def _on_ready(self, entries: list[Entry]) -> None:
        self._plan_queue.put_nowait(entries)

    async def _plan_loop(self) -> None:
        while True:
            entries = await self._plan_queue.get()
            self._planning += 1
            try:
                await self._plan(entries)
            except Exception:
                self.log.exception("planning failed; the next rescan tries again")
            finally:
                self._planning -= 1

    async def _plan(self, entries: list[Entry]) -> None:
        planned = await asyncio.to_thread(self.plan_blocking, entries)
        now = time.time()
        w = self.watch
        ops = []
        for p in planned:
            if p.plan is not None:
                ops.append(
                    Ledger.op_apply_plan(
                        w.name, w.dataset, p.plan, p.entries, type_conflicts, value_type, now
                    )
                )
            elif p.error is not None:
                path = dataset_folder(w.path, w.preserve_folders, p.entry.parent)
                fp = fingerprint([[e.relpath, e.size, e.mtime_ns] for e, _ in p.entries])
                key = f"{path.rstrip('/')}/{p.entry.name}"
                ops.append(
                    Ledger.op_plan_failed(
                        w.name, w.dataset, p.entry.relpath, key, fp, p.entries, p.error, now
                    )
                )
            else:
                ops.append(Ledger.op_put_entries(w.name, p.entries))
        results = await self.ledger.write_many(ops)
        for p, result in zip(planned, results, strict=True):
            if result == "failed":
                reason = p.error
                if reason is None and p.plan is not None:
                    row = await self.ledger.call(
                        self.ledger.sync.item_row, w.name, p.plan.source_id
                    )
                    reason = row["last_error"] if row else None
                self.log.error(
                    "item failed",
                    item=p.plan.key if p.plan else p.entry.relpath,
                    reason=reason,
                )
        if any(r == "pending" for r in results):
            self._on_planned()

    def plan_blocking(self, entries: list[Entry]) -> list[Planned]:
        """Plan settled files: item files directly, sidecars through the files they
        describe. Files whose sidecar is still settling wait for it."""
        w = self.watch
        template = w.metadata.sidecar
        out: list[Planned] = []
        seen: set[str] = set()
        for entry in entries:
            if template is not None and is_sidecar_name(template, entry.name):
                # the sidecar is recorded; the items it describes are planned again
                out.append(Planned(entry, None, None, [(entry, SIDECAR)]))
                for target in sidecar_target_entries(w, self.root, self.filter, entry.relpath):
                    if target.relpath in self.settler or target.relpath in seen:
                        continue
                    seen.add(target.relpath)
                    out.append(plan_entry(w, self.root, target))
                continue
            if entry.relpath in seen:
                continue
            if template is not None:
                parent = entry.parent
                side = sidecar_name(template, entry.name)
                if (f"{parent}/{side}" if parent else side) in self.settler:
                    continue  # planned when its sidecar settles
            seen.add(entry.relpath)
            out.append(plan_entry(w, self.root, entry))
        return out

    # -- deletions ------------------------------------------------------------------------

    def _on_gone(self, relpaths: list[str]) -> None:
        self._gone.update(relpaths)
        self._gone_at = time.monotonic()

    async def _gone_loop(self) -> None:
        # Deletions seen through events are judged in batches: a batch closes once no
        # deletion arrived for `settle`, so an `rm -rf` is one batch for the guard.
        quiet = max(self.watch.settle, 0.5)
        while True:
            await asyncio.sleep(quiet / 2)
            if self._gone and time.monotonic() - self._gone_at >= quiet:
                try:
                    await self._apply_gone(full_pass=False)
                except Exception:
                    self.log.exception("applying deletions failed; the next rescan tries again")

    async def _apply_gone(self, *, full_pass: bool) -> None:
        w = self.watch
        gone, self._gone = sorted(self._gone), set()
        now = time.time()
        known = await self.ledger.call(self.ledger.sync.known_items, w.name, gone)
        total = await self.ledger.call(self.ledger.sync.live_count, w.name)
        if known and not w.max_delete.allows(len(known), total):
            share = len(known) / total if total else 1.0
            problem = (
                f"refused to delete {len(known)} of {total} items ({share:.0%}) at once: more than "
                f"max_delete {w.max_delete}. Is the source folder mounted and complete? If the "
                "deletion is intended, raise max_delete for this watch and restart"
            )
            if await self.ledger.write(Ledger.op_set_problem(w.name, problem, now)):
                self.log.error("mass deletion refused", deletions=len(known), items=total)
            return
        if gone:
            sidecars = await self.ledger.write(Ledger.op_gone(w.name, gone, w.on_delete, now))
            if known:
                self.log.info(
                    "source files gone",
                    items=len(known),
                    on_delete=w.on_delete,
                )
            for rel in sidecars:
                targets = await asyncio.to_thread(
                    sidecar_target_entries, w, self.root, self.filter, rel
                )
                if targets:
                    self._plan_queue.put_nowait(targets)
            self._on_planned()
        if full_pass and await self.ledger.write(Ledger.op_set_problem(w.name, None, now)):
            self.log.info("watch healthy again")
