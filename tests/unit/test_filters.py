"""PathFilter: the .gitignore habits of docs/design.md, temp names, folder pruning.

The tables pin each rule down by example; the property tests compare the compiled
regexes with a slow, obviously-correct reference matcher built on fnmatch, so the speed
tricks in filters.py (folded alternations, suffix shortcuts) cannot drift from the rules.
"""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from ingestd.core.filters import TEMP_PATTERNS, PathFilter, is_temp_name, translate

# --- tables ------------------------------------------------------------------------------

# (include, exclude, relpath, taken)
ACCEPTS: list[tuple[list[str], list[str], str, bool]] = [
    # no patterns: everything but temp names
    ([], [], "a.jpg", True),
    ([], [], "a/b/c.txt", True),
    ([], [], "no-extension", True),
    # a pattern without / matches the name at any depth
    (["*.png"], [], "c.png", True),
    (["*.png"], [], "a/b/c.png", True),
    (["*.png"], [], "c.PNG", False),  # case-sensitive
    (["*.png"], [], "c.png.bak", False),
    (["*.png"], [], "png", False),
    (["*.png"], [], ".png/x", False),
    (["*.png"], [], "dir.png/notes.txt", False),  # includes match files, not folders
    (["*.jpg", "*.png"], [], "x.jpg", True),
    (["*.jpg", "*.png"], [], "x/y.png", True),
    (["*.jpg", "*.png"], [], "x.gif", False),
    (["*"], [], "a/b/c", True),
    (["**"], [], "a/b/c", True),
    (["?.jpg"], [], "a.jpg", True),
    (["?.jpg"], [], "d/a.jpg", True),
    (["?.jpg"], [], "ab.jpg", False),
    (["?.jpg"], [], ".jpg", False),
    (["a*b"], [], "axxb", True),
    (["a*b"], [], "ab", True),
    (["a*b"], [], "a/b", False),  # * never crosses a folder
    (["a**b"], [], "axxb", True),  # ** inside a segment is a plain *
    (["a**b"], [], "a/xb", False),
    (["IMG_*"], [], "d/IMG_0001.jpg", True),
    (["IMG_*"], [], "d/img_0001.jpg", False),
    # sets
    (["[ab].jpg"], [], "a.jpg", True),
    (["[ab].jpg"], [], "c.jpg", False),
    (["[!ab].jpg"], [], "c.jpg", True),
    (["[!ab].jpg"], [], "a.jpg", False),
    (["[^ab].jpg"], [], "c.jpg", True),
    (["[a-c]x"], [], "bx", True),
    (["[a-c]x"], [], "dx", False),
    (["[]]x"], [], "]x", True),
    (["[!]]x"], [], "ax", True),
    (["[!]]x"], [], "]x", False),
    (["[a-]x"], [], "-x", True),
    (["[!-a]x"], [], "-x", False),
    (["[!-a]x"], [], "bx", True),
    (["[!-a]x"], [], "0x", True),
    (["a[+-0]b"], [], "a.b", True),
    (["a[+-0]b"], [], "a/b", False),  # a range spanning / still stays in one folder
    ([], ["a[+-0]b"], "a/b", True),
    ([], ["a[!x]b"], "a/b", True),
    (["[*?]"], [], "*", True),
    (["[*?]"], [], "a", False),
    (["[\\]]"], [], "]", True),
    # a pattern with / is anchored at the watch root
    (["a/*.jpg"], [], "a/x.jpg", True),
    (["a/*.jpg"], [], "a/b/x.jpg", False),
    (["a/*.jpg"], [], "b/a/x.jpg", False),
    (["a/*.jpg"], [], "x.jpg", False),
    (["/x.jpg"], [], "x.jpg", True),
    (["/x.jpg"], [], "a/x.jpg", False),
    (["a/*"], [], "a/x", True),
    (["a/*"], [], "a/x/y", False),  # includes match files: a/x is a folder here
    (["*/x.jpg"], [], "a/x.jpg", True),
    (["*/x.jpg"], [], "x.jpg", False),
    (["*/x.jpg"], [], "a/b/x.jpg", False),
    # ** crosses folders
    (["a/**/x.jpg"], [], "a/x.jpg", True),
    (["a/**/x.jpg"], [], "a/b/x.jpg", True),
    (["a/**/x.jpg"], [], "a/b/c/x.jpg", True),
    (["a/**/x.jpg"], [], "x.jpg", False),
    (["a/**/x.jpg"], [], "b/a/x.jpg", False),
    (["a/**/x.jpg"], [], "a/b/y.jpg", False),
    (["a/**/x.jpg"], [], "ab/x.jpg", False),
    (["a/**/x.jpg"], [], "a/bx.jpg", False),
    (["**/x.jpg"], [], "x.jpg", True),
    (["**/x.jpg"], [], "a/x.jpg", True),
    (["**/x.jpg"], [], "a/b/x.jpg", True),
    (["**/x.jpg"], [], "a/bx.jpg", False),
    (["**/*.jpg"], [], "a/b/c.jpg", True),
    (["a/**"], [], "a/x", True),
    (["a/**"], [], "a/b/c", True),
    (["a/**"], [], "a", False),
    (["a/**"], [], "b/a/x", False),
    (["a/**/**/b"], [], "a/b", True),
    (["a/**/**/b"], [], "a/x/y/b", True),
    (["/**"], [], "a/b", True),
    (["cam*/**/*.jpg"], [], "cam1/2024/x.jpg", True),
    (["cam*/**/*.jpg"], [], "cam1/x.jpg", True),
    (["cam*/**/*.jpg"], [], "x/cam1/x.jpg", False),
    # a trailing / names folders: everything below them
    (["raw/"], [], "raw/x.jpg", True),
    (["raw/"], [], "a/raw/b/x.jpg", True),
    (["raw/"], [], "raw", False),
    (["raw/"], [], "rawx/y", False),
    (["/raw/"], [], "raw/x", True),
    (["/raw/"], [], "a/raw/x", False),
    (["a/*/"], [], "a/b/c.jpg", True),
    (["a/*/"], [], "a/c.jpg", False),
    # escapes
    (["\\*.jpg"], [], "*.jpg", True),
    (["\\*.jpg"], [], "a.jpg", False),
    (["\\[a].jpg"], [], "[a].jpg", True),
    (["\\[a].jpg"], [], "a.jpg", False),
    (["\\!x"], [], "!x", True),
    (["a\\?"], [], "a?", True),
    (["a\\?"], [], "ab", False),
    (["a\\\\b"], [], "a\\b", True),
    # regex metacharacters are literal
    (["a+b(c)|d{2}.$"], [], "a+b(c)|d{2}.$", True),
    (["a.b"], [], "axb", False),
    (["^x"], [], "^x", True),
    # '#' is literal (no comments inside a YAML list)
    (["#*.jpg"], [], "#1.jpg", True),
    (["#*.jpg"], [], "1.jpg", False),
    ([], ["#*"], "#x", False),
    ([], ["#*"], "a/#x/y", False),
    ([], [], "#notes", True),
    # spaces
    (["my photos/*.jpg"], [], "my photos/a b.jpg", True),
    (["* *.jpg"], [], "d/a b.jpg", True),
    (["* *.jpg"], [], "d/ab.jpg", False),
    ([], [], " leading and trailing ", True),
    # unicode (compared as code points; no normalisation)
    (["café/*.jpg"], [], "café/ü.jpg", True),
    (["ü?.jpg"], [], "üé.jpg", True),
    (["*.JPG"], [], "写真/猫.JPG", True),
    (["[é]"], [], "é", True),
    (["café/*.jpg"], [], "cafe\u0301/ü.jpg", False),  # NFD spelling is another name
    # names with newlines and other control characters
    ([], [], "a\nb.jpg", True),
    ([], [], "line\r\nbreak/\tx", True),
    (["*.jpg"], [], "a\n.jpg", True),
    (["*.jpg"], [], "a.jpg\n", False),  # no `$`-before-final-newline slip
    (["a?b"], [], "a\nb", True),
    (["a*b"], [], "a\n\nb", True),
    (["a/**/x"], [], "a/\n/x", True),
    ([], ["*.jpg"], "x.jpg\n", True),
    ([], ["*\n"], "a\n", False),
    ([], ["a"], "a\n", True),
    ([], ["x.jpg"], "x.jpg\n/y", True),
    # excludes: a name pattern also drops everything below a matching folder
    ([], ["cache"], "cache/x.jpg", False),
    ([], ["cache"], "a/cache/x.jpg", False),
    ([], ["cache"], "cache", False),
    ([], ["cache"], "cached/x", True),
    ([], ["cache"], "a/xcache", True),
    ([], ["cache/"], "cache/x", False),
    ([], ["cache/"], "a/cache/b/x", False),
    ([], ["cache/"], "cache", True),  # a file called cache is not a folder
    ([], ["/cache"], "cache/x", False),
    ([], ["/cache"], "a/cache/x", True),
    ([], ["/cache/"], "cache/x", False),
    ([], ["/cache/"], "cache", True),
    ([], ["a/b"], "a/b", False),
    ([], ["a/b"], "a/b/c.jpg", False),
    ([], ["a/b"], "x/a/b/c", True),
    ([], ["a/b"], "a/bc", True),
    ([], ["a/**/x.jpg"], "a/x.jpg", False),
    ([], ["a/**/x.jpg"], "a/b/c/x.jpg", False),
    ([], ["a/**/x.jpg"], "a/b/c/y.jpg", True),
    ([], ["a/**/x.jpg"], "a/x.jpg/y", False),  # a folder called x.jpg
    ([], ["a/**"], "a/x", False),
    ([], ["a/**"], "a/b/c", False),
    ([], ["a/**"], "a", True),
    ([], ["a/**"], "ab/x", True),
    ([], ["**/node_modules"], "node_modules/x.js", False),
    ([], ["**/node_modules"], "a/b/node_modules/c/x.js", False),
    ([], ["**/node_modules"], "a/node_modules_x/y", True),
    ([], ["*_thumb.jpg"], "a/x_thumb.jpg", False),
    ([], ["*_thumb.jpg"], "a/x.jpg", True),
    ([], ["*"], "a", False),
    ([], ["*"], "a/b/c", False),
    ([], ["x*"], "xa/y", False),
    ([], ["x*"], "ax/y", True),
    ([], ["x*"], "x", False),
    ([], ["a/*"], "a/x", False),
    ([], ["a/*"], "a/b/c", False),
    ([], ["a/*"], "a", True),
    ([], ["a/*"], "b/a/x", True),
    ([], ["*.jpg/"], "a.jpg/x", False),
    ([], ["*.jpg/"], "a.jpg", True),
    ([], ["a/*/c"], "a/b/c/d", False),
    ([], ["a/*/c"], "a/b/x/c", True),
    ([], ["[!a]"], "a", True),
    ([], ["[!a]"], "a/b", False),
    # include and exclude together: exclude wins
    (["*.jpg"], ["*.jpg"], "a.jpg", False),
    (["*.jpg"], ["b*"], "a/bx/c.jpg", False),
    (["*.jpg"], ["b*"], "a/c.jpg", True),
    (["*.jpg"], ["*_thumb.jpg", "cache"], "cam1/x.jpg", True),
    (["*.jpg"], ["*_thumb.jpg", "cache"], "cam1/x_thumb.jpg", False),
    (["*.jpg"], ["*_thumb.jpg", "cache"], "cache/cam1/x.jpg", False),
    (["a/**", "*.png"], ["a/skip/"], "a/skip/x.png", False),
    (["a/**", "*.png"], ["a/skip/"], "b/x.png", True),
    (["a/**", "*.png"], ["a/skip/"], "a/b/x.txt", True),
    (["a/**", "*.png"], ["a/skip/"], "b/x.txt", False),
    # mixed include kinds in one filter: suffix, name regex, folder, anchored
    (["*.jpg", "IMG_?", "raw/", "/top/*"], [], "d/IMG_1", True),
    (["*.jpg", "IMG_?", "raw/", "/top/*"], [], "raw/z.txt", True),
    (["*.jpg", "IMG_?", "raw/", "/top/*"], [], "top/z.txt", True),
    (["*.jpg", "IMG_?", "raw/", "/top/*"], [], "x/top/z.txt", False),
    (["*.jpg", "IMG_?", "raw/", "/top/*"], [], "z.txt", False),
    # temp names are ignored whatever the patterns say, at any depth
    ([".*"], [], ".env", False),
    (["*.tmp"], [], "a.tmp", False),
    (["**"], [], "a/.git/config", False),
    ([], [], ".hidden", False),
    ([], [], "a/.hidden", False),
    ([], [], ".git/config", False),
    ([], [], "a/.b/c/d.jpg", False),
    ([], [], "a.tmp", False),
    ([], [], "x/y/a.tmp", False),
    ([], [], "x.tmp/y.jpg", False),
    ([], [], "a.part", False),
    ([], [], "d.part/f", False),
    ([], [], "~$report.docx", False),
    ([], [], "a/~$report.docx", False),
    ([], [], "video.mp4.crdownload", False),
    ([], [], ".a.swp", False),
    ([], [], "a.swp", False),
    ([], [], "d/a.jpg.part", False),
    # ... and their look-alikes are not temp
    ([], [], "a.tmpl", True),
    ([], [], "a.tmp.jpg", True),
    ([], [], "tmp", True),
    ([], [], "part/a.jpg", True),
    ([], [], "a~$b", True),
    ([], [], "a.parts", True),
    ([], [], "x.swpx", True),
    ([], [], "x.TMP", True),  # case-sensitive, like everything else
    ([], [], "a.b/c", True),
    ([], [], "a./b", True),
    ([], [], "~a", True),
    ([], [], "$~a", True),
]


