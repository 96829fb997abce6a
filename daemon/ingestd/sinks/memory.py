"""A sink that keeps everything in memory: the test double for the sync step.

It behaves like a real sink where tests depend on it: it reads every file's bytes
(local or streamed; a reference is kept as its manifest entry) and checks them against
the digest (so a file changed after hashing raises SourceChangedError), a re-sent
identical item is a no-op with the same version, and failures can be scripted. Local
reads are synchronous: files in tests are small, and running them on the loop keeps
call order deterministic.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ingestd.core.errors import PermanentError, SourceChangedError
from ingestd.core.model import FilePayload, ItemPayload, item_key
from ingestd.sinks.base import (
    BatchItem,
    BatchLimits,
    Capabilities,
    Manifest,
    PutResult,
    SinkBase,
    read_chunks,
    reading,
)


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


class MemorySink(SinkBase):
    def __init__(self, capabilities: Capabilities | None = None) -> None:
        self.capabilities = capabilities or Capabilities(metadata_update=True, delete=True)
        self.datasets: set[str] = set()
        # (dataset, key) -> the item as `ingestd items --json` shows it
        self.items: dict[tuple[str, str], dict[str, Any]] = {}
        self.blobs: dict[str, bytes] = {}  # digest -> content
        # ("ensure_dataset", dataset), ("put_item" | "delete_item", dataset, key), ("close",)
        self.calls: list[tuple[str, ...]] = []
        self.closed = False
        self._failures: list[Exception] = []

    def fail_next(self, n: int, exc: Exception) -> None:
        """Make the next `n` put_item/delete_item calls raise `exc` (after recording them)."""
        self._failures.extend([exc] * n)

    def _maybe_fail(self) -> None:
        if self._failures:
            raise self._failures.pop(0)

    async def ensure_dataset(self, dataset: str) -> None:
        self.calls.append(("ensure_dataset", dataset))
        self.datasets.add(dataset)

    async def put_item(
        self, dataset: str, item: ItemPayload, previous: Manifest | None = None
    ) -> PutResult:
        self.calls.append(("put_item", dataset, item.key))
        self._maybe_fail()
        # References (transfer: register) carry no bytes: their manifest entry is all.
        contents = {
            f.digest: await self._read(f)
            for slot in item.slots
            for f in slot.files
            if not f.is_remote
        }
        slots = [s.manifest() for s in item.slots]
        self.datasets.add(dataset)
        self.blobs.update(contents)
        current = self.items.get((dataset, item.key))
        if (
            current is not None
            and _same(current["slots"], slots)
            and _same(current["metadata"], item.metadata)
        ):
            return PutResult(backend_id=item.key, version=current["version"], changed=False)
        version = 1 if current is None else current["version"] + 1
        self.items[(dataset, item.key)] = {
            "key": item.key,
            "path": item.path,
            "name": item.name,
            "version": version,
            "slots": slots,
            "metadata": json.loads(json.dumps(item.metadata)),  # a copy, as a backend holds
        }
        return PutResult(backend_id=item.key, version=version, changed=True)

    async def update_metadata(
        self, dataset: str, item: ItemPayload, backend_id: str | None
    ) -> PutResult:
        """The optional in-place update (MetadataUpdater): only the metadata changes."""
        self.calls.append(("update_metadata", dataset, item.key))
        self._maybe_fail()
        current = self.items.get((dataset, item.key))
        if current is None:  # gone from the backend meanwhile: a put makes it again
            return await self.put_item(dataset, item)
        if _same(current["metadata"], item.metadata):
            return PutResult(backend_id=item.key, version=current["version"], changed=False)
        current["metadata"] = json.loads(json.dumps(item.metadata))
        current["version"] += 1
        return PutResult(backend_id=item.key, version=current["version"], changed=True)

    async def delete_item(self, dataset: str, path: str, name: str) -> None:
        key = item_key(path, name)
        self.calls.append(("delete_item", dataset, key))
        if not self.capabilities.delete:
            raise PermanentError("this sink cannot delete items")
        self._maybe_fail()
        self.items.pop((dataset, key), None)

    async def close(self) -> None:
        self.calls.append(("close",))
        self.closed = True

    @staticmethod
    async def _read(f: FilePayload) -> bytes:
        if f.opener is not None:  # a streamed bucket object
            data = b"".join([block async for block in read_chunks(f)])
            where = getattr(f.opener, "where", None) or f.name
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            if digest != f.digest or len(data) != f.size:
                raise SourceChangedError(f"{where} changed after it was hashed")
            return data
        with reading(f.local_path), open(f.local_path, "rb") as fh:
            data = fh.read()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest != f.digest or len(data) != f.size:
            raise SourceChangedError(
                f"{f.local_path} changed after it was hashed "
                f"(expected {f.digest}, {f.size} bytes; got {digest}, {len(data)} bytes)"
            )
        return data


class BatchingMemorySink(MemorySink):
    """The in-memory double with the optional batch put (capabilities.batch), for the
    tests of the sync step's groups: `groups` records each call's size, `most_at_once`
    the most calls in progress together."""

    def __init__(self, limits: BatchLimits, capabilities: Capabilities | None = None) -> None:
        base = capabilities or Capabilities(remote_urls=True, metadata_update=True, delete=True)
        super().__init__(replace(base, batch=limits))
        self.groups: list[int] = []
        self.sent: dict[str, ItemPayload] = {}  # item key -> the payload last put in a group
        self.most_at_once = 0
        self._at_once = 0

    async def put_items(self, items: Sequence[BatchItem]) -> list[PutResult | Exception]:
        self.groups.append(len(items))
        self._at_once += 1
        self.most_at_once = max(self.most_at_once, self._at_once)
        try:
            await asyncio.sleep(0)  # a real batch call yields; let overlapping calls show
            out: list[PutResult | Exception] = []
            for b in items:
                self.sent[b.item.key] = b.item
                try:
                    out.append(await self.put_item(b.dataset, b.item, b.previous))
                except Exception as e:
                    out.append(e)
            return out
        finally:
            self._at_once -= 1
