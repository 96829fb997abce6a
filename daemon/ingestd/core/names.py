"""Path patterns and sidecar file names: pure text rules shared by config validation
(config.py checks them at load) and the planner (plan/metadata.py applies them)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Set

# --- path patterns ------------------------------------------------------------------------

_TOKEN = re.compile(r"\{([^{}]*)\}|\*+|[{}]|[^{}*]+")


@functools.lru_cache(maxsize=256)
def compile_path_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a metadata path pattern such as `{camera}/{date}/*`; ValueError when it
    is malformed. Cached: the same few patterns are applied to every file.

    Segments are separated by `/` and matched against the whole relative path:

    - `{field}` binds a whole segment, or part of one next to literals
      (`cam-{camera}`, `{date}_{seq}.jpg`); it never binds an empty string.
    - `*` matches a segment or part of one; `**` (a whole segment) matches zero or more
      segments, or one or more when it ends the pattern (as `a/**` in .gitignore).
    - Anything else is literal.

    When a segment is ambiguous (`{date}_{seq}` against `2024_05_01`), fields and `*`
    take as little as possible from left to right, so the last one takes the rest
    (`date=2024`, `seq=05_01`), the convention of the `parse` library.
    """
    if not pattern or not pattern.strip():
        raise ValueError("the path pattern is empty")
    if pattern.startswith("/"):
        raise ValueError(
            f"{pattern!r}: must be relative to the watch root, such as {{camera}}/{{date}}/*"
        )
    segments = pattern.split("/")
    if "" in segments:
        raise ValueError(f"{pattern!r}: has an empty segment (// or a trailing /)")
    # Collapse `**/**`: same meaning, less backtracking.
    collapsed: list[str] = []
    for seg in segments:
        if not (seg == "**" and collapsed and collapsed[-1] == "**"):
            collapsed.append(seg)
    seen: set[str] = set()
    parts: list[str] = []
    last = len(collapsed) - 1
    for k, seg in enumerate(collapsed):
        if seg == "**":
            parts.append(r"[^/]+(?:/[^/]+)*" if k == last else r"(?:[^/]+/)*")
            continue
        for m in _TOKEN.finditer(seg):
            text = m.group(0)
            if m.group(1) is not None:
                field = m.group(1)
                if not field.isidentifier():
                    raise ValueError(f"{pattern!r}: {{{field}}} is not a valid field name")
                if field in seen:
                    raise ValueError(f"{pattern!r}: field {{{field}}} appears twice")
                seen.add(field)
                parts.append(f"(?P<{field}>[^/]+?)")
            elif text in ("{", "}"):
                raise ValueError(f"{pattern!r}: unbalanced {text}")
            elif text.startswith("*"):
                if len(text) > 1:
                    raise ValueError(f"{pattern!r}: ** must be a whole segment, as in a/**/b")
                parts.append(r"[^/]*?")
            else:
                parts.append(re.escape(text))
        if k != last:
            parts.append("/")
    # DOTALL: names may hold newlines, and `[^/]` already matches them.
    return re.compile("".join(parts), re.DOTALL)


def bind_path_pattern(pattern: str, relpath: str) -> dict[str, str] | None:
    """The fields `pattern` binds in `relpath`, or None when the path does not match.

    `bind_path_pattern("{camera}/{date}/*", "cam1/2024-05-01/a.jpg")` is
    `{"camera": "cam1", "date": "2024-05-01"}`. Values stay strings: a folder named
    `007` is a name, not the number 7. See `compile_path_pattern` for the syntax.
    """
    m = compile_path_pattern(pattern).fullmatch(relpath)
    return None if m is None else m.groupdict()


# --- sidecars -------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{(name|stem)\}")


def stem(file_name: str) -> str:
    """The name without its last extension (`a.tar.gz` → `a.tar`). A leading dot starts
    a hidden name, not an extension (`.env` → `.env`), as in pathlib."""
    dot = file_name.rfind(".")
    return file_name[:dot] if dot > 0 else file_name