@pytest.mark.parametrize(("include", "exclude", "relpath", "taken"), ACCEPTS)
def test_accepts(include: list[str], exclude: list[str], relpath: str, taken: bool) -> None:
    assert PathFilter(include, exclude).accepts(relpath) is taken


@pytest.mark.parametrize(("include", "exclude", "relpath", "taken"), ACCEPTS)
def test_accepts_agrees_with_reference(
    include: list[str], exclude: list[str], relpath: str, taken: bool
) -> None:
    # Keeps the reference honest: it must agree with every hand-written expectation.
    assert ref_accepts(include, exclude, relpath) is taken


@pytest.mark.parametrize(
    ("name", "temp"),
    [
        (".hidden", True),
        (".", True),
        ("..", True),
        (".tmp", True),
        ("a.tmp", True),
        ("a.part", True),
        ("~$x.docx", True),
        ("~$", True),
        ("a.crdownload", True),
        ("a.swp", True),
        (".a.swp", True),
        ("a.jpg.part", True),
        ("a.tmp\n", False),  # the name really ends with a newline
        ("a", False),
        ("a.jpg", False),
        ("a.tmpx", False),
        ("a.TMP", False),
        ("tmp", False),
        ("part", False),
        ("a~$", False),
        ("~a", False),
        ("a.tmp.jpg", False),
        ("", False),
        ("a/.b", False),  # not a name: a path
    ],
)
def test_is_temp_name(name: str, temp: bool) -> None:
    assert is_temp_name(name) is temp


