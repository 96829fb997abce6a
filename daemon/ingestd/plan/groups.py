"""Grouped watches: a directory becomes one item (or, for flat DICOM exports, one item
per series) instead of one item per file.

Pure, like layout.py: the caller lists the directory, reads image sizes and DICOM
headers, reads the folder's sidecar, and hands all of it in; the same inputs always
give the same plans. The rules are docs/design.md's "Grouping rules":

- Each directory exactly `group.depth` levels below the watch root is one group. Only
  files directly inside it are members; deeper files are ignored; shallower files are
  loose and stay single-file items (`group_of` tells which is which).
- The item is named after the directory and lives in the dataset folder that
  `path`/`preserve_folders` give the directory's parent; its source id is the
  directory's relpath.
- `slots`: one slot per file, `0..n-1` in natural file-name order, plus a grid layout
  hint. `channels`: one image slot per file, named after the file, all the same size,
  at most `max_channels`, plus a one-cell layout hint. `series`: one `dicom` slot named
  after the item, holding every DICOM file in slice order; other files are ignored.
- `series_by: uid` (series mode): every group directory is split by
  SeriesInstanceUID into one item per series, named from `group.name` over the
  series' first header, inside the directory's own dataset folder.

The layout hint rides on the first slot's `extra` under `LAYOUT_KEY` because ItemPlan
has no field for it yet; read it through `layout_of` so that moving it to a proper
field later changes one function, not every sink.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from ingestd.config import GroupConfig, Watch
from ingestd.core.fingerprint import fingerprint
from ingestd.core.model import Entry, ItemPlan, PlannedFile, PlannedSlot, SlotType
from ingestd.core.rawnames import display
from ingestd.media.detect import slot_type_for
from ingestd.plan.layout import PlanError, _check_relpath, dataset_folder, plan_fingerprint
from ingestd.plan.metadata import (
    Sidecar,
    bind_path_pattern,
    build_metadata,
    is_sidecar_name,
    sidecar_name,
)

__all__ = [
    "LAYOUT_KEY",
    "DicomHeaderLike",
    "GroupMembership",
    "group_of",
    "group_sidecar_relpath",
    "layout_of",
    "natural_key",
    "plan_group",
    "series_source_id",
]

LAYOUT_KEY = "layout"

# --- natural sort ------------------------------------------------------------------------------

# ASCII digits only: `\d` also takes other scripts' digits and superscripts, some of which
# int() refuses, and a sort key must never raise.
_DIGIT_RUNS = re.compile(r"([0-9]+)")


def natural_key(name: str) -> tuple[Any, ...]:
    """A sort key that orders numbers by value (`img2` before `img10`), letters without
    regard to case (`a`, `B`, `img3`, `IMG4`), and is total: two different strings
    never get equal keys, so the order never depends on the input order.

    The name is read as a sequence of characters in which each run of ASCII digits is
    one element. The first part of the key compares characters case-folded and runs by
    value; a run ranks as the character `0` against other characters, so the ASCII
    order between digits and the rest holds (`c.dcm` before `c0.dcm`, `a-1` before
    `a1`, `a1` before `a_1`). The second part breaks ties between names equal under
    that view (`IMG3`/`img3`, `img2`/`img02`) by the exact characters and by the run
    lengths, so fewer leading zeros come first. Together the two parts determine the
    string (a run is its value plus its length), which is what makes the key total.
    """
    loose: list[tuple[str, int]] = []
    exact: list[tuple[int, Any]] = []
    for i, part in enumerate(_DIGIT_RUNS.split(name)):
        if i % 2:  # split() with a group puts the digit runs at odd indices
            loose.append(("0", int(part)))
            exact.append((0, len(part)))
        else:
            # A character's second field is 0 and only ever meets another character's:
            # the first field is "0" for runs alone, since digits never stand alone here.
            loose.extend((c.casefold(), 0) for c in part)
            exact.extend((1, c) for c in part)
    return (tuple(loose), tuple(exact))


def _sorted_entries(entries: Sequence[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: natural_key(e.name))


# --- membership --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupMembership:
    """What a grouped watch does with one file.

    - `loose`: shallower than `depth`; planned on its own with `plan_file`.
    - `member`: directly inside the group directory `group_dir`.
    - `marker`: the group's `ready_marker`, directly inside `group_dir`. It says the
      group is complete; it is never a slot and never changes the plan.
    - `ignored`: deeper than `depth` inside `group_dir` (log it once and skip it), or
      a file named like the ready marker outside any group (`group_dir` None): a
      control file with no content is never worth an item of its own.
    """

    kind: Literal["loose", "member", "marker", "ignored"]
    group_dir: str | None


def group_of(group: GroupConfig, relpath: str) -> GroupMembership:
    """Where `relpath` (relative to the watch root, `/`-separated) belongs.

    With `depth: 1`, `a.jpg` is loose, `scan1/a.jpg` is a member of `scan1`, and
    `scan1/sub/a.jpg` is ignored (inside `scan1`). With `depth: 2`, `site/a.jpg` is
    loose and `site/scan1/a.jpg` a member of `site/scan1`.

    `series_by: uid` uses the same groups: each directory at `depth` is one batch of
    files that `plan_group` splits by SeriesInstanceUID (for a flat PACS export put
    the export folder at `depth`).
    """
    _check_relpath(relpath)
    parts = relpath.split("/")
    folders = len(parts) - 1
    name = parts[-1]
    if folders < group.depth:
        if group.ready_marker is not None and name == group.ready_marker:
            return GroupMembership("ignored", None)
        return GroupMembership("loose", None)
    group_dir = "/".join(parts[: group.depth])
    if folders > group.depth:
        return GroupMembership("ignored", group_dir)
    if group.ready_marker is not None and name == group.ready_marker:
        return GroupMembership("marker", group_dir)
    return GroupMembership("member", group_dir)


def group_sidecar_relpath(watch: Watch, group_dir: str) -> str | None:
    """Where the group's sidecar lives: the watch's sidecar template applied to the
    directory's name, beside the directory (`scan1/` → `scan1.json` with `{name}.json`).
    None when the watch has no sidecar template.

    Beside, not inside: inside the directory it would look like one more member, and a
    file named like a sidecar is never an item anyway (see `plan_group`).
    """
    template = watch.metadata.sidecar
    if template is None:
        return None
    parent, _, name = group_dir.rpartition("/")
    side = sidecar_name(template, name)
    return f"{parent}/{side}" if parent else side


def layout_of(plan: ItemPlan) -> dict[str, Any] | None:
    """The item's layout hint, or None (single-slot items need none)."""
    if not plan.slots:
        return None
    layout = plan.slots[0].extra.get(LAYOUT_KEY)
    return layout if isinstance(layout, dict) else None


