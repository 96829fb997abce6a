"""Which files a watch takes: include/exclude patterns with .gitignore habits.

Pattern rules (docs/design.md, "Patterns in include and exclude follow .gitignore habits"):

- A pattern without `/` matches a name at any depth: `*.png` takes `a/b/c.png`.
- A pattern with `/` matches the path relative to the watch root. A leading `/` only
  anchors (`/a.jpg` is the root's `a.jpg`, not `x/a.jpg`).
- `*`, `?` and `[...]` stay inside one folder; `[!...]` and `[^...]` negate a set.
  `**` as a whole segment crosses folders: `a/**/x.jpg` takes `a/x.jpg` and
  `a/b/c/x.jpg`, `**/x` is `x` at any depth, `a/**` is everything below `a`. `**`
  inside a segment (`a**b`) is a plain `*`, as in git.
- A trailing `/` makes a pattern match folders only; it then covers every file below
  such a folder (`raw/` takes or drops everything under any folder named `raw`).
- `\\` escapes the next character (`\\[`, `\\*`, `\\!`).
- Matching is case-sensitive: POSIX names are.

Decided beyond docs/design.md:

- An *exclude* pattern also matches folders (gitignore habit: `exclude: [cache]` drops
  `cache/x.jpg`, `exclude: [a/b]` drops everything below `a/b`). An *include* pattern
  without a trailing `/` matches files only, so `include: ["*.jpg"]` does not take
  `notes.txt` from a folder that happens to be called `shots.jpg/`.
- A leading `!` (gitignore negation) is refused rather than read as a literal, because
  a user writing it expects negation that is not there; write `\\!` for a literal `!`.
- `#` is literal: the lists live in YAML, where comments are YAML's business.
- Temp names (`is_temp_name`) are ignored on every path component whatever the
  patterns say: half-written and hidden files must never become items.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["TEMP_PATTERNS", "PathFilter", "is_temp_name", "translate"]

TEMP_PATTERNS: tuple[str, ...] = (".*", "*.tmp", "*.part", "~$*", "*.crdownload", "*.swp")

# Every regex is compiled with DOTALL so `.` also crosses newlines in names, and uses
# \Z, never $, because $ also matches before a trailing newline.
_FLAGS = re.DOTALL

# A name is one path component; `[^/]` keeps every fragment inside one.
_TEMP_NAME = re.compile(r"(?:\.|~\$|[^/]*\.(?:tmp|part|crdownload|swp)\Z)", _FLAGS)
# The same test for any component, in the form `_Excludes` folds in: searched after a
# `/` over "/" + path. `.*` and `~$*` only need their first characters checked.
_TEMP_COMPONENT = r"\.|~\$|[^/]*\.(?:tmp|part|crdownload|swp)(?:/|\Z)"


def is_temp_name(name: str) -> bool:
    """True for names a writer is still busy with or that are hidden: `.*`, `*.tmp`,
    `*.part`, `~$*` (Office lock files), `*.crdownload` (Chrome), `*.swp` (vim).

    `name` is one path component; a path is never a name (PathFilter checks every
    component of a path)."""
    return "/" not in name and _TEMP_NAME.match(name) is not None


def _segment_regex(segment: str, pattern: str) -> str:
    """Translate one folder-level glob to a regex fragment that never matches `/`."""
    out: list[str] = []
    i, n = 0, len(segment)
    while i < n:
        c = segment[i]
        if c == "*":
            # Runs of stars collapse to one: `**` inside a segment is a plain `*`, and
            # `[^/]*[^/]*` would only add backtracking.
            while i < n and segment[i] == "*":
                i += 1
            out.append("[^/]*")
            continue
        if c == "?":
            out.append("[^/]")
        elif c == "\\":
            if i + 1 == n:
                raise ValueError(f"{pattern!r}: ends with a lone \\; write \\\\ for a backslash")
            i += 1
            out.append(re.escape(segment[i]))
        elif c == "[":
            fragment, i = _bracket(segment, i, pattern)
            out.append(fragment)
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _bracket(segment: str, start: int, pattern: str) -> tuple[str, int]:
    """Translate the `[...]` set starting at `start`; return the fragment and the index
    just past the closing `]`."""
    i = start + 1
    negate = i < len(segment) and segment[i] in "!^"
    if negate:
        i += 1
    body: list[str] = []
    first = True
    while True:
        if i >= len(segment):
            raise ValueError(f"{pattern!r}: [ is never closed; write \\[ for a literal [")
        c = segment[i]
        if c == "]" and not first:
            break
        first = False
        if c == "\\":
            if i + 1 >= len(segment):
                raise ValueError(f"{pattern!r}: [ is never closed; write \\[ for a literal [")
            i += 1
            body.append(re.escape(segment[i]))
        elif c == "[" and segment.startswith("[:", i):
            raise ValueError(
                f"{pattern!r}: character classes such as [[:digit:]] are not supported; "
                "use a range such as [0-9]"
            )
        elif c == "-":
            body.append("-")  # a range, or a literal at either end, as in fnmatch
        else:
            body.append(re.escape(c))
        i += 1
    if body and body[-1] == "-":
        # A trailing - is literal; escaped so that appending `/` below cannot turn it
        # into a range.
        body[-1] = "\\-"
    if negate:
        # `/` goes last: first it would start a range in `[!-a]` (`[^/-a]`).
        fragment = "[^" + "".join(body) + "/]"
    elif "-" in body:
        # A range such as `+-0` spans `/`; a set must never match across folders.
        fragment = "(?!/)[" + "".join(body) + "]"
    else:
        fragment = "[" + "".join(body) + "]"
    try:
        re.compile(fragment)
    except re.error as e:
        raise ValueError(f"{pattern!r}: bad set {segment[start : i + 1]}: {e.msg}") from None
    return fragment, i + 1


def translate(pattern: str) -> tuple[str, bool, bool]:
    """Translate one pattern to `(regex, anchored, dir_only)`.

    `regex` has no anchors of its own. When `anchored` it is meant for the whole path
    relative to the watch root, otherwise for one name. `dir_only` means the pattern
    ended with `/` and names folders only.
    """
    if not pattern:
        raise ValueError("an empty pattern matches nothing; remove it")
    if pattern.startswith("!"):
        raise ValueError(
            f"{pattern!r}: negation (!) is not supported; narrow `include` instead, "
            "or write \\! for a name starting with !"
        )
    body = pattern
    dir_only = body.endswith("/")
    if dir_only:
        body = body[:-1]
    anchored = "/" in body
    if body.startswith("/"):
        body = body[1:]
    if not body:
        raise ValueError(f"{pattern!r}: names no file or folder")
    segments = body.split("/")
    for seg in segments:
        if seg == "":
            raise ValueError(f"{pattern!r}: has an empty folder name (//)")
        if seg in (".", ".."):
            raise ValueError(
                f"{pattern!r}: . and .. are not supported; patterns are relative to the watch root"
            )
    if not anchored:
        return _segment_regex(segments[0], pattern), False, dir_only

    # Collapse `**/**` runs: they mean the same and would only add backtracking.
    collapsed: list[str] = []
    for seg in segments:
        if seg == "**" and collapsed and collapsed[-1] == "**":
            continue
        collapsed.append(seg)
    parts: list[str] = []
    last = len(collapsed) - 1
    for k, seg in enumerate(collapsed):
        if seg == "**":
            if k == last:
                # `a/**`: everything below a (the `/` before it is already emitted).
                parts.append(".*")
            else:
                # `**/`: zero or more whole folders, each with its own slash.
                parts.append("(?:.*/)?")
            continue
        parts.append(_segment_regex(seg, pattern))
        if k != last:
            parts.append("/")
    return "".join(parts), True, dir_only


_ANY = "[^/]*"


def _literal_suffix(pattern: str) -> str | None:
    """For `*.jpg`-style patterns (a star, then plain text), the text; else None."""
    if not pattern.startswith("*") or pattern.startswith("**"):
        return None
    rest = pattern[1:]
    return None if any(c in rest for c in "*?[\\/") else rest


class _Excludes:
    """All exclude patterns plus the temp names, as at most two regexes.

    Unanchored patterns (and the temp names) sit behind one literal `/` and are searched
    over "/" + path, so the regex engine jumps from slash to slash instead of trying
    every position. Anchored ones need the path start and get their own regex.
    """

    __slots__ = ("anchored", "components")

    def __init__(self, patterns: Sequence[str]) -> None:
        components = [_TEMP_COMPONENT]
        anchored: list[str] = []
        for p in patterns:
            rx, is_anchored, dir_only = _translate_for("exclude", p)
            end = "/" if dir_only else r"(?:/|\Z)"
            if not dir_only and rx.endswith(_ANY):
                # `foo*` covers every name starting with foo: the rest of the component
                # always matches, so stop looking there.
                rx, end = rx[: -len(_ANY)], ""
            (anchored if is_anchored else components).append(f"(?:{rx}){end}")
        self.components = re.compile("/(?:" + "|".join(components) + ")", _FLAGS)
        self.anchored = re.compile("|".join(anchored), _FLAGS) if anchored else None

    def covers(self, relpath: str) -> bool:
        if self.components.search("/" + relpath) is not None:
            return True
        return self.anchored is not None and self.anchored.match(relpath) is not None


class _Includes:
    """All include patterns, sorted by how cheaply they can be tested."""

    __slots__ = ("anchored", "folders", "has_regexes", "names", "suffixes")

    def __init__(self, patterns: Sequence[str]) -> None:
        suffixes: list[str] = []
        names: list[str] = []
        folders: list[str] = []
        anchored: list[str] = []
        for p in patterns:
            rx, is_anchored, dir_only = _translate_for("include", p)
            suffix = _literal_suffix(p)
            if suffix is not None:
                suffixes.append(suffix)  # `*.jpg`: str.endswith beats any regex
            elif is_anchored:
                anchored.append(f"(?:{rx})/" if dir_only else rf"(?:{rx})\Z")
            elif dir_only:
                folders.append(rx)
            else:
                names.append(rx)
        self.suffixes = tuple(suffixes)
        self.names = re.compile("|".join(names), _FLAGS) if names else None
        self.folders = re.compile("/(?:" + "|".join(folders) + ")/", _FLAGS) if folders else None
        self.anchored = re.compile("|".join(anchored), _FLAGS) if anchored else None
        self.has_regexes = bool(names or folders or anchored)

    def covers(self, relpath: str) -> bool:
        """True when a pattern other than the suffixes takes `relpath`."""
        if self.names is not None and self.names.fullmatch(relpath, relpath.rfind("/") + 1):
            return True
        if self.folders is not None and self.folders.search("/" + relpath):
            return True
        return self.anchored is not None and self.anchored.match(relpath) is not None


def _translate_for(kind: str, pattern: str) -> tuple[str, bool, bool]:
    try:
        return translate(pattern)
    except ValueError as e:
        raise ValueError(f"{kind} pattern {e}") from None


class PathFilter:
    """Decides which files of a watch become items. Immutable and cheap to share.

    Patterns are compiled once, and grouped so that `accepts` costs one regex search
    for the excludes and temp names plus, for the usual `*.ext` includes, one
    `str.endswith`, whatever the number of patterns.
    """

    __slots__ = (
        "_exclude_anchored",
        "_exclude_components",
        "_excludes",
        "_include_others",
        "_include_suffixes",
        "exclude",
        "include",
    )

    def __init__(self, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
        if isinstance(include, str) or isinstance(exclude, str):
            # A bare string would be read as a list of one-character patterns.
            raise TypeError("include and exclude are sequences of patterns, not strings")
        self.include: tuple[str, ...] = tuple(include)
        self.exclude: tuple[str, ...] = tuple(exclude)
        includes = _Includes(self.include)
        self._excludes = _Excludes(self.exclude)
        # Bound methods and plain attributes, read once per call: `accepts` runs for
        # every file of every rescan, and attribute hops are a visible share of it.
        self._include_suffixes = includes.suffixes if self.include else None
        self._include_others = includes if includes.has_regexes else None
        self._exclude_components = self._excludes.components.search
        anchored = self._excludes.anchored
        self._exclude_anchored = anchored.match if anchored is not None else None

    def accepts(self, relpath: str) -> bool:
        """True when the file at `relpath` (`/`-separated, relative to the watch root)
        matches some include (or include is empty) and no exclude or temp name."""
        suffixes = self._include_suffixes
        if (
            suffixes is not None
            and not relpath.endswith(suffixes)
            and (self._include_others is None or not self._include_others.covers(relpath))
        ):
            return False
        if self._exclude_components("/" + relpath) is not None:
            return False
        return self._exclude_anchored is None or self._exclude_anchored(relpath) is None

    def prunes_dir(self, reldir: str) -> bool:
        """True when no file below the folder `reldir` can be accepted because the
        folder (or one above it) has a temp/hidden name or matches an exclude."""
        # Testing "reldir/" asks exactly "does an exclude cover reldir as a folder": each
        # exclude ends in `/`, `(?:/|\Z)` or a trailing-star shortcut, and `a/**`
        # (`a/.*`) matches "a/" because everything below `a` is excluded.
        return self._excludes.covers(reldir + "/")

    def __repr__(self) -> str:
        return f"PathFilter(include={list(self.include)!r}, exclude={list(self.exclude)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PathFilter):
            return NotImplemented
        return (self.include, self.exclude) == (other.include, other.exclude)

    def __hash__(self) -> int:
        return hash((self.include, self.exclude))
