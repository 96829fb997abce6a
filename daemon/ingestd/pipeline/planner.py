"""Reads what the pure planner needs (sidecars, image sizes, DICOM headers, a group
folder's listing) and hands it to plan/. Blocking: the watch runner calls it in a
thread. Kept apart from plan/ so that plan/ stays pure and exhaustively testable.

Every read goes through the source's `files` (core.source.SourceFiles): plain os calls
for a folder, range reads and prefix listings for a bucket, so one planner serves every
kind of source."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ingestd.config import Watch
from ingestd.core.errors import MediaError
from ingestd.core.filters import PathFilter
from ingestd.core.fingerprint import fingerprint
from ingestd.core.model import Entry, ItemPlan, item_key
from ingestd.core.source import SourceFiles
from ingestd.ledger import ITEM, MEMBER, SIDECAR
from ingestd.media.detect import slot_type_for
from ingestd.plan.groups import GroupMembership, group_of, group_sidecar_relpath, plan_group
from ingestd.plan.layout import PlanError, dataset_folder, plan_file
from ingestd.plan.metadata import (
    is_sidecar_name,
    sidecar_name,
    sidecar_targets,
)

if TYPE_CHECKING:
    pass


@dataclass(slots=True)
class Planned:
    """What planning produced for one item (or one failed attempt at an item)."""

    source_id: str
    key: str
    plan: ItemPlan | None
    error: str | None
    entries: list[tuple[Entry, str]] = field(default_factory=list)


@dataclass(slots=True)
class PlanBatch:
    planned: list[Planned] = field(default_factory=list)
    entries_only: list[tuple[Entry, str]] = field(default_factory=list)  # e.g. sidecars
    groups: dict[str, set[str]] = field(default_factory=dict)  # group dir → source ids now


class WatchFilter:
    """The watch's include/exclude, widened to what planning needs to see: sidecars even
    when `include` names only media, and a group's ready marker (often a dot file)."""

    def __init__(self, watch: Watch) -> None:
        include = list(watch.include)
        template = watch.metadata.sidecar
        if include and template is not None:
            include.append(template.replace("{name}", "*").replace("{stem}", "*"))
        self.base = PathFilter(include, watch.exclude)
        self.group = watch.group
        self.marker = watch.group.ready_marker if watch.group else None

    def accepts(self, relpath: str) -> bool:
        if self.base.accepts(relpath):
            return True
        if self.marker is not None and relpath.rpartition("/")[2] == self.marker:
            assert self.group is not None
            return group_of(self.group, relpath).kind == "marker"
        return False

    def prunes_dir(self, reldir: str) -> bool:
        return self.base.prunes_dir(reldir)


