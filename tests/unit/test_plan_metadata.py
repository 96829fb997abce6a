"""plan/metadata.py: path patterns, sidecars, merging and type consistency."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ingestd.plan.metadata import (
    Sidecar,
    bind_path_pattern,
    build_metadata,
    check_sidecar_template,
    compile_path_pattern,
    is_sidecar_name,
    parse_sidecar,
    sidecar_name,
    sidecar_targets,
    stem,
    type_conflicts,
    value_type,
)

# --- bind_path_pattern ----------------------------------------------------------------------

BINDS: list[tuple[str, str, dict[str, str] | None]] = [
    # the docs/design.md example
    ("{camera}/{date}/*", "cam1/2024-05-01/a.jpg", {"camera": "cam1", "date": "2024-05-01"}),
    ("{camera}/{date}/*", "cam1/a.jpg", None),  # too shallow
    ("{camera}/{date}/*", "cam1/2024/x/a.jpg", None),  # too deep: the whole path must match
    ("{camera}/{date}/*", "a.jpg", None),
    # fields may bind the file name too
    ("{camera}/{file}", "cam1/a.jpg", {"camera": "cam1", "file": "a.jpg"}),
    ("{file}", "a.jpg", {"file": "a.jpg"}),
    ("{file}", "d/a.jpg", None),
    ("*", "a.jpg", {}),
    ("*", "d/a.jpg", None),
    ("*/*", "d/a.jpg", {}),
    # literals
    ("raw/{camera}/*", "raw/cam1/a.jpg", {"camera": "cam1"}),
    ("raw/{camera}/*", "cooked/cam1/a.jpg", None),
    ("raw/{camera}/*", "Raw/cam1/a.jpg", None),  # case-sensitive
    # partial segments
    ("cam-{camera}/*", "cam-7/a.jpg", {"camera": "7"}),
    ("cam-{camera}/*", "cam-/a.jpg", None),  # a field never binds ""
    ("cam-{camera}/*", "cam7/a.jpg", None),
    ("{date}_{seq}.jpg", "2024-05-01_0003.jpg", {"date": "2024-05-01", "seq": "0003"}),
    ("{date}_{seq}.jpg", "2024-05-01_0003.png", None),
    ("{date}_{seq}.jpg", "20240501.jpg", None),
    ("*/{stem}.jpg", "d/a.b.jpg", {"stem": "a.b"}),
    ("{a}-{b}", "x-y-z", {"a": "x", "b": "y-z"}),  # ambiguous: earlier fields take least
    ("{a}_{b}.{ext}", "a_b_c.d.e", {"a": "a", "b": "b_c", "ext": "d.e"}),
    ("*-{b}", "x-y-z", {"b": "y-z"}),  # * also takes as little as it can
    ("{site}*/*", "siteA-extra/a.jpg", {"site": "s"}),
    ("IMG_*.jpg", "IMG_001.jpg", {}),
    ("IMG_*.jpg", "IMG_.jpg", {}),  # * may match nothing
    # **
    ("{camera}/**", "cam1/a.jpg", {"camera": "cam1"}),
    ("{camera}/**", "cam1/x/y/a.jpg", {"camera": "cam1"}),
    ("{camera}/**", "a.jpg", None),  # a trailing ** needs at least one segment
    ("**/{date}/*", "2024/a.jpg", {"date": "2024"}),
    ("**/{date}/*", "x/y/2024/a.jpg", {"date": "2024"}),
    ("**/{date}/*", "a.jpg", None),
    ("{site}/**/{date}/*", "s1/2024/a.jpg", {"site": "s1", "date": "2024"}),
    ("{site}/**/{date}/*", "s1/p/q/2024/a.jpg", {"site": "s1", "date": "2024"}),
    ("{site}/**/**/{date}/*", "s1/p/2024/a.jpg", {"site": "s1", "date": "2024"}),
    ("**", "a/b/c", {}),
    ("**/*.jpg", "a.jpg", {}),
    ("**/*.jpg", "a/b.png", None),
    # regex metacharacters are literal
    ("a.b/{x}", "a.b/1", {"x": "1"}),
    ("a.b/{x}", "aXb/1", None),
    ("(p)+[q]/{x}", "(p)+[q]/1", {"x": "1"}),
    ("?/{x}", "?/1", {"x": "1"}),
    ("?/{x}", "a/1", None),  # ? is literal here: only {field}, * and ** are special
    # unusual characters in values
    ("{camera}/*", "cam 1/a.jpg", {"camera": "cam 1"}),
    ("{camera}/*", "kamera-é/a.jpg", {"camera": "kamera-é"}),
    ("{camera}/*", "line\nbreak/a.jpg", {"camera": "line\nbreak"}),
    ("{camera}/*", "cam1/a.jpg\n", {"camera": "cam1"}),
    ("{camera}", "cam1\n", {"camera": "cam1\n"}),
    ("{n}/*", "007/a.jpg", {"n": "007"}),  # values stay strings
]


@pytest.mark.parametrize(("pattern", "relpath", "bound"), BINDS)
def test_bind_path_pattern(pattern: str, relpath: str, bound: dict[str, str] | None) -> None:
    assert bind_path_pattern(pattern, relpath) == bound


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("/{camera}/*", "relative"),
        ("{camera}//*", "empty segment"),
        ("{camera}/", "empty segment"),
        ("{camera", "unbalanced"),
        ("camera}", "unbalanced"),
        ("{1st}/*", "not a valid field name"),
        ("{}/*", "not a valid field name"),
        ("{a-b}/*", "not a valid field name"),
        ("{a}/{a}", "appears twice"),
        ("a**/b", "whole segment"),
        ("**x", "whole segment"),
    ],
)
def test_bad_path_patterns(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compile_path_pattern(pattern)
    with pytest.raises(ValueError, match=message):
        bind_path_pattern(pattern, "a/b")


_segment = st.text(
    alphabet=st.characters(blacklist_characters="/", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_segment, min_size=1, max_size=4), _segment)
def test_whole_segment_fields_bind_what_was_formatted(values: list[str], file_name: str) -> None:
    # Fields that are whole segments are never ambiguous: formatting a path from a
    # pattern and binding it again gives back the values, whatever characters they hold.
    fields = [f"f{i}" for i in range(len(values))]
    pattern = "/".join("{" + f + "}" for f in fields) + "/*"
    relpath = "/".join(values) + "/" + file_name
    assert bind_path_pattern(pattern, relpath) == dict(zip(fields, values, strict=True))


@settings(max_examples=300, deadline=None)
@given(st.lists(_segment, min_size=1, max_size=4), st.lists(_segment, max_size=3))
def test_double_star_skips_any_number_of_folders(middle: list[str], head: list[str]) -> None:
    relpath = "/".join(["root", *head, *middle, "a.jpg"])
    assert bind_path_pattern("{top}/**/*", relpath) == {"top": "root"}
    assert bind_path_pattern("**/{last}/a.jpg", relpath) == {"last": middle[-1]}


# --- sidecars ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.jpg", "a"),
        ("a.tar.gz", "a.tar"),
        ("a", "a"),
        (".env", ".env"),
        ("..x", "."),
        ("a.", "a"),
        ("a b.jpg", "a b"),
        ("a\n.jpg", "a\n"),
    ],
)
def test_stem(name: str, expected: str) -> None:
    assert stem(name) == expected


@pytest.mark.parametrize(
    ("template", "file_name", "expected"),
    [
        ("{name}.json", "a.jpg", "a.jpg.json"),
        ("{stem}.json", "a.jpg", "a.json"),
        ("{name}.json", "a", "a.json"),
        ("{stem}.json", "a", "a.json"),
        ("{stem}.json", "a.tar.gz", "a.tar.json"),
        ("{name}.meta.json", "a.jpg", "a.jpg.meta.json"),
        ("meta_{stem}.json", "a.jpg", "meta_a.json"),
        ("{stem}-{name}.json", "a.jpg", "a-a.jpg.json"),
        # a placeholder inside the file name is never substituted again
        ("{name}.json", "x{stem}.jpg", "x{stem}.jpg.json"),
        ("{stem}.json", "{name}.jpg", "{name}.json"),
        ("{name}.json", "a\nb.jpg", "a\nb.jpg.json"),
    ],
)
def test_sidecar_name(template: str, file_name: str, expected: str) -> None:
    assert sidecar_name(template, file_name) == expected


@pytest.mark.parametrize(
    ("template", "name", "is_sidecar"),
    [
        ("{name}.json", "a.jpg.json", True),
        ("{name}.json", "a.json", True),  # every *.json: the rule is the shape
        ("{name}.json", "orphan.json", True),
        ("{name}.json", "a.jpg", False),
        ("{name}.json", ".json", False),  # nothing where the name goes
        ("{name}.json", "a.JSON", False),
        ("{name}.json", "a.json.bak", False),
        ("{stem}.json", "a.json", True),
        ("{stem}.json", "a.jpg", False),
        ("{name}.meta.json", "a.jpg.meta.json", True),
        ("{name}.meta.json", "a.json", False),
        ("meta_{stem}.json", "meta_a.json", True),
        ("meta_{stem}.json", "a.json", False),
        ("meta_{stem}.json", "meta_.json", False),
        ("meta_{name}", "meta_a.jpg", True),
        ("meta_{name}", "a.jpg", False),
    ],
)
def test_is_sidecar_name(template: str, name: str, is_sidecar: bool) -> None:
    assert is_sidecar_name(template, name) is is_sidecar


@pytest.mark.parametrize(
    ("template", "sidecar", "siblings", "targets"),
    [
        ("{name}.json", "a.jpg.json", ["a.jpg", "a.png", "a.jpg.json"], ["a.jpg"]),
        ("{name}.json", "a.jpg.json", ["a.png"], []),
        ("{name}.json", "a.json", ["a", "a.jpg"], ["a"]),
        ("{name}.json", "a.json.json", ["a.json", "a.json.json"], []),  # sidecars aren't items
        ("{name}.json", "a.jpg", ["a.jpg"], []),  # not a sidecar at all
        ("{name}.json", "a.jpg.json", [], []),
        ("{stem}.json", "a.json", ["a.jpg", "a.png", "b.jpg", "a.json"], ["a.jpg", "a.png"]),
        ("{stem}.json", "a.json", ["a", "a.jpg"], ["a", "a.jpg"]),
        ("{stem}.json", "a.json", ["a.b.jpg", "ab.jpg"], []),
        ("{stem}.json", "a.b.json", ["a.b.jpg", "a.jpg"], ["a.b.jpg"]),
        ("{stem}.json", "a.json", ["a.json"], []),
        ("{stem}.json", "a.json", ["b.png", "a.png", "a.png"], ["a.png"]),  # sorted, unique
        ("{name}.meta.json", "a.jpg.meta.json", ["a.jpg", "a.jpg.meta.json"], ["a.jpg"]),
        ("meta_{stem}.json", "meta_a.json", ["a.jpg", "meta_a.json", "b.jpg"], ["a.jpg"]),
        ("{stem}-{name}.json", "a-a.jpg.json", ["a.jpg", "a.png"], ["a.jpg"]),
        ("{name}.json", "a\nb.jpg.json", ["a\nb.jpg"], ["a\nb.jpg"]),
    ],
)
def test_sidecar_targets(
    template: str, sidecar: str, siblings: list[str], targets: list[str]
) -> None:
    assert sidecar_targets(template, sidecar, siblings) == targets
    # any iterable will do, and a set takes the fast path for {name} templates
    assert sidecar_targets(template, sidecar, iter(siblings)) == targets
    assert sidecar_targets(template, sidecar, set(siblings)) == targets


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["{name}.json", "{stem}.json", "{name}.meta.json", "meta_{stem}.json"]),
    st.lists(
        st.text(alphabet="ab.jsonmeta_", min_size=1, max_size=8).filter(lambda s: "/" not in s),
        max_size=8,
    ),
)
def test_targets_are_the_files_whose_sidecar_it_is(template: str, names: list[str]) -> None:
    items = [n for n in names if not is_sidecar_name(template, n)]
    for name in set(names):
        expected = sorted({i for i in items if sidecar_name(template, i) == name})
        assert sidecar_targets(template, name, names) == expected
    for item in items:
        # an item is never its own sidecar, and its sidecar is always a sidecar
        assert is_sidecar_name(template, sidecar_name(template, item))


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{name}", "literal text"),
        ("{stem}{name}", "literal text"),
        ("meta.json", "must contain"),
        ("sub/{name}.json", "without /"),
        ("{name}.{ext}", "only {name} and {stem}"),
    ],
)
def test_bad_sidecar_templates(template: str, message: str) -> None:
    for call in (
        lambda: check_sidecar_template(template),
        lambda: sidecar_name(template, "a.jpg"),
        lambda: is_sidecar_name(template, "a.jpg.json"),
        lambda: sidecar_targets(template, "a.jpg.json", ["a.jpg"]),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            call()


@pytest.mark.parametrize(
    "template", ["{name}.json", "{stem}.json", "meta_{stem}", "{stem}-{name}.x"]
)
def test_good_sidecar_templates(template: str) -> None:
    check_sidecar_template(template)


def test_sidecar_needs_data_or_error() -> None:
    Sidecar("a.json", 2, 1, {})
    Sidecar("a.json", 2, 1, None, "broken")
    with pytest.raises(ValueError):
        Sidecar("a.json", 2, 1, None)
    with pytest.raises(ValueError):
        Sidecar("a.json", 2, 1, {}, "broken")


@pytest.mark.parametrize(
    ("raw", "data", "error"),
    [
        (b'{"a": 1}', {"a": 1}, None),
        (b"{}", {}, None),
        (b'\xef\xbb\xbf{"a": "b"}', {"a": "b"}, None),  # a BOM from Windows tools
        ('{"é": "ü"}'.encode(), {"é": "ü"}, None),
        (b'{"n": {"deep": [1, 2.5, null, true]}}', {"n": {"deep": [1, 2.5, None, True]}}, None),
        (b"", None, "empty"),
        (b"  \n", None, "empty"),
        (b"[1, 2]", None, "holds a JSON array, not an object"),
        (b'"text"', None, "holds a JSON string, not an object"),
        (b"3", None, "holds a JSON number, not an object"),
        (b"null", None, "holds a JSON null, not an object"),
        (b'{"a": 1,}', None, "not valid JSON: .* at line 1 column 9"),
        (b'{"a":\n  tru}', None, "not valid JSON: .* at line 2 column 3"),
        (b'{"a": NaN}', None, "NaN"),
        (b'{"a": -Infinity}', None, "-Infinity"),
        (b'{"a": "\xff"}', None, "not UTF-8 text \\(byte 0xff at offset 7\\)"),
    ],
)
def test_parse_sidecar(raw: bytes, data: dict[str, Any] | None, error: str | None) -> None:
    sc = parse_sidecar("d/a.jpg.json", len(raw), 123, raw)
    assert (sc.relpath, sc.size, sc.mtime_ns) == ("d/a.jpg.json", len(raw), 123)
    assert sc.data == data
    if error is None:
        assert sc.error is None
    else:
        assert sc.error is not None
        assert re.search(error, sc.error), sc.error


# --- build_metadata --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("static", "path_fields", "sidecar", "merged"),
    [
        ({}, None, None, {}),
        ({"a": 1}, None, None, {"a": 1}),
        ({}, {"camera": "c1"}, None, {"camera": "c1"}),
        ({}, None, {"x": [1]}, {"x": [1]}),
        ({"a": 1, "b": 1}, {"b": "2"}, None, {"a": 1, "b": "2"}),  # path beats static
        ({"a": 1}, {"a": "2"}, {"a": 3}, {"a": 3}),  # sidecar beats both
        ({"a": 1}, None, {"a": None}, {"a": None}),  # an explicit null still wins
        ({"o": {"x": 1, "y": 2}}, None, {"o": {"x": 9}}, {"o": {"x": 9}}),  # no deep merge
        ({"s": 1}, {"p": "v"}, {"c": True}, {"s": 1, "p": "v", "c": True}),
        ({}, {}, {}, {}),
    ],
)
def test_build_metadata(
    static: dict[str, Any],
    path_fields: dict[str, str] | None,
    sidecar: dict[str, Any] | None,
    merged: dict[str, Any],
) -> None:
    before = json.dumps([static, path_fields, sidecar])
    result = build_metadata(static, path_fields, sidecar)
    assert result == merged
    assert json.dumps([static, path_fields, sidecar]) == before  # inputs untouched
    assert result is not static and result is not sidecar


# --- type consistency ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        ("x", "string"),
        ("", "string"),
        (0, "number"),
        (-3, "number"),
        (2.5, "number"),
        (float("inf"), "number"),
        (True, "boolean"),
        (False, "boolean"),
        ({}, "object"),
        ({"a": 1}, "object"),
        ([], "array"),
        ([1, "a"], "array"),
        ((1, 2), "array"),
        (None, None),
    ],
)
def test_value_type(value: Any, type_name: str | None) -> None:
    assert value_type(value) == type_name


@pytest.mark.parametrize("value", [b"x", {1, 2}, object()])
def test_value_type_refuses_non_json(value: Any) -> None:
    with pytest.raises(TypeError):
        value_type(value)


def test_type_conflict_message() -> None:
    assert type_conflicts({"exposure": "1/250"}, {"exposure": ("number", "/cam1/a.jpg")}) == [
        'metadata key "exposure" is a string here but a number on item /cam1/a.jpg in this '
        "dataset; make it a number everywhere (or rename the key)"
    ]


@pytest.mark.parametrize(
    ("metadata", "known", "conflicting_keys"),
    [
        ({}, {}, []),
        ({"a": 1}, {}, []),  # first item to set a key sets its type
        ({"a": 1}, {"a": ("number", "/x")}, []),
        ({"a": 1.5}, {"a": ("number", "/x")}, []),  # int and float are both numbers
        ({"a": True}, {"a": ("number", "/x")}, ["a"]),  # bool is not a number
        ({"a": 1}, {"a": ("boolean", "/x")}, ["a"]),
        ({"a": "1"}, {"a": ("number", "/x")}, ["a"]),
        ({"a": None}, {"a": ("number", "/x")}, []),  # null constrains nothing
        ({"a": [1]}, {"a": ("object", "/x")}, ["a"]),
        ({"a": {}}, {"a": ("object", "/x")}, []),
        ({"a": 1, "b": "x", "c": []}, {"a": ("string", "/x"), "c": ("array", "/y")}, ["a"]),
        ({"b": 1, "a": 1}, {"a": ("string", "/x"), "b": ("string", "/y")}, ["b", "a"]),
        ({"other": 1}, {"a": ("string", "/x")}, []),
    ],
)
def test_type_conflicts(
    metadata: dict[str, Any], known: dict[str, tuple[str, str]], conflicting_keys: list[str]
) -> None:
    messages = type_conflicts(metadata, known)
    assert len(messages) == len(conflicting_keys)
    for key, message in zip(conflicting_keys, messages, strict=True):
        mine, theirs = value_type(metadata[key]), known[key][0]
        assert message.startswith(f"metadata key {json.dumps(key)} is ")
        assert f" {mine} here but " in message
        assert f" {theirs} on item {known[key][1]} in this dataset" in message
        assert (
            f"make it {'an' if theirs in ('object', 'array') else 'a'} {theirs} everywhere"
            in message
        )


def test_type_conflict_articles_and_odd_keys() -> None:
    [message] = type_conflicts({'we"ird\nkey': []}, {'we"ird\nkey': ("object", "/d/x y.jpg")})
    assert message == (
        'metadata key "we\\"ird\\nkey" is an array here but an object on item /d/x y.jpg in '
        "this dataset; make it an object everywhere (or rename the key)"
    )
