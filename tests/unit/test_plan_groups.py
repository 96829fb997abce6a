"""plan/groups.py: group membership, natural sort, and folder → item plans per mode."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ingestd.config import GroupConfig, Watch
from ingestd.core.model import Entry, ItemPlan, PlannedFile
from ingestd.plan.groups import (
    LAYOUT_KEY,
    GroupMembership,
    group_of,
    group_sidecar_relpath,
    layout_of,
    natural_key,
    plan_group,
    series_source_id,
)
from ingestd.plan.layout import PlanError
from ingestd.plan.metadata import Sidecar, parse_sidecar


def make_watch(group: dict[str, Any] | None = None, **overrides: Any) -> Watch:
    data: dict[str, Any] = {
        "name": "scans",
        "source": "/nonexistent/drop",
        "dataset": "scans",
        "group": {"mode": "slots", **(group or {})},
    }
    data.update(overrides)
    return Watch.model_validate(data, context={"check_paths": False})


def entries(group_dir: str, names: Sequence[str], size: int = 10, mtime: int = 1) -> list[Entry]:
    return [Entry(f"{group_dir}/{n}", size, mtime) for n in names]


@dataclass(frozen=True)
class FakeHeader:
    """Stands in for ingestd.media.dicom.DicomHeader: only what the tests need."""

    series_instance_uid: str
    instance_number: int | None = None
    patient_id: str = "P1"
    series_number: str = "1"
    series_description: str = "AX"
    tags: dict[str, Any] = field(default_factory=dict)


def by_instance(h: FakeHeader, name: str) -> tuple[Any, ...]:
    # missing numbers last, like the real key; the name is left to the planner's tiebreak
    return (h.instance_number is None, h.instance_number or 0)


def name_from(template: str, h: FakeHeader) -> str:
    return template.format(
        PatientID=h.patient_id, SeriesNumber=h.series_number, SeriesDescription=h.series_description
    )


def series(
    watch: Watch,
    group_dir: str,
    members: Sequence[Entry],
    headers: dict[str, FakeHeader],
    **kwargs: Any,
) -> list[ItemPlan]:
    return plan_group(
        watch,
        group_dir,
        members,
        headers=headers,
        order_key=by_instance,
        name_for=name_from,
        **kwargs,
    )


SERIES = {"mode": "series"}
BY_UID = {"mode": "series", "series_by": "uid"}
CHANNELS = {"mode": "channels"}


# --- natural_key --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ordered",
    [
        ["a", "B", "img1", "img2", "IMG3", "img10"],
        ["img1.png", "img2.png", "img10.png", "img100.png"],
        ["x", "x0", "x1", "x1a", "x1b", "x2", "x10"],
        ["1", "2", "10", "a", "b"],  # digits before letters, as in ASCII
        ["c", "c.dcm", "c0.dcm", "c1.dcm", "c_1.dcm"],  # punctuation around digits as ASCII
        ["img-1.png", "img.png", "img1.png", "img2.png", "img10.png", "img_1.png"],
        ["IMG3", "img3", "img03", "img003"],  # exact case, then fewer leading zeros
        ["", "0", "00", "a"],
        ["a1b2", "a1b10", "a2b1", "a10b1"],
        ["scan 2", "scan 10", "Scan 11"],
        ["é1", "é2", "é10", "Ö"],
        ["v1.2.3", "v1.2.10", "v1.10.0"],
        ["a\udcff1", "a\udcff2", "a\udcff10"],  # undecodable names still sort
    ],
)
def test_natural_key_orders(ordered: list[str]) -> None:
    for _ in range(5):
        shuffled = random.sample(ordered, len(ordered))
        assert sorted(shuffled, key=natural_key) == ordered


@pytest.mark.parametrize(("a", "b"), [("img2", "img02"), ("A", "a"), ("x1", "X1"), ("a", "a ")])
def test_natural_key_distinguishes_near_equal_names(a: str, b: str) -> None:
    assert natural_key(a) != natural_key(b)


@given(st.lists(st.text(), min_size=2, max_size=8, unique=True))
def test_natural_key_is_total(names: list[str]) -> None:
    keys = [natural_key(n) for n in names]
    # distinct strings, distinct keys: the sort never depends on the input order
    assert len(set(keys)) == len(names)
    assert sorted(names, key=natural_key) == sorted(reversed(names), key=natural_key)


@given(st.integers(0, 10**30), st.integers(0, 10**30))
def test_natural_key_numbers_by_value(m: int, n: int) -> None:
    assert (natural_key(f"f{m}.png") < natural_key(f"f{n}.png")) == (m < n)


# --- group_of -------------------------------------------------------------------------------------

MEMBERSHIP = [
    # (depth, relpath, kind, group_dir)
    (1, "a.jpg", "loose", None),
    (1, "g/a.jpg", "member", "g"),
    (1, "g/.done", "marker", "g"),
    (1, "g/sub/a.jpg", "ignored", "g"),
    (1, "g/sub/deeper/a.jpg", "ignored", "g"),
    (1, "g/sub/.done", "ignored", "g"),
    (1, ".done", "ignored", None),
    (2, "a.jpg", "loose", None),
    (2, "site/a.jpg", "loose", None),
    (2, "site/.done", "ignored", None),
    (2, "site/g/a.jpg", "member", "site/g"),
    (2, "site/g/.done", "marker", "site/g"),
    (2, "site/g/x/a.jpg", "ignored", "site/g"),
    (3, "a/b/c.jpg", "loose", None),
    (3, "a/b/g/c.jpg", "member", "a/b/g"),
    (3, "a/b/g/h/c.jpg", "ignored", "a/b/g"),
    (1, "g/.DONE", "member", "g"),  # the marker name is exact
    (1, "g/a b/c d.png", "ignored", "g"),
    (1, "é/猫.png", "member", "é"),
]


@pytest.mark.parametrize(("depth", "relpath", "kind", "group_dir"), MEMBERSHIP)
def test_group_of(depth: int, relpath: str, kind: str, group_dir: str | None) -> None:
    group = GroupConfig(mode="slots", depth=depth, ready_marker=".done")
    assert group_of(group, relpath) == GroupMembership(kind, group_dir)  # type: ignore[arg-type]


@pytest.mark.parametrize("relpath", [".done", "g/.done", "g/h/.done"])
def test_group_of_without_marker_treats_the_name_as_any_file(relpath: str) -> None:
    group = GroupConfig(mode="slots", depth=2)
    expected = {".done": "loose", "g/.done": "loose", "g/h/.done": "member"}[relpath]
    assert group_of(group, relpath).kind == expected


@pytest.mark.parametrize("relpath", ["", "/a.jpg", "g/", "g//a", "./a", "g/../a"])
def test_group_of_refuses_malformed_relpaths(relpath: str) -> None:
    with pytest.raises(ValueError):
        group_of(GroupConfig(mode="slots"), relpath)


@pytest.mark.parametrize(
    ("template", "group_dir", "expected"),
    [
        (None, "g", None),
        ("{name}.json", "scan1", "scan1.json"),
        ("{name}.json", "site/scan1", "site/scan1.json"),
        ("meta-{name}.json", "a/b/c", "a/b/meta-c.json"),
        ("{stem}.json", "scan.v2", "scan.json"),
    ],
)
def test_group_sidecar_relpath(template: str | None, group_dir: str, expected: str | None) -> None:
    watch = make_watch(metadata={"sidecar": template} if template else {})
    assert group_sidecar_relpath(watch, group_dir) == expected


# --- plan_group: slots -------------------------------------------------------------------------


def test_slots_natural_order_and_names() -> None:
    names = ["img10.png", "B.jpg", "img2.png", "a.jpg", "IMG3.png", "img1.png"]
    [plan] = plan_group(make_watch(), "scan1", entries("scan1", names))
    assert [s.name for s in plan.slots] == ["0", "1", "2", "3", "4", "5"]
    assert [s.files[0].name for s in plan.slots] == [
        "a.jpg",
        "B.jpg",
        "img1.png",
        "img2.png",
        "IMG3.png",
        "img10.png",
    ]
    assert plan.name == "scan1"
    assert plan.source_id == "scan1"
    assert plan.path == "/"
    assert plan.key == "/scan1"
    assert plan.metadata == {}
    assert plan.slots[2].files == (PlannedFile("img1.png", "scan1/img1.png", 10, 1),)


@pytest.mark.parametrize(
    ("name", "slot_type"),
    [
        ("a.jpg", "image"),
        ("v.MP4", "video"),
        ("s.dcm", "dicom"),
        ("n.txt", "file"),
        ("raw", "file"),
    ],
)
def test_slots_types(name: str, slot_type: str) -> None:
    [plan] = plan_group(make_watch(), "g", entries("g", [name]))
    assert plan.slots[0].type == slot_type


def test_slots_header_marks_extensionless_dicom() -> None:
    members = entries("g", ["IM0001", "notes.txt"])
    [plan] = plan_group(make_watch(), "g", members, headers={"g/IM0001": FakeHeader("1.2")})
    assert [s.type for s in plan.slots] == ["dicom", "file"]


@pytest.mark.parametrize(
    ("n", "columns", "row_lengths"),
    [(1, 1, [1]), (2, 2, [2]), (3, 2, [2, 1]), (4, 2, [2, 2]), (5, 3, [3, 2]), (10, 4, [4, 4, 2])],
)
def test_slots_layout_grid(n: int, columns: int, row_lengths: list[int]) -> None:
    [plan] = plan_group(make_watch(), "g", entries("g", [f"f{i}.png" for i in range(n)]))
    layout = layout_of(plan)
    assert layout is not None
    assert layout["type"] == "grid"
    assert layout["columns"] == columns
    assert [len(r) for r in layout["rows"]] == row_lengths
    assert [cell for row in layout["rows"] for cell in row] == [[str(i)] for i in range(n)]
    # the hint rides on the first slot only
    assert plan.slots[0].extra == {LAYOUT_KEY: layout}
    assert all(s.extra == {} for s in plan.slots[1:])


def test_slots_round_trip_through_the_ledger_json() -> None:
    [plan] = plan_group(make_watch(), "g", entries("g", ["b.png", "a.png"]))
    assert ItemPlan.from_json(json.loads(plan.dumps())) == plan
    assert layout_of(ItemPlan.from_json(json.loads(plan.dumps()))) == layout_of(plan)


# --- plan_group: channels ------------------------------------------------------------------------


def test_channels_slots_named_after_files() -> None:
    names = ["red10.png", "red2.png", "Blue.png"]
    members = entries("cell", names)
    sizes = {e.relpath: (64, 32) for e in members}
    [plan] = plan_group(make_watch(CHANNELS), "cell", members, sizes=sizes)
    assert [s.name for s in plan.slots] == ["Blue.png", "red2.png", "red10.png"]
    assert {s.type for s in plan.slots} == {"image"}
    assert [s.files[0].relpath for s in plan.slots] == [
        "cell/Blue.png",
        "cell/red2.png",
        "cell/red10.png",
    ]
    # one cell holding every channel: layers of one view
    assert layout_of(plan) == {
        "type": "grid",
        "columns": 1,
        "rows": [[["Blue.png", "red2.png", "red10.png"]]],
    }


@pytest.mark.parametrize(
    ("dims", "odd", "odd_size", "common_size"),
    [
        ({"a.png": (10, 20), "b.png": (10, 20), "c.png": (11, 20)}, "c.png", "11×20", "10×20"),
        ({"a.png": (5, 5), "b.png": (10, 20), "c.png": (10, 20)}, "a.png", "5×5", "10×20"),
        ({"a.png": (10, 20), "b.png": (20, 10)}, "b.png", "20×10", "10×20"),  # tie: first wins
    ],
)
def test_channels_size_mismatch(
    dims: dict[str, tuple[int, int]], odd: str, odd_size: str, common_size: str
) -> None:
    members = entries("cell", list(dims))
    sizes = {f"cell/{n}": wh for n, wh in dims.items()}
    with pytest.raises(PlanError) as info:
        plan_group(make_watch(CHANNELS), "cell", members, sizes=sizes)
    reason = info.value.reason
    assert f"channel {odd} is {odd_size}" in reason
    assert f"are {common_size}" in reason
    assert "folder cell" in reason
    assert "same width and height" in reason


def test_channels_size_mismatch_names_further_odd_files() -> None:
    dims = {"a.png": (1, 1), "b.png": (1, 1), "c.png": (1, 1), "d.png": (2, 2), "e.png": (3, 3)}
    members = entries("cell", list(dims))
    with pytest.raises(PlanError, match=r"d\.png is 2×2 .*and e\.png differ too"):
        plan_group(
            make_watch(CHANNELS),
            "cell",
            members,
            sizes={f"cell/{n}": wh for n, wh in dims.items()},
        )


@pytest.mark.parametrize(
    ("count", "limit", "ok"), [(16, None, True), (17, None, False), (3, 2, False), (2, 2, True)]
)
def test_channels_limit(count: int, limit: int | None, ok: bool) -> None:
    group = dict(CHANNELS) | ({"max_channels": limit} if limit else {})
    members = entries("cell", [f"c{i}.png" for i in range(count)])
    sizes = {e.relpath: (8, 8) for e in members}
    if ok:
        [plan] = plan_group(make_watch(group), "cell", members, sizes=sizes)
        assert len(plan.slots) == count
    else:
        with pytest.raises(PlanError, match=rf"holds {count} images but group.max_channels is"):
            plan_group(make_watch(group), "cell", members, sizes=sizes)


def test_channels_refuse_non_images() -> None:
    members = entries("cell", ["a.png", "notes.txt", "clip.mp4", "b.tif"])
    sizes = {e.relpath: (8, 8) for e in members}
    with pytest.raises(PlanError) as info:
        plan_group(make_watch(CHANNELS), "cell", members, sizes=sizes)
    assert "not images: clip.mp4, notes.txt" in info.value.reason


def test_channels_unreadable_size_is_a_plan_error() -> None:
    members = entries("cell", ["a.png", "b.png"])
    with pytest.raises(PlanError, match=r"cannot read the size of b\.png"):
        plan_group(make_watch(CHANNELS), "cell", members, sizes={"cell/a.png": (8, 8)})


def test_channels_need_sizes() -> None:
    with pytest.raises(ValueError, match="sizes"):
        plan_group(make_watch(CHANNELS), "cell", entries("cell", ["a.png"]))


# --- plan_group: series (by folder) ---------------------------------------------------------------


def test_series_orders_by_the_handed_key() -> None:
    # shuffled names: the order comes from the headers, not from the names
    numbers = {"zz.dcm": 1, "b.dcm": 2, "a10.dcm": 3, "a2.dcm": 4, "c.dcm": None, "c0.dcm": None}
    members = entries("ct", random.sample(list(numbers), len(numbers)))
    headers = {f"ct/{n}": FakeHeader("1.2.3", i) for n, i in numbers.items()}
    [plan] = series(make_watch(SERIES), "ct", members, headers)
    [slot] = plan.slots
    assert slot.name == "ct"
    assert slot.type == "dicom"
    # equal keys (no InstanceNumber) fall back to natural name order
    assert [f.name for f in slot.files] == [
        "zz.dcm",
        "b.dcm",
        "a10.dcm",
        "a2.dcm",
        "c.dcm",
        "c0.dcm",
    ]
    assert plan.name == "ct"
    assert plan.source_id == "ct"
    assert layout_of(plan) is None


def test_series_ignores_non_dicom_and_takes_extensionless_dicom() -> None:
    members = entries("ct", ["1.dcm", "IM2", "report.pdf", "thumb.png", "2.DICOM"])
    headers = {
        "ct/1.dcm": FakeHeader("9", 1),
        "ct/IM2": FakeHeader("9", 2),
        "ct/2.DICOM": FakeHeader("9", 3),
    }
    [plan] = series(make_watch(SERIES), "ct", members, headers)
    assert [f.name for f in plan.slots[0].files] == ["1.dcm", "IM2", "2.DICOM"]


def test_series_without_dicom_is_nothing_yet() -> None:
    members = entries("ct", ["report.pdf", "thumb.png"])
    assert series(make_watch(SERIES), "ct", members, {}) == []
    # nothing DICOM, so no headers needed either
    assert plan_group(make_watch(SERIES), "ct", members) == []


def test_series_needs_headers_for_dicom() -> None:
    with pytest.raises(ValueError, match="headers"):
        plan_group(make_watch(SERIES), "ct", entries("ct", ["1.dcm"]))


def test_series_unreadable_dicom_is_a_plan_error() -> None:
    members = entries("ct", ["1.dcm", "2.dcm"])
    with pytest.raises(PlanError, match=r"2\.dcm could not be read as DICOM"):
        series(make_watch(SERIES), "ct", members, {"ct/1.dcm": FakeHeader("9", 1)})


def test_series_mixed_uids_is_an_error_naming_them() -> None:
    members = entries("ct", ["a.dcm", "b.dcm", "c.dcm"])
    headers = {
        "ct/a.dcm": FakeHeader("1.2.840.1", 1),
        "ct/b.dcm": FakeHeader("1.2.840.2", 1),
        "ct/c.dcm": FakeHeader("1.2.840.1", 2),
    }
    with pytest.raises(PlanError) as info:
        series(make_watch(SERIES), "ct", members, headers)
    reason = info.value.reason
    assert "holds 2 DICOM series" in reason
    assert "1.2.840.1: 2 file(s), e.g. a.dcm" in reason
    assert "1.2.840.2: 1 file(s), e.g. b.dcm" in reason
    assert "series_by: uid" in reason


def test_series_mixed_uids_error_hides_uids_when_deidentifying() -> None:
    members = entries("ct", ["a.dcm", "b.dcm"])
    headers = {"ct/a.dcm": FakeHeader("1.2.840.1"), "ct/b.dcm": FakeHeader("1.2.840.2")}
    watch = make_watch(SERIES, dicom={"deidentify": True})
    with pytest.raises(PlanError) as info:
        series(watch, "ct", members, headers)
    assert "1.2.840" not in info.value.reason
    assert "series 1: 1 file(s), e.g. a.dcm" in info.value.reason


def test_series_metadata_tags_of_first_file_in_order_win() -> None:
    watch = make_watch(
        SERIES,
        metadata={
            "static": {"Modality": "static", "site": "lab"},
            "path_pattern": "{patient}/*",
            "sidecar": "{name}.json",
        },
    )
    members = entries("ct", ["b.dcm", "a.dcm"])
    headers = {
        "ct/a.dcm": FakeHeader("9", 2, tags={"Modality": "MR"}),
        "ct/b.dcm": FakeHeader("9", 1, tags={"Modality": "CT", "Rows": 512, "Spacing": (0.5, 0.5)}),
    }
    sidecar = Sidecar("ct.json", 5, 5, {"site": "sidecar", "patient": "from-sidecar", "Rows": "x"})
    [plan] = series(watch, "ct", members, headers, sidecar=sidecar)
    assert plan.metadata == {
        "site": "sidecar",
        "patient": "from-sidecar",
        "Modality": "CT",
        "Rows": 512,
        "Spacing": [0.5, 0.5],  # tuples become JSON arrays
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [(float("nan"), None), (float("inf"), None), (True, True), ((1, (2, 3)), [1, [2, 3]])],
)
def test_series_tags_become_plain_json(value: Any, expected: Any) -> None:
    headers = {"ct/a.dcm": FakeHeader("9", tags={"T": value})}
    [plan] = series(make_watch(SERIES), "ct", entries("ct", ["a.dcm"]), headers)
    assert plan.metadata == {"T": expected}
    json.dumps(plan.metadata, allow_nan=False)


def test_series_tags_refuse_non_json_values() -> None:
    headers = {"ct/a.dcm": FakeHeader("9", tags={"T": b"raw"})}
    with pytest.raises(TypeError, match="not a JSON value"):
        series(make_watch(SERIES), "ct", entries("ct", ["a.dcm"]), headers)


def test_series_default_callables_come_from_media_dicom() -> None:
    from ingestd.media import dicom  # a module of ours: a failed import is a failure

    header = dicom.DicomHeader(
        sop_instance_uid="1.1",
        series_instance_uid="1.2",
        study_instance_uid="1.3",
        instance_number=2,
        image_position=None,
        image_orientation=None,
        patient_id="P",
        series_number="3",
        series_description="AX",
        modality="CT",
        tags={},
    )
    first = replace(header, sop_instance_uid="1.0", instance_number=1)
    members = entries("ct", ["x.dcm", "y.dcm"])
    headers = {"ct/x.dcm": header, "ct/y.dcm": first}
    [plan] = plan_group(make_watch(SERIES), "ct", members, headers=headers)
    assert [f.name for f in plan.slots[0].files] == ["y.dcm", "x.dcm"]
    [split] = plan_group(make_watch(BY_UID), "ct", members, headers=headers)
    assert split.name == dicom.series_item_name(make_watch(BY_UID).group.name, first)


# --- plan_group: series_by uid ----------------------------------------------------------------------


def two_series() -> tuple[list[Entry], dict[str, FakeHeader]]:
    members = entries("export", ["f1.dcm", "f2.dcm", "f3.dcm", "f4.dcm", "f5.dcm", "note.txt"])
    headers = {
        "export/f1.dcm": FakeHeader("1.1", 2, "P7", "2", "COR", {"SeriesDescription": "COR"}),
        "export/f2.dcm": FakeHeader("1.2", 1, "P7", "1", "AX", {"SeriesDescription": "AX"}),
        "export/f3.dcm": FakeHeader("1.1", 1, "P7", "2", "COR", {"SeriesDescription": "COR"}),
        "export/f4.dcm": FakeHeader("1.2", 3, "P7", "1", "AX", {"SeriesDescription": "AX"}),
        "export/f5.dcm": FakeHeader("1.2", 2, "P7", "1", "AX", {"SeriesDescription": "AX"}),
    }
    return members, headers


def test_uid_splits_into_one_item_per_series() -> None:
    members, headers = two_series()
    plans = series(make_watch(BY_UID), "export", members, headers)
    assert [p.name for p in plans] == ["P7_1_AX", "P7_2_COR"]
    ax, cor = plans
    assert [f.name for f in ax.slots[0].files] == ["f2.dcm", "f5.dcm", "f4.dcm"]
    assert [f.name for f in cor.slots[0].files] == ["f3.dcm", "f1.dcm"]
    assert [s.name for s in ax.slots] == ["P7_1_AX"]
    assert ax.slots[0].type == "dicom"
    # the export folder is mirrored as a dataset folder holding its series
    assert ax.path == cor.path == "/export"
    assert ax.source_id == series_source_id("export", "1.2")
    assert cor.source_id == series_source_id("export", "1.1")
    assert ax.source_id != cor.source_id
    assert ax.source_id.startswith("export#")
    assert "1.2" not in ax.source_id.removeprefix("export#")
    assert ax.metadata == {"SeriesDescription": "AX"}
    assert ax.fingerprint != cor.fingerprint


def test_uid_custom_template() -> None:
    members, headers = two_series()
    watch = make_watch(BY_UID | {"name": "{SeriesDescription}-{SeriesNumber}"})
    assert [p.name for p in series(watch, "export", members, headers)] == ["AX-1", "COR-2"]


@pytest.mark.parametrize(("preserve", "path"), [(True, "/in/site/export"), (False, "/in")])
def test_uid_paths_follow_preserve_folders(preserve: bool, path: str) -> None:
    members = entries("site/export", ["a.dcm"])
    headers = {"site/export/a.dcm": FakeHeader("1.1")}
    watch = make_watch(BY_UID | {"depth": 2}, path="/in", preserve_folders=preserve)
    [plan] = series(watch, "site/export", members, headers)
    assert plan.path == path


def test_uid_name_collisions_get_stable_suffixes() -> None:
    members = entries("export", ["a.dcm", "b.dcm", "c.dcm"])
    same = {"patient_id": "P", "series_number": "1", "series_description": "AX"}
    headers = {
        "export/a.dcm": FakeHeader("1.1", **same),
        "export/b.dcm": FakeHeader("1.2", **same),
        "export/c.dcm": FakeHeader("1.3", patient_id="Q"),
    }
    watch = make_watch(BY_UID)
    two = {p.source_id: p.name for p in series(watch, "export", members[:2], headers)}
    three = {p.source_id: p.name for p in series(watch, "export", members, headers)}
    names = sorted(two.values())
    assert len(set(names)) == 2
    assert all(n.startswith("P_1_AX_") and len(n) == len("P_1_AX_") + 8 for n in names)
    # adding a series renames none of the others, and the unique one keeps its name
    assert {k: three[k] for k in two} == two
    assert three[series_source_id("export", "1.3")] == "Q_1_AX"
    # the same inputs in another order give the same names
    again = series(watch, "export", list(reversed(members)), headers)
    assert {p.source_id: p.name for p in again} == three


def test_uid_collision_with_a_literal_suffixed_name_still_resolves() -> None:
    from ingestd.plan.groups import _uid_tag

    members = entries("export", ["a.dcm", "b.dcm", "c.dcm"])
    clash = f"X_{_uid_tag('1.1', 8)}"
    headers = {
        "export/a.dcm": FakeHeader("1.1", patient_id="X"),
        "export/b.dcm": FakeHeader("1.2", patient_id="X"),
        "export/c.dcm": FakeHeader("1.3", patient_id=clash),
    }
    watch = make_watch(BY_UID | {"name": "{PatientID}"})
    plans = series(watch, "export", members, headers)
    assert len({p.name for p in plans}) == 3


@pytest.mark.parametrize(("bad", "deid"), [("", False), ("..", False), ("a/b", False), ("", True)])
def test_uid_unusable_names_fall_back(bad: str, deid: bool) -> None:
    headers = {"export/a.dcm": FakeHeader("1.2.3")}
    watch = make_watch(BY_UID, dicom={"deidentify": deid})
    [plan] = plan_group(
        watch,
        "export",
        entries("export", ["a.dcm"]),
        headers=headers,
        order_key=by_instance,
        name_for=lambda template, h: bad,
    )
    if deid:
        assert plan.name.startswith("series_") and "1.2.3" not in plan.name
    else:
        assert plan.name == "1.2.3"


def test_uid_missing_series_uid_is_a_plan_error() -> None:
    headers = {"export/a.dcm": FakeHeader("1.1"), "export/b.dcm": FakeHeader("")}
    with pytest.raises(PlanError, match=r"b\.dcm have no SeriesInstanceUID"):
        series(make_watch(BY_UID), "export", entries("export", ["a.dcm", "b.dcm"]), headers)


def test_folder_mode_accepts_one_series_without_uid() -> None:
    headers = {"ct/a.dcm": FakeHeader(""), "ct/b.dcm": FakeHeader("")}
    [plan] = series(make_watch(SERIES), "ct", entries("ct", ["a.dcm", "b.dcm"]), headers)
    assert len(plan.slots[0].files) == 2


# --- ready marker, sidecars, metadata ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["slots", "channels", "series"])
def test_ready_marker_is_never_a_slot(mode: str) -> None:
    watch = make_watch({"mode": mode, "ready_marker": "READY.dcm"})
    files = entries("g", ["a.dcm", "b.dcm"])
    marker = Entry("g/READY.dcm", 0, 5)
    kwargs: dict[str, Any] = {
        "sizes": {},
        "headers": {e.relpath: FakeHeader("9", i) for i, e in enumerate([*files, marker])},
        "order_key": by_instance,
        "name_for": name_from,
    }
    if mode == "channels":
        watch = make_watch({"mode": mode, "ready_marker": "READY.png"})
        files = entries("g", ["a.png", "b.png"])
        marker = Entry("g/READY.png", 0, 5)
        kwargs["sizes"] = {e.relpath: (4, 4) for e in files}  # the marker has no size
    [without] = plan_group(watch, "g", files, **kwargs)
    [with_marker] = plan_group(watch, "g", [*files, marker], **kwargs)
    assert with_marker == without  # same plan, same fingerprint: the marker changes nothing
    assert all(marker.relpath not in [f.relpath for f in s.files] for s in with_marker.slots)
    # a group holding only its marker has nothing to sync yet
    assert plan_group(watch, "g", [marker], **kwargs) == []


def test_empty_group_is_nothing_yet() -> None:
    assert plan_group(make_watch(), "g", []) == []
    assert plan_group(make_watch(CHANNELS), "g", [], sizes={}) == []


def test_sidecar_named_files_are_never_slots() -> None:
    watch = make_watch(metadata={"sidecar": "{name}.json"})
    [plan] = plan_group(watch, "g", entries("g", ["a.png", "a.png.json", "other.json"]))
    assert [s.files[0].name for s in plan.slots] == ["a.png"]
    assert plan_group(watch, "g", entries("g", ["only.json"])) == []


@pytest.mark.parametrize(
    ("metadata_cfg", "group_dir", "sidecar", "expected"),
    [
        ({}, "s/g", None, {}),
        ({"static": {"site": "lab", "n": 1}}, "s/g", None, {"site": "lab", "n": 1}),
        # a file-path pattern binds the folders (the file part matches nothing)
        ({"path_pattern": "{site}/{scan}/*"}, "s/g", None, {"site": "s", "scan": "g"}),
        # a folder pattern binds the folder itself
        ({"path_pattern": "{site}/{scan}"}, "s/g", None, {"site": "s", "scan": "g"}),
        ({"path_pattern": "{site}/*"}, "s/g", None, {"site": "s"}),  # as a folder pattern
        ({"path_pattern": "{a}/{b}/{c}/*"}, "s/g", None, {}),  # no match: no fields
        (
            {"static": {"site": "lab", "n": 1}, "path_pattern": "{site}/*/*"},
            "s/g",
            None,
            {"site": "s", "n": 1},  # path beats static
        ),
        (
            {"static": {"site": "lab"}, "path_pattern": "{site}/{scan}", "sidecar": "{name}.json"},
            "s/g",
            {"scan": "side", "extra": [1]},
            {"site": "s", "scan": "side", "extra": [1]},  # sidecar beats path
        ),
    ],
)
def test_group_metadata(
    metadata_cfg: dict[str, Any],
    group_dir: str,
    sidecar: dict[str, Any] | None,
    expected: dict[str, Any],
) -> None:
    watch = make_watch({"depth": 2}, metadata=metadata_cfg)
    sc = None if sidecar is None else Sidecar(group_dir + ".json", 3, 3, sidecar)
    [plan] = plan_group(watch, group_dir, entries(group_dir, ["a.png"]), sidecar=sc)
    assert plan.metadata == expected


def test_sidecar_errors_fail_the_group() -> None:
    watch = make_watch(metadata={"sidecar": "{name}.json"})
    sc = parse_sidecar("g.json", 3, 3, b"[1]")
    with pytest.raises(PlanError) as info:
        plan_group(watch, "g", entries("g", ["a.png"]), sidecar=sc)
    assert "sidecar g.json of folder g cannot be used: holds a JSON array" in info.value.reason


def test_sidecar_contract() -> None:
    sc = Sidecar("g.json", 1, 1, {})
    with pytest.raises(ValueError, match="no sidecar template"):
        plan_group(make_watch(), "g", entries("g", ["a.png"]), sidecar=sc)
    watch = make_watch(metadata={"sidecar": "{name}.json"})
    with pytest.raises(ValueError, match="is not g's"):
        plan_group(watch, "g", entries("g", ["a.png"]), sidecar=replace(sc, relpath="h.json"))


# --- layout: dataset folders ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("watch_path", "preserve", "depth", "group_dir", "item_path", "key"),
    [
        ("/", True, 1, "g", "/", "/g"),
        ("/", False, 1, "g", "/", "/g"),
        ("/", True, 2, "site/g", "/site", "/site/g"),
        ("/", False, 2, "site/g", "/", "/g"),
        ("/in", True, 3, "a/b/g", "/in/a/b", "/in/a/b/g"),
        ("/in", False, 3, "a/b/g", "/in", "/in/g"),
        ("/x/y", True, 1, "g h", "/x/y", "/x/y/g h"),
    ],
)
@pytest.mark.parametrize("mode", ["slots", "channels", "series"])
def test_group_layout(
    mode: str,
    watch_path: str,
    preserve: bool,
    depth: int,
    group_dir: str,
    item_path: str,
    key: str,
) -> None:
    watch = make_watch({"mode": mode, "depth": depth}, path=watch_path, preserve_folders=preserve)
    members = entries(group_dir, ["a.png", "b.dcm"] if mode != "channels" else ["a.png"])
    [plan] = plan_group(
        watch,
        group_dir,
        members,
        sizes={e.relpath: (2, 2) for e in members},
        headers={f"{group_dir}/b.dcm": FakeHeader("9")},
        order_key=by_instance,
        name_for=name_from,
    )
    assert plan.path == item_path
    assert plan.key == key
    assert plan.source_id == group_dir
    assert plan.name == group_dir.rsplit("/", 1)[-1]


# --- contract ---------------------------------------------------------------------------------------


def test_contract_errors() -> None:
    ungrouped = Watch.model_validate(
        {"name": "w", "source": "/x", "dataset": "d"}, context={"check_paths": False}
    )
    with pytest.raises(ValueError, match="not grouped"):
        plan_group(ungrouped, "g", [])
    with pytest.raises(ValueError, match="not at depth 1"):
        plan_group(make_watch(), "a/g", entries("a/g", ["x.png"]))
    with pytest.raises(ValueError, match="not at depth 2"):
        plan_group(make_watch({"depth": 2}), "g", entries("g", ["x.png"]))
    with pytest.raises(ValueError, match="not directly inside g"):
        plan_group(make_watch(), "g", [Entry("g/sub/x.png", 1, 1)])
    with pytest.raises(ValueError, match="not directly inside g"):
        plan_group(make_watch(), "g", [Entry("h/x.png", 1, 1)])
    with pytest.raises(ValueError, match="listed twice"):
        plan_group(make_watch(), "g", [Entry("g/x.png", 1, 1), Entry("g/x.png", 2, 2)])
    for bad in ["", "/g", "g/", "..", "g/../h"]:
        with pytest.raises(ValueError):
            plan_group(make_watch(), bad, [])


# --- fingerprint --------------------------------------------------------------------------------------


def base_case() -> dict[str, Any]:
    """Inputs exercising every part the fingerprint covers, for one mode at a time."""
    return {
        "watch": {
            "group": {"mode": "channels"},
            "metadata": {
                "static": {"site": "lab"},
                "path_pattern": "{scan}/*",
                "sidecar": "{name}.json",
            },
        },
        "members": [("a.png", 10, 1), ("b.png", 20, 2)],
        "sizes": {"a.png": (4, 4), "b.png": (4, 4)},
        "sidecar": ("g.json", 5, 5, {"label": "x"}),
    }


def run_case(case: dict[str, Any]) -> ItemPlan:
    watch = make_watch(**case["watch"])
    members = [Entry(f"g/{n}", s, m) for n, s, m in case["members"]]
    rel, size, mtime, data = case["sidecar"]
    [plan] = plan_group(
        watch,
        "g",
        members,
        sizes={f"g/{n}": wh for n, wh in case["sizes"].items()},
        sidecar=Sidecar(rel, size, mtime, data),
    )
    return plan


def _set(path: str, value: Any) -> Any:
    def mutate(case: dict[str, Any]) -> None:
        *outer, last = path.split(".")
        target = case
        for k in outer:
            target = target[k]
        target[last] = value

    return mutate


CHANGES = {
    "member size": lambda c: c.update(members=[("a.png", 11, 1), ("b.png", 20, 2)]),
    "member mtime": lambda c: c.update(members=[("a.png", 10, 9), ("b.png", 20, 2)]),
    "member added": lambda c: (
        c["members"].append(("c.png", 1, 1)),
        c["sizes"].update({"c.png": (4, 4)}),
    ),
    "member removed": lambda c: c["members"].pop(),
    "member renamed": lambda c: (
        c.update(members=[("a.png", 10, 1), ("c.png", 20, 2)]),
        c["sizes"].update({"c.png": (4, 4)}),
    ),
    "image size": lambda c: c.update(sizes={"a.png": (5, 5), "b.png": (5, 5)}),
    "mode": _set("watch.group", {"mode": "slots"}),
    "static": _set("watch.metadata.static", {"site": "other"}),
    "path pattern": _set("watch.metadata.path_pattern", "{x}/*"),
    "watch path": lambda c: c["watch"].update(path="/elsewhere"),
    "sidecar data": lambda c: c.update(sidecar=("g.json", 5, 5, {"label": "y"})),
    "sidecar mtime only": lambda c: c.update(sidecar=("g.json", 5, 6, {"label": "x"})),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_fingerprint_changes_with_every_input(change: str) -> None:
    before = run_case(base_case())
    case = base_case()
    CHANGES[change](case)
    assert run_case(case).fingerprint != before.fingerprint


def test_fingerprint_changes_are_pairwise_distinct() -> None:
    prints = {run_case(base_case()).fingerprint}
    for change in CHANGES.values():
        case = base_case()
        change(case)
        prints.add(run_case(case).fingerprint)
    assert len(prints) == len(CHANGES) + 1


def test_fingerprint_is_stable() -> None:
    case = base_case()
    first = run_case(case)
    for perm in itertools.permutations(case["members"]):
        shuffled = base_case()
        shuffled["members"] = list(perm)
        assert run_case(shuffled) == first
    # unrelated entries in the mappings change nothing
    extra = base_case()
    extra["sizes"]["zzz.png"] = (1, 1)
    assert run_case(extra) == first


def test_series_fingerprint_follows_headers() -> None:
    members = entries("ct", ["a.dcm", "b.dcm"])
    headers = {"ct/a.dcm": FakeHeader("9", 1), "ct/b.dcm": FakeHeader("9", 2)}
    [base] = series(make_watch(SERIES), "ct", members, headers)
    [same] = series(make_watch(SERIES), "ct", list(reversed(members)), dict(headers))
    assert same == base
    reordered = {"ct/a.dcm": FakeHeader("9", 2), "ct/b.dcm": FakeHeader("9", 1)}
    [other_order] = series(make_watch(SERIES), "ct", members, reordered)
    assert other_order.fingerprint != base.fingerprint
    retagged = {k: replace(h, tags={"Modality": "CT"}) for k, h in headers.items()}
    [other_tags] = series(make_watch(SERIES), "ct", members, retagged)
    assert other_tags.fingerprint != base.fingerprint
    new_uid = {k: replace(h, series_instance_uid="10") for k, h in headers.items()}
    [other_uid] = series(make_watch(SERIES), "ct", members, new_uid)
    assert other_uid.fingerprint != base.fingerprint
    # a non-DICOM file beside the series is ignored, and so leaves no trace
    [with_pdf] = series(make_watch(SERIES), "ct", [*members, Entry("ct/r.pdf", 1, 1)], headers)
    assert with_pdf == base