def sidecar_name_start(template: str, sidecar: str) -> str:
    """What the names of a sidecar's targets start with (the {name} or {stem} value), so
    that a bucket lists only those keys; "" when the template is too unusual to tell."""
    for placeholder, other in (("{name}", "{stem}"), ("{stem}", "{name}")):
        if template.count(placeholder) == 1 and other not in template:
            prefix, _, suffix = template.partition(placeholder)
            if sidecar.startswith(prefix) and sidecar.endswith(suffix):
                return sidecar[len(prefix) : len(sidecar) - len(suffix)]
    return ""


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class Planner:
    def __init__(
        self,
        watch: Watch,
        path_filter: WatchFilter,
        deid_key: bytes | None,
        files: SourceFiles,
    ) -> None:
        self.watch = watch
        self.root = str(watch.source)
        self.filter = path_filter
        self.files = files
        # With de-identification on, names and metadata come from the header as the
        # de-identified copy will have it, so no patient data leaks through them.
        self.deid_key = deid_key if watch.dicom.deidentify else None

    def membership(self, relpath: str) -> GroupMembership:
        if self.watch.group is None:
            return GroupMembership("loose", None)
        return group_of(self.watch.group, relpath)

    # -- single files ---------------------------------------------------------------------

    def plan_entry(self, entry: Entry) -> Planned:
        """One settled item file, with its sidecar if the watch has one."""
        w = self.watch
        sidecar = None
        entries: list[tuple[Entry, str]] = [(entry, ITEM)]
        template = w.metadata.sidecar
        if template is not None:
            rel = _join(entry.parent, sidecar_name(template, entry.name))
            found = self.files.read_sidecar(rel)
            if found is not None:
                sidecar = found[0]
                entries.append((found[1], SIDECAR))
        key = item_key(dataset_folder(w.path, w.preserve_folders, entry.parent), entry.name)
        sniffed = None
        if slot_type_for(entry.name) == "file":
            sniffed = self.files.sniff(entry.relpath)
        try:
            plan = plan_file(w, entry, sidecar, sniffed)
        except PlanError as e:
            return Planned(entry.relpath, key, None, e.reason, entries)
        return Planned(entry.relpath, plan.key, plan, None, entries)

    def plan(
        self,
        entries: Sequence[Entry],
        groups: Iterable[str] = (),
        is_pending: Callable[[str], bool] = lambda _: False,
        sidecars_gone: Sequence[str] = (),
    ) -> PlanBatch:
        """Plan settled loose files and sidecars, the given ready group folders, and what
        gone sidecars described. `is_pending(relpath)` says a path is still settling: a
        file whose sidecar is settling waits for it (and is planned when it settles)."""
        w = self.watch
        template = w.metadata.sidecar
        batch = PlanBatch()
        seen: set[str] = set()
        group_dirs = set(groups)
        sidecars = [
            (e.relpath, e) for e in entries if template and is_sidecar_name(template, e.name)
        ]
        sidecars += [(rel, None) for rel in sidecars_gone]
        for rel, sidecar_entry in sidecars:
            if sidecar_entry is not None:
                batch.entries_only.append((sidecar_entry, SIDECAR))
            files, dirs = self._sidecar_targets(rel)
            group_dirs |= dirs
            for target in files:
                if is_pending(target.relpath) or target.relpath in seen:
                    continue
                seen.add(target.relpath)
                batch.planned.append(self.plan_entry(target))
        for entry in entries:
            if template is not None and is_sidecar_name(template, entry.name):
                for target in files:
                    if is_pending(target.relpath) or target.relpath in seen:
                        continue
                    seen.add(target.relpath)
                    batch.planned.append(self.plan_entry(target))
                continue
            if entry.relpath in seen:
                continue
            if template is not None and is_pending(
                _join(entry.parent, sidecar_name(template, entry.name))
            ):
                continue  # planned when its sidecar settles
            seen.add(entry.relpath)
            batch.planned.append(self.plan_entry(entry))
        for group_dir in sorted(group_dirs):
            planned = self.plan_group(group_dir)
            batch.groups[group_dir] = {p.source_id for p in planned if p.plan or p.error}
            batch.planned += planned
        return batch

    def _sidecar_targets(self, sidecar_rel: str) -> tuple[list[Entry], set[str]]:
        """The item files, and the group folders, that a sidecar describes."""
        template = self.watch.metadata.sidecar
        assert template is not None
        parent, _, name = sidecar_rel.rpartition("/")
        siblings = self.files.names(parent, sidecar_name_start(template, name))
        if siblings is None:
            return [], set()
        files, dirs = [], set()
        for target in sidecar_targets(template, name, siblings):
            rel = _join(parent, target)
            found = self.files.stat(rel)
            if found is None:
                continue
            if isinstance(found, Entry):
                if self.filter.accepts(rel) and self.membership(rel).kind == "loose":
                    files.append(found)
            elif self.membership(rel + "/x").kind == "member":
                dirs.add(rel)
        return files, dirs

    # -- group folders --------------------------------------------------------------------

    def list_group(self, group_dir: str) -> list[Entry]:
        """The files directly inside a group folder that the watch takes."""
        return [e for e in self.files.list_files(group_dir) if self.filter.accepts(e.relpath)]

    def plan_group(self, group_dir: str) -> list[Planned]:
        w = self.watch
        group = w.group
        assert group is not None
        members = self.list_group(group_dir)
        entries: list[tuple[Entry, str]] = [(e, MEMBER) for e in members]
        parent, _, dir_name = group_dir.rpartition("/")
        key = item_key(dataset_folder(w.path, w.preserve_folders, parent), dir_name)
        sidecar = None
        side_rel = group_sidecar_relpath(w, group_dir)
        if side_rel is not None:
            found = self.files.read_sidecar(side_rel)
            if found is not None:
                sidecar = found[0]
                entries.append((found[1], SIDECAR))
        try:
            sizes = self._sizes(members) if group.mode == "channels" else None
            # Outside series mode headers only tell extension-less DICOM files apart.
            headers = self._headers(
                members if group.mode == "series" else self._sniffed_dicom(members)
            )
            plans = plan_group(w, group_dir, members, sizes=sizes, headers=headers, sidecar=sidecar)
        except (PlanError, MediaError) as e:
            return [Planned(group_dir, key, None, e.reason, entries)]
        if not plans:
            # Nothing usable yet; remember the files so rescans do not plan them again.
            return [Planned(group_dir, key, None, None, entries)]
        return [Planned(p.source_id, p.key, p, None, entries) for p in plans]

    def _sizes(self, members: Sequence[Entry]) -> dict[str, tuple[int, int]]:
        sizes = {}
        for e in members:
            if slot_type_for(e.name) == "image":
                sizes[e.relpath] = self.files.image_size(e.relpath)
        return sizes

    def _sniffed_dicom(self, members: Sequence[Entry]) -> list[Entry]:
        return [
            e
            for e in members
            if slot_type_for(e.name) == "file" and self.files.sniff(e.relpath) == "dicom"
        ]

    def _headers(self, members: Sequence[Entry]) -> dict[str, object]:
        from ingestd.media.dicom import deidentify_header

        headers: dict[str, object] = {}
        for e in members:
            if slot_type_for(e.name) not in ("dicom", "file"):
                continue
            try:
                h = self.files.dicom_header(e.relpath, self.watch.dicom.tags)
            except MediaError:
                continue  # the planner fails the group if a .dcm file has no header
            headers[e.relpath] = deidentify_header(h, self.deid_key) if self.deid_key else h
        return headers


def failed_fingerprint(entries: Sequence[tuple[Entry, str]]) -> str:
    """What a failed plan depends on: its files as they were."""
    return fingerprint(sorted([e.relpath, e.size, e.mtime_ns] for e, _ in entries))
