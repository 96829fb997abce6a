"""The object-store interface a bucket watch needs, and an in-memory double.

Narrow on purpose (httpx-transport style): list a prefix page by page, read a range,
stream an object, download it to a spool file. `sources/bucket.py` implements it for
S3, GCS and Azure; `MemoryObjectStore` implements it for tests of everything above.
Keys are relative to the watch's prefix and use '/'.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ingestd.config import BucketUrl
from ingestd.core.source import SourceChanged, SourceError


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str  # relative to the prefix
    size: int
    etag: str  # without quotes
    mtime_ns: int  # last-modified, in ns since the epoch


class BucketError(SourceError):
    """A named, actionable failure of the object store (core.source.SourceError)."""


class ObjectChanged(SourceChanged):
    """The object is not the version asked for (ETag mismatch) or is gone."""


@runtime_checkable
class ObjectStore(Protocol):
    url: BucketUrl

    def list_pages(self, subprefix: str = "") -> AsyncIterator[list[ObjectInfo]]:
        """Every object under prefix+subprefix, a page at a time (never all in memory).
        Folder placeholder keys (ending in '/') are skipped."""
        ...

    async def head(self, key: str) -> ObjectInfo | None: ...

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) (fewer at the end of the object)."""
        ...

    def stream(
        self, key: str, *, etag: str | None = None, chunk: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        """The object's bytes; raises ObjectChanged when `etag` is given and the object
        is no longer that version."""
        ...

    async def download(self, key: str, dest: str, *, etag: str | None = None) -> None:
        """Write the object to `dest` (for media that must be processed locally)."""
        ...

    def object_url(self, key: str) -> str:
        """The URL a platform can register: s3://bucket/prefix/key, gs://…, az://…"""
        ...

    async def close(self) -> None: ...


def _etag(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class MemoryObjectStore:
    """An object store in a dict, for tests. `fail` makes every call raise that error
    until cleared, to play outages, denied access or a missing bucket."""

    def __init__(self, url: BucketUrl, page_size: int = 1000) -> None:
        self.url = url
        self.page_size = page_size
        self.objects: dict[str, tuple[bytes, str, int]] = {}
        self.fail: BucketError | None = None
        self.calls: list[str] = []

    # -- test side --------------------------------------------------------------------

    def put(self, key: str, data: bytes, mtime_ns: int | None = None) -> ObjectInfo:
        mtime = time.time_ns() if mtime_ns is None else mtime_ns
        self.objects[key] = (data, _etag(data), mtime)
        return ObjectInfo(key, len(data), _etag(data), mtime)

    def delete(self, key: str) -> None:
        del self.objects[key]

    # -- the interface ----------------------------------------------------------------

    def _check(self, call: str) -> None:
        self.calls.append(call)
        if self.fail is not None:
            raise self.fail

    async def list_pages(self, subprefix: str = "") -> AsyncIterator[list[ObjectInfo]]:
        self._check("list")
        keys = sorted(k for k in self.objects if k.startswith(subprefix) and not k.endswith("/"))
        for i in range(0, len(keys), self.page_size):
            page = []
            for k in keys[i : i + self.page_size]:
                if k in self.objects:
                    data, etag, mtime = self.objects[k]
                    page.append(ObjectInfo(k, len(data), etag, mtime))
            yield page
            await asyncio.sleep(0)

    async def head(self, key: str) -> ObjectInfo | None:
        self._check("head")
        if key not in self.objects:
            return None
        data, etag, mtime = self.objects[key]
        return ObjectInfo(key, len(data), etag, mtime)

    def _get(self, key: str, etag: str | None) -> bytes:
        if key not in self.objects:
            raise ObjectChanged(f"{self.object_url(key)} is gone")
        data, current, _ = self.objects[key]
        if etag is not None and etag != current:
            raise ObjectChanged(f"{self.object_url(key)} changed")
        return data

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        self._check("range")
        return self._get(key, None)[start:end]

    async def stream(
        self, key: str, *, etag: str | None = None, chunk: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        self._check("get")
        data = self._get(key, etag)
        for i in range(0, len(data), chunk):
            yield data[i : i + chunk]
            await asyncio.sleep(0)

    async def download(self, key: str, dest: str, *, etag: str | None = None) -> None:
        self._check("get")
        data = self._get(key, etag)
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        with open(dest, "wb") as fh:
            fh.write(data)

    def object_url(self, key: str) -> str:
        return f"{self.url.scheme}://{self.url.bucket}/{self.url.prefix}{key}"

    async def close(self) -> None:
        return None
