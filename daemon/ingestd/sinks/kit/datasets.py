"""Find-or-create a dataset once per sink, under a lock: the first items of a new
dataset arrive together, and two of them must not create it twice."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class DatasetCache(Generic[T]):
    """What `find_or_create(name)` returned for each dataset name, asked once. A
    failure is not remembered (the next call tries again); `forget(name)` after the
    platform says the dataset is gone (e.g. deleted by hand) makes the next call look
    it up again."""

    def __init__(self, find_or_create: Callable[[str], Awaitable[T]]) -> None:
        self._find_or_create = find_or_create
        self._known: dict[str, T] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, name: str) -> T:
        if name in self._known:
            return self._known[name]
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name not in self._known:
                self._known[name] = await self._find_or_create(name)
            return self._known[name]

    def peek(self, name: str) -> T | None:
        return self._known.get(name)

    def forget(self, name: str) -> None:
        self._known.pop(name, None)