@pytest.mark.parametrize("pattern", TEMP_PATTERNS)
def test_temp_patterns_are_what_is_temp_name_uses(pattern: str) -> None:
    example_name = pattern.replace("*", "x")
    assert is_temp_name(example_name)
    assert not PathFilter().accepts(example_name)
    assert not PathFilter().accepts(f"d/{example_name}/f.jpg")


# (include, exclude, reldir, pruned)
PRUNES: list[tuple[list[str], list[str], str, bool]] = [
    ([], [], "a", False),
    ([], [], "a/b/c", False),
    ([], [], ".git", True),
    ([], [], "a/.git", True),
    ([], [], ".git/objects", True),
    ([], [], "a.tmp", True),
    ([], [], "a/b.part", True),
    ([], [], "~$x", True),
    ([], [], "dl.crdownload", True),
    ([], [], "tmp", False),
    ([], ["cache"], "cache", True),
    ([], ["cache"], "a/cache", True),
    ([], ["cache"], "cache/sub", True),
    ([], ["cache"], "cached", False),
    ([], ["cache/"], "cache", True),
    ([], ["cache/"], "x/cache", True),
    ([], ["/cache"], "cache", True),
    ([], ["/cache"], "a/cache", False),
    ([], ["a/b"], "a", False),
    ([], ["a/b"], "a/b", True),
    ([], ["a/b"], "a/b/c", True),
    ([], ["a/b"], "x/a/b", False),
    ([], ["a/**"], "a", True),  # everything below a is excluded
    ([], ["a/**"], "a/b", True),
    ([], ["a/**"], "b", False),
    ([], ["a/**"], "ab", False),
    ([], ["a/*"], "a", True),
    ([], ["a/*"], "a/b", True),
    ([], ["a/*"], "b", False),
    ([], ["*"], "a", True),
    ([], ["x*"], "xa", True),
    ([], ["x*"], "ax", False),
    ([], ["*.jpg"], "x.jpg", True),  # gitignore: the pattern matches the folder itself
    ([], ["*.jpg"], "x", False),
    ([], ["a/**/x.jpg"], "a", False),
    ([], ["a/**/x.jpg"], "a/b", False),
    ([], ["a/**/x.jpg"], "a/b/x.jpg", True),
    ([], ["**/node_modules"], "node_modules", True),
    ([], ["**/node_modules"], "a/b/node_modules", True),
    ([], ["**/node_modules"], "a/b", False),
    ([], ["a/**/"], "a", False),  # a/**/ names folders below a; a's own files stay
    ([], ["a/**/"], "a/b", True),
    ([], ["cache"], "café/cache", True),
    ([], ["cache"], "line\nbreak", False),
    ([], ["line\nbreak"], "x/line\nbreak", True),
    # includes never prune: a folder may hold files they take
    (["*.jpg"], [], "a", False),
    (["a/*.jpg"], [], "b", False),
]


