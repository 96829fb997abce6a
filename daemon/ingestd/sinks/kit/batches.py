"""A group of items split into the requests a platform allows: at most `max_items`
items and about `max_bytes` bytes per request (an item bigger than `max_bytes` goes
alone), order kept."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def chunked(
    items: Sequence[T], max_items: int, max_bytes: int | None = None, size: Callable[[T], int] = len
) -> Iterator[list[T]]:
    if max_items < 1:
        raise ValueError("max_items must be at least 1")
    chunk: list[T] = []
    used = 0
    for item in items:
        n = size(item) if max_bytes is not None else 0
        full = len(chunk) >= max_items or (max_bytes is not None and chunk and used + n > max_bytes)
        if full:
            yield chunk
            chunk, used = [], 0
        chunk.append(item)
        used += n
    if chunk:
        yield chunk
