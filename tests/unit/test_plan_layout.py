"""plan/layout.py and plan/fingerprint.py: one file → one item, and the plan's digest."""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ingestd.config import Watch
from ingestd.core.fingerprint import canonical_json, fingerprint
from ingestd.core.model import Entry, ItemPlan, PlannedFile
from ingestd.plan.layout import PlanError, dataset_folder, plan_file, plan_fingerprint
from ingestd.plan.metadata import Sidecar, parse_sidecar
from pydantic import ValidationError


def make_watch(**overrides: Any) -> Watch:
    data: dict[str, Any] = {"name": "photos", "source": "/nonexistent/drop", "dataset": "photos"}
    data.update(overrides)
    return Watch.model_validate(data, context={"check_paths": False})


# --- dataset_folder ---------------------------------------------------------------------------

FOLDERS = [
    # (watch_path, preserve_folders, parent, folder)
    ("/", True, "", "/"),
    ("/", True, "x", "/x"),
    ("/", True, "x/y", "/x/y"),
    ("/", False, "", "/"),
    ("/", False, "x", "/"),
    ("/", False, "x/y", "/"),
    ("/a", True, "", "/a"),
    ("/a", True, "x", "/a/x"),
    ("/a", True, "x/y", "/a/x/y"),
    ("/a", False, "", "/a"),
    ("/a", False, "x", "/a"),
    ("/a", False, "x/y", "/a"),
    ("/a/b", True, "", "/a/b"),
    ("/a/b", True, "x", "/a/b/x"),
    ("/a/b", True, "x/y/z", "/a/b/x/y/z"),
    ("/a/b", False, "", "/a/b"),
    ("/a/b", False, "x/y/z", "/a/b"),
    ("/a b", True, "c d/é", "/a b/c d/é"),
    ("/", True, "line\nbreak", "/line\nbreak"),
]


@pytest.mark.parametrize(("watch_path", "preserve", "parent", "folder"), FOLDERS)
def test_dataset_folder(watch_path: str, preserve: bool, parent: str, folder: str) -> None:
    result = dataset_folder(watch_path, preserve, parent)
    assert result == folder
    assert result.startswith("/")
    assert result == "/" or not result.endswith("/")
    assert "//" not in result


@pytest.mark.parametrize(
    ("watch_path", "parent"),
    [("a", ""), ("/a/", ""), ("", ""), ("/", "/x"), ("/", "x/"), ("/a", "/")],
)
def test_dataset_folder_refuses_unnormalised_input(watch_path: str, parent: str) -> None:
    with pytest.raises(ValueError):
        dataset_folder(watch_path, True, parent)


@pytest.mark.parametrize("path", ["/", "photos", "/photos/", "/a//b/"])
def test_dataset_folder_takes_what_config_normalises(path: str) -> None:
    # The config's normalisation and dataset_folder's expectations must fit together.
    watch = make_watch(path=path)
    assert dataset_folder(watch.path, True, "x").endswith("/x")


# --- plan_file: layout ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "preserve", "relpath", "item_path", "key"),
    [
        ("/", True, "a.jpg", "/", "/a.jpg"),
        ("/", True, "cam1/2024/a.jpg", "/cam1/2024", "/cam1/2024/a.jpg"),
        ("/", False, "cam1/2024/a.jpg", "/", "/a.jpg"),
        ("/photos", True, "a.jpg", "/photos", "/photos/a.jpg"),
        ("/photos", True, "cam1/a.jpg", "/photos/cam1", "/photos/cam1/a.jpg"),
        ("/photos", False, "cam1/a.jpg", "/photos", "/photos/a.jpg"),
        ("/p/q", True, "x/y/z/a.jpg", "/p/q/x/y/z", "/p/q/x/y/z/a.jpg"),
    ],
)
def test_plan_file_layout(
    path: str, preserve: bool, relpath: str, item_path: str, key: str
) -> None:
    watch = make_watch(path=path, preserve_folders=preserve)
    plan = plan_file(watch, Entry(relpath, 10, 20), None)
    assert plan.source_id == relpath
    assert plan.path == item_path
    assert plan.name == relpath.rsplit("/", 1)[-1]
    assert plan.key == key
    assert plan.metadata == {}
    [slot] = plan.slots
    assert slot.name == "0"
    assert slot.files == (PlannedFile(plan.name, relpath, 10, 20),)
    assert slot.extra == {}


