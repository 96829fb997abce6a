"""The memory sink: its state is its backend, so every "new" sink is the same one (a
restarted daemon would find what the first one stored)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from ingestd.sinks.base import Sink
from ingestd.sinks.memory import MemorySink

from tests.support.conformance.adapter import Held


class MemoryAdapter:
    name = "memory"
    key_env: str | None = None  # no API key: the fault cases skip this sink

    def __init__(self) -> None:
        self.sink = MemorySink()

    async def make_sink(self) -> Sink:
        return self.sink

    def held(self, dataset: str) -> dict[str, Held]:
        out: dict[str, Held] = {}
        for (ds, key), item in self.sink.items.items():
            if ds != dataset:
                continue
            files: dict[str, bytes | str] = {}
            for slot in item["slots"]:
                for f in slot["files"]:
                    files[f["name"]] = f["url"] if "url" in f else self.sink.blobs[f["digest"]]
            out[key] = Held(files, item["metadata"])
        return out

    def fail_next(self, n: int, status: int, retry_after: float | None = None) -> None:
        raise NotImplementedError("the memory sink answers no HTTP requests")

    def refuse_key(self) -> None:
        raise NotImplementedError("the memory sink has no key")

    def requests(self) -> int:
        return 0


@contextlib.asynccontextmanager
async def open_adapter(tmp_path: Path) -> AsyncIterator[MemoryAdapter]:
    yield MemoryAdapter()