# --- DICOM headers -----------------------------------------------------------------------------


class DicomHeaderLike(Protocol):
    """What the planner reads from a DICOM header (ingestd.media.dicom.DicomHeader has
    more). Ordering and naming need further fields, but those are read by the
    `order_key` and `name_for` callables, so the planner never depends on them."""

    @property
    def series_instance_uid(self) -> str: ...

    @property
    def tags(self) -> Mapping[str, Any]: ...


H = TypeVar("H", bound=DicomHeaderLike)

OrderKey = Callable[[H, str], tuple[Any, ...]]
NameFor = Callable[[str, H], str]


def _default_order_key(header: Any, name: str) -> tuple[Any, ...]:
    # Imported late: media.dicom pulls in pydicom, which watches without DICOM never need.
    from ingestd.media.dicom import slice_order_key

    return tuple(slice_order_key(header, name))


def _default_name_for(template: str, header: Any) -> str:
    from ingestd.media.dicom import series_item_name

    return str(series_item_name(template, header))


def _uid_tag(uid: str, digits: int) -> str:
    # A digest, not the UID itself: UIDs are identifying under the DICOM confidentiality
    # profile, and source ids and name suffixes end up in logs and in the dataset.
    return hashlib.sha256(uid.encode("utf-8", "surrogatepass")).hexdigest()[:digits]


def series_source_id(group_dir: str, series_instance_uid: str) -> str:
    """The source id of one series of a `series_by: uid` group: `<group_dir>#<digest>`,
    16 hex digits of the UID's sha256. Stable across runs and config edits and distinct
    per series; it could only meet a loose file literally named `<dir>#<that digest>`."""
    return f"{group_dir}#{_uid_tag(series_instance_uid, 16)}"


