"""The embedded dataset store: content-addressed blobs plus an item catalog.

Layout under the root: `blobs/sha256/..` (see blobs.py), `tmp/` for blobs being
written, `catalog.sqlite` (see catalog.py). Items are written after their blobs, so
the catalog never points at bytes the store does not hold.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from ingestd.store.blobs import BlobStore, BlobWrite, DigestMismatch, StoreIOError
from ingestd.store.catalog import Catalog

__all__ = ["BlobStore", "BlobWrite", "Catalog", "DigestMismatch", "Store", "StoreIOError"]

CATALOG_FILE = "catalog.sqlite"


class Store:
    def __init__(self, root: Path, blobs: BlobStore, catalog: Catalog) -> None:
        self.root = root
        self.blobs = blobs
        self.catalog = catalog

    @classmethod
    def open(cls, root: Path) -> Store:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        blobs = BlobStore(root)
        try:
            catalog = Catalog(root / CATALOG_FILE)
        except BaseException:
            blobs.close()
            raise
        return cls(root, blobs, catalog)

    def close(self) -> None:
        self.catalog.close()
        self.blobs.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
