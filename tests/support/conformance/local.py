"""The local sink on a store in the test's folder, read back through the store's own
catalog and blob files."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from ingestd.sinks.base import Sink
from ingestd.sinks.local import LocalSink
from ingestd.store import CATALOG_FILE
from ingestd.store.catalog import Catalog

from tests.support.conformance.adapter import Held


def held_in_store(root: Path, dataset: str) -> dict[str, Held]:
    """What a store at `root` holds in `dataset`: each item's files' bytes (or a
    registered object's URL) and its metadata (shared with the http adapter, whose
    server keeps the same store)."""
    path = root / CATALOG_FILE
    if not path.exists():
        return {}
    catalog = Catalog(path)
    try:
        items = catalog.list_items(dataset)
    finally:
        catalog.close()
    out: dict[str, Held] = {}
    for item in items:
        files: dict[str, bytes | str] = {}
        for slot in item["slots"]:
            for f in slot["files"]:
                if "url" in f:
                    files[f["name"]] = f["url"]
                else:
                    hexdigest = f["digest"].split(":", 1)[1]
                    blob = root / "blobs" / "sha256" / hexdigest[:2] / hexdigest
                    files[f["name"]] = blob.read_bytes()
        out[item["key"]] = Held(files, item["metadata"])
    return out


class LocalAdapter:
    name = "local"
    key_env: str | None = None  # no API key: the fault cases skip this sink

    def __init__(self, root: Path) -> None:
        self.root = root

    async def make_sink(self) -> Sink:
        return LocalSink(self.root)

    def held(self, dataset: str) -> dict[str, Held]:
        return held_in_store(self.root, dataset)

    def fail_next(self, n: int, status: int, retry_after: float | None = None) -> None:
        raise NotImplementedError("the local store answers no HTTP requests")

    def refuse_key(self) -> None:
        raise NotImplementedError("the local store has no key")

    def requests(self) -> int:
        return 0  # no requests: a store on this machine


@contextlib.asynccontextmanager
async def open_adapter(tmp_path: Path) -> AsyncIterator[LocalAdapter]:
    yield LocalAdapter(tmp_path / "store")