def _json_value(value: Any, where: str) -> Any:
    """A plain JSON value for a metadata field. Subclasses (pydicom's IS, DSfloat) become
    their base type so the fingerprint and the stored metadata never depend on them."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        # JSON has no NaN or infinity and several backends reject them outright.
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_value(v, where) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v, where) for v in value]
    raise TypeError(f"{where} is a {type(value).__name__}, not a JSON value")


# --- planning ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Group:
    """What every mode needs about the directory, computed once."""

    watch: Watch
    group: GroupConfig
    group_dir: str
    name: str  # the directory's name, as the backend sees it (core.rawnames.display)
    parent: str  # the directory's parent relative to the root ('' at the root)
    sidecar: Sidecar | None
    metadata: dict[str, Any]  # static < path pattern < sidecar

    def planned(self, entry: Entry) -> PlannedFile:
        return PlannedFile(
            display(entry.name), entry.relpath, entry.size, entry.mtime_ns, entry.etag
        )


# long: one pass over a group's members that builds slots, metadata and the fingerprint together; split, the steps would pass half-built items around
def plan_group(
    watch: Watch,
    group_dir: str,
    members: Sequence[Entry],
    *,
    sizes: Mapping[str, tuple[int, int]] | None = None,
    headers: Mapping[str, H] | None = None,
    sidecar: Sidecar | None = None,
    order_key: OrderKey[H] | None = None,
    name_for: NameFor[H] | None = None,
) -> list[ItemPlan]:
    """The items the group directory `group_dir` becomes, for the watch's `group.mode`.

    `members` are the files directly inside `group_dir` (those `group_of` calls
    `member` or `marker`), in any order. `sizes` maps relpath → (width, height) and is
    needed in `channels` mode; `headers` maps relpath → DICOM header for every member
    that is DICOM by content and is needed in `series` mode (a member is DICOM when it
    has a header or a `.dcm`/`.dicom` name). `sidecar` is the folder's sidecar, read
    from `group_sidecar_relpath`. `order_key(header, file_name)` and
    `name_for(template, header)` default to ingestd.media.dicom's `slice_order_key`
    and `series_item_name`.

    Never slots: the ready marker and files named like sidecars (the watch's sidecar
    template makes every matching name a sidecar, as for loose files).

    Returns one plan (`[]` when the group has nothing usable yet, e.g. only the marker,
    or no DICOM file in series mode), or one plan per series with `series_by: uid`,
    in natural name order (they share one dataset folder).

    Raises PlanError (one sentence naming the file and the fix) when the group cannot
    become an item as it is: channels of different sizes, too many channels, non-image
    channels, an unreadable image or DICOM file, several series in one folder without
    `series_by: uid`, an unusable sidecar. The error belongs to the group (source id
    `group_dir`), whatever items it would have made. Raises ValueError when the caller
    breaks the contract (no group config, a malformed `group_dir`, a member outside
    it, a missing `sizes`/`headers` mapping, a sidecar the watch has no template for).
    """
    group = watch.group
    if group is None:
        raise ValueError(f"watch {watch.name} is not grouped (group is null)")
    _check_relpath(group_dir)
    if group_dir.count("/") + 1 != group.depth:
        raise ValueError(f"group directory {group_dir!r} is not at depth {group.depth}")
    seen: set[str] = set()
    for entry in members:
        _check_relpath(entry.relpath)
        if entry.parent != group_dir:
            raise ValueError(f"{entry.relpath} is not directly inside {group_dir}")
        if entry.relpath in seen:
            raise ValueError(f"{entry.relpath} is listed twice")
        seen.add(entry.relpath)
    template = watch.metadata.sidecar
    if sidecar is not None:
        if template is None:
            raise ValueError(f"watch {watch.name} has no sidecar template but one was passed")
        expected = group_sidecar_relpath(watch, group_dir)
        if sidecar.relpath != expected:
            raise ValueError(f"sidecar {sidecar.relpath} is not {group_dir}'s ({expected})")

    files = _sorted_entries(
        [
            e
            for e in members
            if e.name != group.ready_marker
            and not (template is not None and is_sidecar_name(template, e.name))
        ]
    )
    if group.mode == "series":
        dicom = [
            e
            for e in files
            if (headers is not None and e.relpath in headers) or slot_type_for(e.name) == "dicom"
        ]
        if not dicom:
            return []
        if headers is None:
            raise ValueError("series mode needs the members' DICOM headers")
        ctx = _context(watch, group, group_dir, sidecar)
        return _plan_series(
            ctx,
            dicom,
            headers,
            order_key or _default_order_key,
            name_for or _default_name_for,
        )
    if not files:
        return []
    ctx = _context(watch, group, group_dir, sidecar)
    if group.mode == "slots":
        return [_plan_slots(ctx, files, headers)]
    if sizes is None:
        raise ValueError("channels mode needs the members' image sizes")
    return [_plan_channels(ctx, files, sizes)]


def _context(watch: Watch, group: GroupConfig, group_dir: str, sidecar: Sidecar | None) -> _Group:
    if sidecar is not None and sidecar.error is not None:
        raise PlanError(
            f"sidecar {sidecar.relpath} of folder {group_dir} cannot be used: {sidecar.error}; "
            "fix the file so it holds one JSON object, or delete it"
        )
    parent, _, name = group_dir.rpartition("/")
    rules = watch.metadata
    metadata = build_metadata(
        rules.static,
        _path_fields(rules.path_pattern, group_dir),
        sidecar.data if sidecar is not None else None,
    )
    return _Group(watch, group, group_dir, display(name), parent, sidecar, metadata)


def _path_fields(pattern: str | None, group_dir: str) -> dict[str, str] | None:
    """Bind the path pattern for a folder item.

    Patterns are written for file paths (`{site}/{scan}/*`), so the folder is first
    offered as a file path with an empty name (`site/scan1/`); a pattern written for the
    folder itself (`{site}/{scan}`) cannot match that and is then tried on the bare
    folder path. A path that matches neither gets no fields, as with loose files.
    """
    if pattern is None:
        return None
    shown = display(group_dir)  # field values reach the backend: bytes as %XX
    fields = bind_path_pattern(pattern, shown + "/")
    return fields if fields is not None else bind_path_pattern(pattern, shown)


def _finish(
    ctx: _Group,
    *,
    source_id: str,
    path: str,
    name: str,
    slots: tuple[PlannedSlot, ...],
    metadata: dict[str, Any],
    inputs: dict[str, Any],
) -> ItemPlan:
    # plan_fingerprint covers path, name, slots (files with size and mtime, slot names,
    # types, layout), metadata and the sidecar's identity. `inputs` adds what was read
    # from file contents (sizes, series UID), and the mode, so that everything the plan
    # was made from is in the digest even where it leaves no trace in the plan.
    digest = fingerprint(
        {
            "plan": plan_fingerprint(path, name, slots, metadata, ctx.sidecar),
            "source_id": source_id,
            "mode": ctx.group.mode,
            "inputs": inputs,
        }
    )
    return ItemPlan(
        source_id=source_id,
        path=path,
        name=name,
        slots=slots,
        metadata=metadata,
        fingerprint=digest,
    )


def _slot_type(entry: Entry, headers: Mapping[str, Any] | None) -> SlotType:
    # A header means the caller found a DICOM preamble, which beats a missing extension.
    if headers is not None and entry.relpath in headers:
        return "dicom"
    return slot_type_for(entry.name)


def _grid(names: Sequence[str]) -> dict[str, Any]:
    """A near-square grid, row by row: `rows` lists each row's cells, each cell the slot
    names shown in it (one name per cell here). The nesting is V7's `slots_grid`, so a
    sink can pass it on, and others can read columns and rows."""
    columns = math.ceil(math.sqrt(len(names)))
    rows = [[[n] for n in names[i : i + columns]] for i in range(0, len(names), columns)]
    return {"type": "grid", "columns": columns, "rows": rows}


def _plan_slots(ctx: _Group, files: list[Entry], headers: Mapping[str, Any] | None) -> ItemPlan:
    names = [str(i) for i in range(len(files))]
    slots = tuple(
        PlannedSlot(
            name=slot_name,
            type=_slot_type(entry, headers),
            files=(ctx.planned(entry),),
            extra={LAYOUT_KEY: _grid(names)} if i == 0 else {},
        )
        for i, (slot_name, entry) in enumerate(zip(names, files, strict=True))
    )
    return _finish(
        ctx,
        source_id=ctx.group_dir,
        path=dataset_folder(ctx.watch.path, ctx.watch.preserve_folders, ctx.parent),
        name=ctx.name,
        slots=slots,
        metadata=ctx.metadata,
        inputs={},
    )


def _listing(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _size(wh: tuple[int, int]) -> str:
    return f"{wh[0]}×{wh[1]}"


def _plan_channels(
    ctx: _Group, files: list[Entry], sizes: Mapping[str, tuple[int, int]]
) -> ItemPlan:
    where = f"folder {ctx.group_dir} (group.mode: channels)"
    # Refused rather than dropped: a channel silently missing from a view is worse than a
    # clear failure, and include/exclude patterns are the way to leave files out.
    others = [e.name for e in files if slot_type_for(e.name) != "image"]
    if others:
        raise PlanError(
            f"{where} holds files that are not images: {_listing(others)}; "
            "channels must all be images: move these out or exclude them"
        )
    if len(files) > ctx.group.max_channels:
        raise PlanError(
            f"{where} holds {len(files)} images but group.max_channels is "
            f"{ctx.group.max_channels}; split the folder or raise max_channels"
        )
    unread = [e.name for e in files if e.relpath not in sizes]
    if unread:
        raise PlanError(
            f"{where}: cannot read the size of {_listing(unread)}; "
            "the file may be corrupt or not an image: replace or remove it"
        )
    measured = [(e, (int(sizes[e.relpath][0]), int(sizes[e.relpath][1]))) for e in files]
    # The size most channels share is the reference, so the error names the odd ones
    # out. Counter keeps first-seen order and max() keeps the first of equals, so a tie
    # goes to the first file in name order and the message is stable.
    counts = Counter(wh for _, wh in measured)
    reference = max(counts, key=counts.__getitem__)
    odd = [(e, wh) for e, wh in measured if wh != reference]
    if odd:
        first, first_wh = odd[0]
        others_text = (
            f" (and {_listing([e.name for e, _ in odd[1:]])} differ too)" if len(odd) > 1 else ""
        )
        example = next(e.name for e, wh in measured if wh == reference)
        raise PlanError(
            f"{where}: channel {first.name} is {_size(first_wh)} but {example} and "
            f"{counts[reference] - 1} other(s) are {_size(reference)}{others_text}; "
            "all channels must be images of the same width and height"
        )
    names = [display(e.name) for e in files]
    slots = tuple(
        PlannedSlot(
            name=names[i],
            type="image",
            files=(ctx.planned(entry),),
            # One cell holding every slot: channels are layers of one view, not views.
            extra={LAYOUT_KEY: {"type": "grid", "columns": 1, "rows": [[names]]}} if i == 0 else {},
        )
        for i, entry in enumerate(files)
    )
    return _finish(
        ctx,
        source_id=ctx.group_dir,
        path=dataset_folder(ctx.watch.path, ctx.watch.preserve_folders, ctx.parent),
        name=ctx.name,
        slots=slots,
        metadata=ctx.metadata,
        inputs={"sizes": [[e.relpath, wh[0], wh[1]] for e, wh in measured]},
    )


def _plan_series(
    ctx: _Group,
    dicom: list[Entry],
    headers: Mapping[str, H],
    order_key: OrderKey[H],
    name_for: NameFor[H],
) -> list[ItemPlan]:
    where = f"folder {ctx.group_dir} (group.mode: series)"
    unread = [e.name for e in dicom if e.relpath not in headers]
    if unread:
        raise PlanError(
            f"{where}: {_listing(unread)} could not be read as DICOM; replace or remove the file(s)"
        )
    series: dict[str, list[Entry]] = {}
    for entry in dicom:
        series.setdefault(str(headers[entry.relpath].series_instance_uid), []).append(entry)
    if "" in series and ctx.group.series_by == "uid":
        raise PlanError(
            f"{where}: {_listing([e.name for e in series['']])} have no SeriesInstanceUID, "
            "so series_by: uid cannot place them; fix or remove the file(s)"
        )
    for entries in series.values():
        # Slice order from the handed-in key; the natural name order breaks its ties so
        # equal keys (missing InstanceNumber and position) still give one order.
        entries.sort(key=lambda e: (order_key(headers[e.relpath], e.name), natural_key(e.name)))

    if ctx.group.series_by == "folder":
        if len(series) > 1:
            raise PlanError(
                f"{where} holds {len(series)} DICOM series "
                f"({_describe_series(series, redact=ctx.watch.dicom.deidentify)}); "
                "put each series in its own folder, or set group.series_by: uid"
            )
        [(uid, entries)] = series.items()
        return [
            _series_item(
                ctx,
                entries,
                headers,
                source_id=ctx.group_dir,
                path=dataset_folder(ctx.watch.path, ctx.watch.preserve_folders, ctx.parent),
                name=ctx.name,
                uid=uid,
            )
        ]

    # series_by: uid. The directory is a container of series, so it is mirrored as a
    # dataset folder (as preserve_folders mirrors any folder), which keeps same-named
    # series of different export folders apart.
    path = dataset_folder(ctx.watch.path, ctx.watch.preserve_folders, ctx.group_dir)
    base = {
        uid: _series_name(name_for(ctx.group.name, headers[entries[0].relpath]), uid, ctx)
        for uid, entries in series.items()
    }
    names = _unique_names(base)
    plans = [
        _series_item(
            ctx,
            entries,
            headers,
            source_id=series_source_id(ctx.group_dir, uid),
            path=path,
            name=names[uid],
            uid=uid,
        )
        for uid, entries in series.items()
    ]
    return sorted(plans, key=lambda p: natural_key(p.name))


def _describe_series(series: Mapping[str, list[Entry]], *, redact: bool) -> str:
    # With de-identification on, UIDs must not reach the log, so the series are told
    # apart by a file of each instead.
    parts = []
    for i, (uid, entries) in enumerate(sorted(series.items(), key=lambda kv: kv[1][0].name)):
        label = f"series {i + 1}" if redact else (uid or "no SeriesInstanceUID")
        parts.append(f"{label}: {len(entries)} file(s), e.g. {entries[0].name}")
    return "; ".join(parts)


def _series_name(name: str, uid: str, ctx: _Group) -> str:
    """The name as `name_for` made it, unless it cannot be an item name at all. Sanitizing
    is name_for's job; this only keeps a bad template from producing an unusable key."""
    if name and name not in (".", "..") and "/" not in name and "\x00" not in name:
        return name
    return f"series_{_uid_tag(uid, 12)}" if ctx.watch.dicom.deidentify else uid