@pytest.mark.parametrize(
    ("name", "slot_type"),
    [
        ("a.jpg", "image"),
        ("a.PNG", "image"),
        ("v.mp4", "video"),
        ("s.dcm", "dicom"),
        ("n.txt", "file"),
        ("README", "file"),
    ],
)
def test_plan_file_slot_type(name: str, slot_type: str) -> None:
    assert plan_file(make_watch(), Entry(f"d/{name}", 1, 1), None).slots[0].type == slot_type


@pytest.mark.parametrize(
    "relpath",
    [
        "a\nb.jpg",
        "dir\twith tab/x\ry.png",
        "ctrl\x01\x1f\x7f/é 猫.jpg",
        "caf\udce9/undecodable\udcff.jpg",  # os.fsdecode's surrogates for non-UTF-8 bytes
        " spaced /  name  ",
        "#hash/~tilde$/a.jpg",
        "{name}/{stem}.jpg",
    ],
)
def test_plan_file_takes_any_posix_name(relpath: str) -> None:
    plan = plan_file(make_watch(path="/in"), Entry(relpath, 5, 6), None)
    parent, _, name = relpath.rpartition("/")
    assert plan.name == name
    assert plan.path == ("/in/" + parent if parent else "/in")
    assert plan.key == f"{plan.path}/{name}"
    # survives the ledger's JSON round trip unchanged
    assert ItemPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


@pytest.mark.parametrize("relpath", ["", "/a.jpg", "a/", "a//b", "./a", "a/../b", "a\x00b"])
def test_plan_file_refuses_malformed_relpaths(relpath: str) -> None:
    with pytest.raises(ValueError):
        plan_file(make_watch(), Entry(relpath, 1, 1), None)


# --- plan_file: metadata ---------------------------------------------------------------------------

STATIC = {"site": "lab", "exposure": 1, "camera": "static-cam"}


@pytest.mark.parametrize(
    ("metadata_cfg", "relpath", "sidecar", "expected"),
    [
        ({}, "a.jpg", None, {}),
        ({"static": STATIC}, "a.jpg", None, STATIC),
        (
            {"path_pattern": "{camera}/{date}/*"},
            "cam1/2024-05-01/a.jpg",
            None,
            {"camera": "cam1", "date": "2024-05-01"},
        ),
        ({"path_pattern": "{camera}/{date}/*"}, "cam1/a.jpg", None, {}),  # no match: no fields
        (
            {"static": STATIC, "path_pattern": "{camera}/*"},
            "cam9/a.jpg",
            None,
            {"site": "lab", "exposure": 1, "camera": "cam9"},  # path beats static
        ),
        (
            {"static": STATIC, "path_pattern": "{camera}/*"},
            "x/y/a.jpg",
            None,
            STATIC,  # pattern does not match: static stays
        ),
        ({"sidecar": "{name}.json"}, "a.jpg", {"label": "cat"}, {"label": "cat"}),
        (
            {"static": STATIC, "path_pattern": "{camera}/*", "sidecar": "{stem}.json"},
            "cam9/a.jpg",
            {"camera": "from-sidecar", "exposure": 2.5, "tags": ["x"]},
            {"site": "lab", "exposure": 2.5, "camera": "from-sidecar", "tags": ["x"]},
        ),
        ({"sidecar": "{name}.json"}, "a.jpg", {}, {}),
    ],
)
def test_plan_file_metadata(
    metadata_cfg: dict[str, Any],
    relpath: str,
    sidecar: dict[str, Any] | None,
    expected: dict[str, Any],
) -> None:
    watch = make_watch(metadata=metadata_cfg)
    sc = None if sidecar is None else Sidecar(relpath + ".json", 10, 1, sidecar)
    plan = plan_file(watch, Entry(relpath, 1, 1), sc)
    assert plan.metadata == expected
    assert watch.metadata.static == metadata_cfg.get("static", {})  # config untouched


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (b"[1, 2]", "holds a JSON array"),
        (b"{oops", "not valid JSON"),
        (b"", "empty"),
        (b"\xff", "not UTF-8"),
    ],
)
def test_plan_file_sidecar_errors(raw: bytes, what: str) -> None:
    watch = make_watch(metadata={"sidecar": "{name}.json"})
    sc = parse_sidecar("cam1/a.jpg.json", len(raw), 7, raw)
    with pytest.raises(PlanError) as info:
        plan_file(watch, Entry("cam1/a.jpg", 1, 1), sc)
    reason = info.value.reason
    assert str(info.value) == reason
    assert "sidecar cam1/a.jpg.json of cam1/a.jpg cannot be used" in reason
    assert what in reason
    assert "fix the file so it holds one JSON object, or delete it" in reason