@pytest.mark.parametrize(("include", "exclude", "reldir", "pruned"), PRUNES)
def test_prunes_dir(include: list[str], exclude: list[str], reldir: str, pruned: bool) -> None:
    f = PathFilter(include, exclude)
    assert f.prunes_dir(reldir) is pruned
    if pruned:
        for below in ("x.jpg", "y/z.jpg", "x.jpg/x.jpg"):
            assert not f.accepts(f"{reldir}/{below}")


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("", "empty pattern"),
        ("!x.jpg", "negation"),
        ("[abc", "never closed"),
        ("a[", "never closed"),
        ("x/[a", "never closed"),
        ("[]", "never closed"),
        ("[!]", "never closed"),
        ("[a\\", "never closed"),
        ("[a/b]", "never closed"),  # / ends the folder name, so the set is never closed
        ("a//b", "empty folder name"),
        ("./a", r"\. and \.\."),
        ("../a", r"\. and \.\."),
        ("a/./b", r"\. and \.\."),
        ("a/..", r"\. and \.\."),
        ("/", "names no file"),
        ("//", "names no file|empty folder"),
        ("a\\", "lone"),
        ("[z-a]", "bad set"),
        ("[[:digit:]]", "not supported"),
    ],
)
@pytest.mark.parametrize("kind", ["include", "exclude"])
def test_invalid_patterns(pattern: str, message: str, kind: str) -> None:
    kwargs = {kind: [pattern]}
    with pytest.raises(ValueError, match=message) as info:
        PathFilter(**kwargs)
    assert str(info.value).startswith(f"{kind} pattern")
    if pattern:
        assert repr(pattern) in str(info.value)  # the message names the pattern


