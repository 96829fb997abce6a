"""core/rawnames.py: names that are not valid UTF-8, lossless in text, shown as %XX."""

from __future__ import annotations

import os
import sqlite3

from hypothesis import example, given, settings
from hypothesis import strategies as st
from ingestd.core.rawnames import MARKER, display, shown, to_os, to_text

# Bytes a POSIX name may hold (all but NUL and '/'), biased towards the interesting ones.
name_bytes = st.binary(min_size=1, max_size=40).map(
    lambda b: b.replace(b"\0", b"a").replace(b"/", b"b")
)
# Any str, also with lone surrogates and the marker itself.
any_text = st.text(
    st.one_of(
        st.characters(codec=None, exclude_categories=("Cs",)),
        st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
        st.just(MARKER),
    )
)


def _has_surrogate(s: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in s)


@settings(max_examples=2000)
@given(name_bytes)
@example(b"caf\xe9.jpg")
@example(b"\xff\xfe")
@example("\U0010fffe".encode())
@example("\U0010fffeE9".encode())
def test_any_bytes_name_round_trips(raw: bytes) -> None:
    name = os.fsdecode(raw)
    text = to_text(name)
    assert not _has_surrogate(text)
    text.encode("utf-8")  # strict: raises on a surrogate
    assert to_os(text) == name
    assert os.fsencode(to_os(text)) == raw
    assert not _has_surrogate(display(text))
    display(text).encode("utf-8")


@settings(max_examples=2000)
@given(any_text)
def test_any_str_round_trips(name: str) -> None:
    text = to_text(name)
    assert not _has_surrogate(text)
    assert to_os(text) == name


@given(st.text(st.characters(exclude_categories=("Cs",), exclude_characters=MARKER)))
def test_ordinary_names_are_unchanged(name: str) -> None:
    assert to_text(name) == name
    assert to_os(name) == name
    assert display(name) == name


def test_examples() -> None:
    assert to_text(os.fsdecode(b"caf\xe9.jpg")) == f"caf{MARKER}E9.jpg"
    assert display(to_text(os.fsdecode(b"caf\xe9.jpg"))) == "caf%E9.jpg"
    assert shown(os.fsdecode(b"d\xff/x.dat")) == "d%FF/x.dat"
    assert to_text(MARKER) == MARKER * 2
    assert display(to_text(f"a{MARKER}b")) == "a\ufffdb"
    # A marker followed by hex in a real name is escaped, so it does not read as a byte.
    assert to_os(to_text(f"{MARKER}E9")) == f"{MARKER}E9"
    assert to_text("100% done.dat") == "100% done.dat"


def test_sqlite_stores_the_text_form() -> None:
    name = os.fsdecode(b"d\xff/caf\xe9.dat")
    db = sqlite3.connect(":memory:")
    db.execute("create table t (p text)")
    try:
        db.execute("insert into t values (?)", (name,))
    except UnicodeEncodeError:
        pass  # the reason for the text form
    else:  # pragma: no cover - an sqlite that took it would make the form pointless
        raise AssertionError("sqlite stored a lone surrogate")
    db.execute("insert into t values (?)", (to_text(name),))
    [(back,)] = db.execute("select p from t").fetchall()
    assert to_os(back) == name


def test_plans_show_bytes_as_percent_and_keep_the_source_name() -> None:
    from ingestd.config import Watch
    from ingestd.core.model import Entry, item_key
    from ingestd.plan.groups import plan_group
    from ingestd.plan.layout import plan_file

    folder, name = to_text(os.fsdecode(b"d\xff")), to_text(os.fsdecode(b"caf\xe9.jpg"))
    rel = f"{folder}/{name}"
    w = Watch.model_validate(
        {
            "name": "w",
            "source": "/tmp",
            "dataset": "d",
            "metadata": {"path_pattern": "{folder}/*"},
        },
        context={"check_paths": False},
    )
    plan = plan_file(w, Entry(rel, 4, 1), None)
    assert (plan.path, plan.name, plan.key) == ("/d%FF", "caf%E9.jpg", "/d%FF/caf%E9.jpg")
    assert plan.source_id == rel  # the ledger tracks the file by its lossless name
    [f] = plan.slots[0].files
    assert (f.name, f.relpath) == ("caf%E9.jpg", rel)
    assert plan.metadata == {"folder": "d%FF"}
    assert item_key("/" + folder, name) == plan.key

    g = Watch.model_validate(
        {"name": "g", "source": "/tmp", "dataset": "d", "group": {"mode": "channels"}},
        context={"check_paths": False},
    )
    [gp] = plan_group(g, folder, [Entry(rel, 4, 1)], sizes={rel: (2, 2)})
    assert (gp.path, gp.name, gp.source_id) == ("/", "d%FF", folder)
    assert [s.name for s in gp.slots] == ["caf%E9.jpg"]
    assert gp.slots[0].files[0].relpath == rel