def _unique_names(base: Mapping[str, str]) -> dict[str, str]:
    """uid → item name, where series sharing a name get `_<8 hex of the UID's digest>`.

    The suffix depends only on the series itself, not on how many others share the name
    or how they sort, so a third same-named series arriving later renames nobody else.
    The loop handles the pathological rest (a literal name equal to a suffixed one, a
    digest prefix clash) by appending the full digest until all names differ; each
    round lengthens every clashing name, so it ends.
    """
    counts = Counter(base.values())
    names = {uid: f"{n}_{_uid_tag(uid, 8)}" if counts[n] > 1 else n for uid, n in base.items()}
    while True:
        counts = Counter(names.values())
        clashing = [uid for uid, n in names.items() if counts[n] > 1]
        if not clashing:
            return names
        for uid in clashing:
            names[uid] = f"{names[uid]}_{_uid_tag(uid, 64)}"


def _series_item(
    ctx: _Group,
    entries: list[Entry],
    headers: Mapping[str, DicomHeaderLike],
    *,
    source_id: str,
    path: str,
    name: str,
    uid: str,
) -> ItemPlan:
    first = entries[0]
    tags = _json_value(dict(headers[first.relpath].tags), f"DICOM tags of {first.relpath}")
    # The tags come last: they describe the pixels and are read from the files
    # themselves, so no static value or sidecar can contradict them.
    metadata = {**ctx.metadata, **tags}
    slots = (PlannedSlot(name=name, type="dicom", files=tuple(ctx.planned(e) for e in entries)),)
    return _finish(
        ctx,
        source_id=source_id,
        path=path,
        name=name,
        slots=slots,
        metadata=metadata,
        inputs={"series": _uid_tag(uid, 64)},
    )