def test_bare_string_is_refused() -> None:
    with pytest.raises(TypeError):
        PathFilter("*.jpg")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        PathFilter([], "cache")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pattern", "translated"),
    [
        ("*.jpg", ("[^/]*\\.jpg", False, False)),
        ("a/**/x.jpg", ("a/(?:.*/)?x\\.jpg", True, False)),
        ("**/x", ("(?:.*/)?x", True, False)),
        ("a/**", ("a/.*", True, False)),
        ("a/**/**/b", ("a/(?:.*/)?b", True, False)),
        ("/x", ("x", True, False)),
        ("raw/", ("raw", False, True)),
        ("/raw/", ("raw", True, True)),
        ("a**b", ("a[^/]*b", False, False)),
        ("[!a-c]?", ("[^a-c/][^/]", False, False)),
        ("[!-a]", ("[^-a/]", False, False)),
        ("[a-]", ("[a\\-]", False, False)),
        ("[+-0]", ("(?!/)[\\+-0]", False, False)),
    ],
)
def test_translate(pattern: str, translated: tuple[str, bool, bool]) -> None:
    assert translate(pattern) == translated


def test_equality_and_repr() -> None:
    a = PathFilter(["*.jpg"], ["cache"])
    assert a == PathFilter(("*.jpg",), ("cache",))
    assert hash(a) == hash(PathFilter(["*.jpg"], ["cache"]))
    assert a != PathFilter(["*.jpg"], [])
    assert "cache" in repr(a)