def test_plan_file_refuses_sidecar_entries() -> None:
    watch = make_watch(metadata={"sidecar": "{name}.json"})
    with pytest.raises(ValueError, match="is a sidecar"):
        plan_file(watch, Entry("a.jpg.json", 1, 1), None)
    # without a sidecar template a .json file is an ordinary item
    assert plan_file(make_watch(), Entry("a.jpg.json", 1, 1), None).slots[0].type == "file"


def test_plan_file_refuses_a_sidecar_the_watch_does_not_use() -> None:
    with pytest.raises(ValueError, match="no sidecar"):
        plan_file(make_watch(), Entry("a.jpg", 1, 1), Sidecar("a.jpg.json", 2, 2, {}))


@pytest.mark.parametrize(
    ("metadata_cfg", "message"),
    [
        ({"path_pattern": "a**/b"}, "whole segment"),
        ({"path_pattern": "{a}/{b"}, "unbalanced"),
        ({"sidecar": "{name}"}, "literal text"),
    ],
)
def test_config_refuses_unusable_metadata_settings(
    metadata_cfg: dict[str, Any], message: str
) -> None:
    # Refused by the config, so the planner never meets them.
    with pytest.raises(ValidationError, match=message):
        make_watch(metadata=metadata_cfg)


# --- fingerprints ---------------------------------------------------------------------------------

BASE_CFG: dict[str, Any] = {
    "path": "/photos",
    "metadata": {
        "static": {"site": "lab"},
        "path_pattern": "{camera}/*",
        "sidecar": "{name}.json",
    },
}
BASE_ENTRY = Entry("cam1/a.jpg", 100, 1_000)
BASE_SIDECAR = Sidecar("cam1/a.jpg.json", 20, 2_000, {"label": "cat"})


def _fp(
    cfg: dict[str, Any] | None = None,
    entry: Entry = BASE_ENTRY,
    sidecar: Sidecar | None = BASE_SIDECAR,
) -> str:
    return plan_file(make_watch(**(cfg or BASE_CFG)), entry, sidecar).fingerprint


def _with_metadata(**changes: Any) -> dict[str, Any]:
    return {**BASE_CFG, "metadata": {**BASE_CFG["metadata"], **changes}}


