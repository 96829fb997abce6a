"""Item metadata: static values, fields bound from the path, and JSON sidecars.

Pure: the caller reads sidecar files and hands their bytes or parsed content in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Sidecar",
    "bind_path_pattern",
    "build_metadata",
    "check_sidecar_template",
    "compile_path_pattern",
    "is_sidecar_name",
    "parse_sidecar",
    "sidecar_name",
    "sidecar_targets",
    "stem",
    "type_conflicts",
    "value_type",
]

from ingestd.core.names import (  # re-exported: part of the planner's metadata rules
    bind_path_pattern,
    check_sidecar_template,
    compile_path_pattern,
    is_sidecar_name,
    sidecar_name,
    sidecar_targets,
    stem,
)

MAX_SIDECAR_BYTES = 1 << 20  # a bigger sidecar fails its item rather than being read


@dataclass(frozen=True, slots=True)
class Sidecar:
    """A sidecar file as the caller read it: `data` when it held a JSON object, else
    `error`, a clause saying what is wrong (`not valid JSON: ... at line 3 column 5`)."""

    relpath: str
    size: int
    mtime_ns: int
    data: dict[str, Any] | None
    error: str | None = None

    def __post_init__(self) -> None:
        if (self.data is None) == (self.error is None):
            raise ValueError("a Sidecar has either data or an error")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"uses {name}, which JSON does not allow")


def parse_sidecar(relpath: str, size: int, mtime_ns: int, raw: bytes) -> Sidecar:
    """Parse a sidecar's bytes into a Sidecar (pure: the caller does the reading)."""

    def failed(error: str) -> Sidecar:
        return Sidecar(relpath, size, mtime_ns, None, error)

    try:
        # utf-8-sig: Windows tools often write a BOM, which plain UTF-8 JSON rejects.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return failed(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})")
    if not text.strip():
        return failed("empty; it must hold a JSON object")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        return failed(f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
    except ValueError as e:
        return failed(str(e))
    if not isinstance(data, dict):
        return failed(f"holds a JSON {value_type(data) or 'null'}, not an object ({{...}})")
    return Sidecar(relpath, size, mtime_ns, data)


# --- building and checking metadata ---------------------------------------------------------


def build_metadata(
    static: Mapping[str, Any],
    path_fields: Mapping[str, Any] | None,
    sidecar: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Merge the three sources into a new dict. Later sources win per top-level key
    (static < path pattern < sidecar): the most specific source knows best. Nested
    objects are replaced, not merged, so a sidecar fully owns any key it sets."""
    merged: dict[str, Any] = dict(static)
    if path_fields:
        merged.update(path_fields)
    if sidecar:
        merged.update(sidecar)
    return merged


def value_type(v: Any) -> str | None:
    """The JSON type of a metadata value: "string", "number" (int or float, not bool),
    "boolean", "object", "array", or None for null, which constrains nothing."""
    if v is None:
        return None
    if isinstance(v, bool):  # before int: bool is an int subclass
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, Mapping):
        return "object"
    if isinstance(v, list | tuple):
        return "array"
    raise TypeError(f"{type(v).__name__} is not a JSON value")


_ARTICLE = {"string": "a", "number": "a", "boolean": "a", "object": "an", "array": "an"}


def _a(type_name: str) -> str:
    return f"{_ARTICLE.get(type_name, 'a')} {type_name}"


def type_conflicts(metadata: Mapping[str, Any], known: Mapping[str, tuple[str, str]]) -> list[str]:
    """One message per top-level key whose type differs from the dataset's.

    `known` maps key → (type, key of the item that first set it), and must not include
    the item being checked (otherwise an item could never change a value's type).
    Null values never conflict. Messages come in `metadata` order.
    """
    problems: list[str] = []
    for key, value in metadata.items():
        mine = value_type(value)
        if mine is None or key not in known:
            continue
        theirs, other_item = known[key]
        if mine != theirs:
            problems.append(
                f"metadata key {json.dumps(key, ensure_ascii=False)} is {_a(mine)} here "
                f"but {_a(theirs)} on item {other_item} in this dataset; "
                f"make it {_a(theirs)} everywhere (or rename the key)"
            )
    return problems