# --- reference matcher ---------------------------------------------------------------------
# Written straight from the rules, per path component, with fnmatch for one segment
# (its `*`, `?`, `[...]` and `[!...]` are exactly ours inside one folder). Slow and
# simple on purpose; it does not handle backslash escapes, so generated patterns use
# none.


def _parse(pattern: str) -> tuple[list[str], bool, bool]:
    dir_only = pattern.endswith("/")
    body = pattern[:-1] if dir_only else pattern
    anchored = "/" in body
    return body.lstrip("/").split("/"), anchored, dir_only


def _seg(pattern_segment: str, name: str) -> bool:
    if "\\" in pattern_segment:  # the table's escapes: unescape for fnmatch's benefit
        out, i = [], 0
        while i < len(pattern_segment):
            c = pattern_segment[i]
            if c == "\\":
                i += 1
                c = pattern_segment[i]
                out.append("[" + c + "]" if c in "*?[" else c)
            else:
                out.append(c)
            i += 1
        pattern_segment = "".join(out)
    if pattern_segment.startswith("[^"):  # fnmatch spells negation [!...] only
        pattern_segment = "[!" + pattern_segment[2:]
    return fnmatch.fnmatchcase(name, pattern_segment)


def _path(segments: list[str], comps: list[str]) -> bool:
    if not segments:
        return not comps
    head, rest = segments[0], segments[1:]
    if head == "**":
        if not rest:
            return len(comps) >= 1
        return any(_path(rest, comps[i:]) for i in range(len(comps) + 1))
    return bool(comps) and _seg(head, comps[0]) and _path(rest, comps[1:])