CHANGES: dict[str, dict[str, Any]] = {
    "size": {"entry": Entry("cam1/a.jpg", 101, 1_000)},
    "mtime": {"entry": Entry("cam1/a.jpg", 100, 1_001)},
    "moved to another folder": {"entry": Entry("cam2/a.jpg", 100, 1_000)},
    "renamed": {"entry": Entry("cam1/b.jpg", 100, 1_000)},
    "static metadata": {"cfg": _with_metadata(static={"site": "lab2"})},
    "static metadata type": {"cfg": _with_metadata(static={"site": 1})},
    "path pattern": {"cfg": _with_metadata(path_pattern="{cam}/*")},
    "sidecar data": {"sidecar": Sidecar("cam1/a.jpg.json", 20, 2_000, {"label": "dog"})},
    "sidecar mtime only": {"sidecar": Sidecar("cam1/a.jpg.json", 20, 2_001, {"label": "cat"})},
    "sidecar size only": {"sidecar": Sidecar("cam1/a.jpg.json", 21, 2_000, {"label": "cat"})},
    "sidecar gone": {"sidecar": None},
    "watch path": {"cfg": {**BASE_CFG, "path": "/other"}},
    "preserve_folders": {"cfg": {**BASE_CFG, "preserve_folders": False}},
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_fingerprint_changes_with_any_input(change: str) -> None:
    assert _fp(**CHANGES[change]) != _fp()


def test_all_changed_fingerprints_differ_from_each_other() -> None:
    prints = {name: _fp(**kwargs) for name, kwargs in CHANGES.items()}
    assert len(set(prints.values())) == len(prints)


@pytest.mark.parametrize(
    "same",
    [
        {},
        {"cfg": {**BASE_CFG, "settle": "10s", "rescan": "1h", "include": ["*.jpg"]}},
        {"cfg": {**BASE_CFG, "name": "other-watch", "dataset": "other"}},
        {"cfg": _with_metadata(static={"site": "lab"}, sidecar="{name}.json")},
        {"sidecar": Sidecar("cam1/a.jpg.json", 20, 2_000, {"label": "cat"})},
        # a static value the sidecar overrides changes nothing the item is made of
        {"cfg": _with_metadata(static={"site": "lab", "label": "overridden"})},
    ],
)
def test_fingerprint_stays_equal_for_equal_inputs(same: dict[str, Any]) -> None:
    assert _fp(**same) == _fp()


def test_fingerprint_ignores_dict_order() -> None:
    a = Sidecar("cam1/a.jpg.json", 20, 2_000, {"x": 1, "y": {"p": 1, "q": 2}})
    b = Sidecar("cam1/a.jpg.json", 20, 2_000, {"y": {"q": 2, "p": 1}, "x": 1})
    assert _fp(sidecar=a) == _fp(sidecar=b)


def test_fingerprint_is_recomputable_from_the_stored_plan() -> None:
    # The ledger stores plans as JSON; the stored fields must be enough to check one.
    plan = plan_file(make_watch(**BASE_CFG), BASE_ENTRY, BASE_SIDECAR)
    back = ItemPlan.from_json(json.loads(plan.dumps()))
    assert back == plan
    assert (
        plan_fingerprint(back.path, back.name, back.slots, back.metadata, BASE_SIDECAR)
        == plan.fingerprint
    )


def test_plan_file_is_deterministic() -> None:
    watch = make_watch(**BASE_CFG)
    plans = {plan_file(watch, BASE_ENTRY, BASE_SIDECAR).dumps() for _ in range(3)}
    assert len(plans) == 1


@pytest.mark.parametrize(
    ("obj", "canonical"),
    [
        ({"b": 1, "a": [1, 2]}, '{"a":[1,2],"b":1}'),
        ({"é": "猫"}, '{"é":"猫"}'),
        ((1, 2), "[1,2]"),
        ({"a": None, "b": True, "c": 1.5}, '{"a":null,"b":true,"c":1.5}'),
        ("line\nbreak", '"line\\nbreak"'),
    ],
)
def test_canonical_json(obj: Any, canonical: str) -> None:
    assert canonical_json(obj) == canonical
    assert fingerprint(obj) == hashlib.sha256(canonical.encode()).hexdigest()[:32]


def test_fingerprint_shape_and_distinctions() -> None:
    fp = fingerprint({"a": 1})
    assert len(fp) == 32 and all(c in "0123456789abcdef" for c in fp)
    values: list[Any] = [1, 1.0, "1", True, None, [1], {"1": 1}, "\udce9", "é"]
    assert len({fingerprint(v) for v in values}) == len(values)


def test_fingerprint_refuses_non_json() -> None:
    with pytest.raises(TypeError):
        fingerprint({"a": object()})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


def _shuffled(value: Any, rng: random.Random) -> Any:
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rng) for v in value]
    return value


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(0, 2**32))
def test_fingerprint_depends_on_content_not_key_order(value: Any, seed: int) -> None:
    assert fingerprint(_shuffled(value, random.Random(seed))) == fingerprint(value)
    assert json.loads(canonical_json(value)) == value
