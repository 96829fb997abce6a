"""A file's bytes as a request body that checks them on the way: exactly `size` bytes,
and the digest the prepare step computed. A file that grew, shrank or changed after it
was hashed raises SourceChangedError *before its last block is sent*: aiohttp stops
pulling a body once Content-Length bytes are out, so a check after the last byte might
never run, and a body cut short is never stored by the receiver.

`VerifiedFile.body()` starts over on every call (one call per attempt), and once a
check failed, every later call raises the same error, so a retry never sends the same
bad bytes again."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence

from ingestd.core.errors import SourceChangedError, SyncError
from ingestd.core.model import FilePayload
from ingestd.sinks.base import read_chunks, read_error


class VerifiedFile:
    def __init__(self, f: FilePayload, chunk: int = 1 << 20) -> None:
        self.file = f
        self.chunk = chunk
        self.error: SyncError | None = None

    @property
    def where(self) -> str:
        f = self.file
        return f.local_path or getattr(f.opener, "where", None) or f.name

    def _fail(self, error: SyncError) -> SyncError:
        if self.error is None:
            self.error = error
        return self.error

    async def body(self) -> AsyncIterator[bytes]:
        if self.error is not None:
            raise self.error
        f = self.file
        h = hashlib.sha256()
        seen = 0
        held: bytes | None = None
        try:
            async for block in read_chunks(f, self.chunk):
                seen += len(block)
                if seen > f.size:
                    raise self._fail(
                        SourceChangedError(
                            f"{self.where} grew after it was hashed ({f.size} bytes)"
                        )
                    )
                h.update(block)
                if held:
                    yield held
                held = block
        except OSError as e:
            raise self._fail(read_error(self.where, e)) from e
        if seen != f.size:
            raise self._fail(
                SourceChangedError(
                    f"{self.where} shrank after it was hashed ({seen} of {f.size} bytes)"
                )
            )
        digest = "sha256:" + h.hexdigest()
        if f.digest and digest != f.digest:
            raise self._fail(
                SourceChangedError(f"{self.where} changed after it was hashed (now {digest})")
            )
        if held:
            yield held

    async def read_all(self) -> bytes:
        """The whole (small) file, checked: for multipart bodies built in memory."""
        return b"".join([b async for b in self.body()])


def read_local(f: FilePayload) -> bytes:
    """A small local file whole, checked as `VerifiedFile.body()` checks it, in one
    blocking call: run on a thread, one trip can read a whole group of small files
    (a trip per file, or four per file through aiofiles, is what small files cost)."""
    where = f.local_path
    try:
        with open(where, "rb") as fh:
            data = fh.read(f.size + 1)
    except OSError as e:
        raise read_error(where, e) from e
    if len(data) > f.size:
        raise SourceChangedError(f"{where} grew after it was hashed ({f.size} bytes)")
    if len(data) < f.size:
        raise SourceChangedError(
            f"{where} shrank after it was hashed ({len(data)} of {f.size} bytes)"
        )
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if f.digest and digest != f.digest:
        raise SourceChangedError(f"{where} changed after it was hashed (now {digest})")
    return data


def read_local_many(files: Sequence[FilePayload]) -> list[bytes | SyncError]:
    """read_local for each of a group's small files, in one blocking call (one thread
    trip); each file's error is its own."""
    out: list[bytes | SyncError] = []
    for f in files:
        try:
            out.append(read_local(f))
        except SyncError as e:
            out.append(e)
    return out