def _covers_folder(pattern: str, folders: list[str]) -> bool:
    """Does `pattern` name one of the folders `folders[:1]`, `folders[:2]`, ...?"""
    segments, anchored, _ = _parse(pattern)
    if anchored:
        return any(_path(segments, folders[:k]) for k in range(1, len(folders) + 1))
    return any(_seg(segments[0], f) for f in folders)


def _covers_file(pattern: str, comps: list[str]) -> bool:
    segments, anchored, dir_only = _parse(pattern)
    if dir_only:
        return False
    return _path(segments, comps) if anchored else _seg(segments[0], comps[-1])


def ref_accepts(include: list[str], exclude: list[str], relpath: str) -> bool:
    comps = relpath.split("/")
    if any(fnmatch.fnmatchcase(c, t) for c in comps for t in TEMP_PATTERNS):
        return False
    for p in exclude:
        # gitignore: an exclude drops the file, or anything below a folder it names,
        # whether or not the pattern ends with /.
        if _covers_file(p, comps) or _covers_folder(p, comps[:-1]):
            return False
    if not include:
        return True
    for p in include:
        if _covers_file(p, comps):
            return True
        if _parse(p)[2] and _covers_folder(p, comps[:-1]):
            return True
    return False


def ref_prunes(exclude: list[str], reldir: str) -> bool:
    comps = reldir.split("/")
    if any(fnmatch.fnmatchcase(c, t) for c in comps for t in TEMP_PATTERNS):
        return True
    return any(_covers_folder(p, comps) for p in exclude)


# --- property tests ----------------------------------------------------------------------------

_NAME_CHARS = ["a", "b", "x", ".", "~", "$", " ", "\n", "é", "#", "-", "]"]
_PATTERN_ATOMS = ["a", "b", "x", ".", "*", "?", "[ab]", "[!a]", "[a-x]", "é", " ", "\n", "-"]

names = st.lists(st.sampled_from(_NAME_CHARS), min_size=1, max_size=4).map("".join)
relpaths = st.lists(names, min_size=1, max_size=4).map("/".join)
pattern_segments = st.one_of(
    st.lists(st.sampled_from(_PATTERN_ATOMS), min_size=1, max_size=4).map("".join),
    st.just("**"),
)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    segments = draw(st.lists(pattern_segments, min_size=1, max_size=3))
    lead = draw(st.sampled_from(["", "/"]))
    trail = draw(st.sampled_from(["", "", "/"]))
    pattern = lead + "/".join(segments) + trail
    assume(all(s not in (".", "..") for s in segments))
    return pattern


pattern_lists = st.lists(patterns(), max_size=3)


@settings(max_examples=600, deadline=None)
@given(pattern_lists, pattern_lists, relpaths)
@example(["*.jpg"], ["a/**"], "a/x.jpg")
@example([], ["**"], "a")
@example(["a/**/x"], [], "a/x")
def test_accepts_matches_reference(include: list[str], exclude: list[str], relpath: str) -> None:
    assert PathFilter(include, exclude).accepts(relpath) is ref_accepts(include, exclude, relpath)


@settings(max_examples=300, deadline=None)
@given(pattern_lists, relpaths, st.lists(relpaths, min_size=1, max_size=5))
def test_pruned_folders_hold_nothing_accepted(
    exclude: list[str], reldir: str, below: list[str]
) -> None:
    f = PathFilter([], exclude)
    if f.prunes_dir(reldir):
        for rest in below:
            assert not f.accepts(f"{reldir}/{rest}")


@settings(max_examples=300, deadline=None)
@given(pattern_lists, relpaths)
def test_folders_the_rules_exclude_are_pruned(exclude: list[str], reldir: str) -> None:
    if ref_prunes(exclude, reldir):
        assert PathFilter([], exclude).prunes_dir(reldir)


@settings(max_examples=500, deadline=None)
@given(names)
def test_is_temp_name_matches_fnmatch(name: str) -> None:
    assert is_temp_name(name) is any(fnmatch.fnmatchcase(name, t) for t in TEMP_PATTERNS)