@functools.lru_cache(maxsize=64)
def _template_shape(template: str) -> tuple[str, str]:
    """(literal prefix, literal suffix) of a sidecar template; ValueError when unusable."""
    if "/" in template:
        raise ValueError(f"sidecar {template!r}: must name a file beside the item, without /")
    marks = list(_PLACEHOLDER.finditer(template))
    if not marks:
        raise ValueError(
            f'sidecar {template!r}: must contain {{name}} or {{stem}}, e.g. "{{name}}.json"'
        )
    rest = _PLACEHOLDER.sub("", template)
    if "{" in rest or "}" in rest:
        raise ValueError(f"sidecar {template!r}: only {{name}} and {{stem}} may be used")
    prefix = template[: marks[0].start()]
    suffix = template[marks[-1].end() :]
    if not prefix and not suffix:
        # Every file would then be some other file's sidecar.
        raise ValueError(
            f'sidecar {template!r}: needs literal text before or after the placeholder, e.g. "{{name}}.json"'
        )
    return prefix, suffix


def check_sidecar_template(template: str) -> None:
    """ValueError unless `template` is usable: `{name}`/`{stem}` only, no `/`, and literal
    text before or after the placeholders (so that not every file is a sidecar)."""
    _template_shape(template)


def sidecar_name(template: str, file_name: str) -> str:
    """The sidecar's file name for `file_name`: `{name}` is the whole name, `{stem}` the
    name without its last extension (`a.jpg`: `{name}.json` → `a.jpg.json`,
    `{stem}.json` → `a.json`)."""
    return _sidecar_for(template, file_name)


def _sidecar_for(template: str, file_name: str) -> str:
    # Separate from sidecar_name because sidecar_targets' parameter shadows that name.
    _template_shape(template)
    values = {"name": file_name, "stem": stem(file_name)}
    # One pass with a function, so a `{stem}` inside a file name is never substituted.
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def is_sidecar_name(template: str, name: str) -> bool:
    """True when a file called `name` is treated as a sidecar (never as an item).

    The rule is the template's shape, not the presence of a matching file: a name that
    starts with the template's literal prefix and ends with its literal suffix (with
    something in between) is a sidecar. With `{name}.json` or `{stem}.json` that is
    every `*.json` file, even one no item claims. Deciding by name alone keeps the
    decision stable: a sidecar that lands before its image never briefly becomes an
    item of its own, and an orphaned one never turns into one when its image goes.
    """
    prefix, suffix = _template_shape(template)
    return (
        len(name) > len(prefix) + len(suffix) and name.startswith(prefix) and name.endswith(suffix)
    )


def sidecar_targets(template: str, sidecar_name: str, sibling_names: Iterable[str]) -> list[str]:
    """The sibling files (names in the sidecar's folder) whose sidecar is `sidecar_name`,
    sorted. With `{name}.json` at most one; with `{stem}.json` every sibling of that
    stem (`a.json` → `a.jpg`, `a.png`). Sidecars themselves are never targets, so
    `a.json.json` belongs to no one under `{name}.json`."""
    prefix, suffix = _template_shape(template)
    if not is_sidecar_name(template, sidecar_name):
        return []
    if template == prefix + "{name}" + suffix:
        # The common case inverts directly, so a folder of 10k images costs no scan
        # when the caller passes a set.
        target = sidecar_name[len(prefix) : len(sidecar_name) - len(suffix)]
        if is_sidecar_name(template, target):
            return []
        found = (
            target in sibling_names
            if isinstance(sibling_names, Set)
            else any(s == target for s in sibling_names)
        )
        return [target] if found else []
    return sorted(
        {
            s
            for s in sibling_names
            if s != sidecar_name
            and not is_sidecar_name(template, s)
            and _sidecar_for(template, s) == sidecar_name
        }
    )
