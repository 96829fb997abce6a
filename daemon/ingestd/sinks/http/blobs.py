"""Blobs one by one, for files too big for a batch: one streamed PUT, or the resumable
upload protocol for big ones (daemon/ingestd/server/API.md). Every request goes
through the kit ApiClient, whose retry loop is the only one; what is here is the
protocol's own state machine, which always continues from the offset the server
holds (a cut PATCH is resumed, never sent again from the start).

Bytes come from kit VerifiedFile passes: size and digest are checked while they stream,
and the last block is held back until both checks pass, so a file that changed after
it was hashed is never completed on the server. A PUT re-opens the file on every
attempt. A resumable upload reads the file once per pass and keeps the chunk in
flight (at most `chunk_size` bytes) so that a retried PATCH sends the same bytes; a
pass starts over only when the server holds fewer bytes than were read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import AsyncIterablePayload

from ingestd.core.errors import RetriableError
from ingestd.core.model import FilePayload
from ingestd.sinks.http.wire import changed, code_of, label
from ingestd.sinks.kit.client import Answer
from ingestd.sinks.kit.verified import VerifiedFile, read_local

READ_CHUNK = 1 << 20  # bytes read from disk per step while streaming a body
_OCTETS = {"Content-Type": "application/octet-stream"}
_NO_PROGRESS = 4  # protocol turns in a row that move nothing before the call gives up


class _Guarded(AsyncIterablePayload):
    """A streamed request body that notices a server which stops reading it: aiohttp
    would otherwise wait for the socket to drain forever (its read timeout starts only
    once the body is sent). Each chunk must be taken within `timeout`, else the
    connection is dropped and the attempt fails like any dropped connection (the kit
    client retries it). Time spent reading the file does not count."""

    def __init__(self, chunks: AsyncIterator[bytes], timeout: float) -> None:
        super().__init__(chunks)
        self._stall = timeout

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        await super().write_with_length(_StallWriter(writer, self._stall), content_length)


class _StallWriter:
    def __init__(self, writer: AbstractStreamWriter, timeout: float) -> None:
        self._writer = writer
        self._timeout = timeout

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._writer.write(chunk)
        except TimeoutError:
            transport = self._writer.transport
            if transport is not None:
                transport.abort()  # a close would wait for the unread bytes to drain
            raise TimeoutError(f"the server took no data for {self._timeout:g} s") from None


def guarded(chunks: AsyncIterator[bytes], timeout: float) -> AsyncIterablePayload:
    return _Guarded(chunks, timeout)


async def _parts(parts: list[bytes]) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


class _Pass:
    """One read of a file handed out in consecutive ranges."""

    def __init__(self, f: FilePayload) -> None:
        self.f = f
        self.chunks: AsyncIterator[bytes] | None = None
        self.pos = 0  # file offset of `head`'s first byte
        self.head = b""

    async def close(self) -> None:
        if self.chunks is not None:
            with contextlib.suppress(RuntimeError):
                await self.chunks.aclose()  # type: ignore[attr-defined]
            self.chunks = None

    async def _block(self) -> bytes:
        if self.head:
            block, self.head = self.head, b""
            return block
        assert self.chunks is not None
        try:
            return await anext(self.chunks)
        except StopAsyncIteration:
            raise RetriableError(f"{label(self.f)}: read past its end") from None

    async def take(self, offset: int, n: int) -> list[bytes]:
        """Bytes [offset, offset + n) of the file, starting a new pass if `offset` is
        behind this one."""
        if self.chunks is None or offset < self.pos:
            await self.close()
            self.chunks = VerifiedFile(self.f, READ_CHUNK).body()
            self.pos, self.head = 0, b""
        out: list[bytes] = []
        want = offset + n
        while self.pos < want:
            block = await self._block()
            start = self.pos
            self.pos += len(block)
            if self.pos > want:
                self.head = block[want - start :]
                self.pos = want
                block = block[: want - start]
            if start + len(block) > offset:
                out.append(block[max(0, offset - start) :])
        return out


@dataclass
class _Held:
    """The chunk in flight (at most chunk_size bytes) and its offset: a PATCH sent again
    sends these bytes, and the next one starts where the server's offset says."""

    start: int
    parts: list[bytes]


def _trim(parts: list[bytes], skip: int) -> list[bytes]:
    out: list[bytes] = []
    for p in parts:
        if skip >= len(p):
            skip -= len(p)
            continue
        out.append(p[skip:])
        skip = 0
    return out


class BlobUploader:
    def __init__(
        self,
        request: Callable[..., Awaitable[Answer]],
        rejection: Callable[[Answer, str], Exception],
        *,
        resumable_threshold: int,
        chunk_size: int,
        head_min_size: int,
        timeout: float,
    ) -> None:
        self._request = request  # (method, path, what, **ApiClient.request's keywords)
        self._rejection = rejection
        self.resumable_threshold = resumable_threshold
        self.chunk_size = max(1, chunk_size)
        self.head_min_size = head_min_size
        self.timeout = timeout
        # digest -> resumable upload id, so a retry (or a later put of the same file in
        # this process) resumes the server's partial upload instead of starting over.
        self.uploads: dict[str, str] = {}
        # digest -> (lock, users): one upload per content at a time; a second item with
        # the same bytes waits and then finds the blob stored.
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def _send(self, method: str, path: str, what: str, **kw: Any) -> Answer:
        return await self._request(method, path, what, **kw)

    async def ensure(self, f: FilePayload, check_first: bool = True) -> None:
        """The server holds `f`'s blob when this returns."""
        async with self._lock(f.digest):
            if f.size < self.resumable_threshold and await self._put(f, check_first):
                return
            await self._resumable(f, check_first)

    @contextlib.asynccontextmanager
    async def _lock(self, digest: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(digest) or (asyncio.Lock(), 0)
        self._locks[digest] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[digest]
            if users <= 1:
                del self._locks[digest]
            else:
                self._locks[digest] = (lock, users - 1)

    async def _stored(self, f: FilePayload, what: str) -> bool:
        ans = await self._send("HEAD", f"/v1/blobs/{f.digest}", what, ok=frozenset({404}))
        return ans.status == 200

    async def _put(self, f: FilePayload, check_first: bool) -> bool:
        """One PUT of the whole blob (tiny blobs without asking first: the PUT costs the
        round trip a HEAD would). False when it is over the server's body limit."""
        what = f"uploading {label(f)}"
        if check_first and f.size >= self.head_min_size and await self._stored(f, what):
            return True
        vf = VerifiedFile(f, READ_CHUNK)
        body: Callable[[], Any]
        if f.size <= READ_CHUNK:
            data = await (asyncio.to_thread(read_local, f) if f.opener is None else vf.read_all())
            body = lambda: data  # noqa: E731
        else:
            body = lambda: guarded(vf.body(), self.timeout)  # noqa: E731
        headers = {**_OCTETS, "Content-Length": str(f.size)}
        ans = await self._send(
            "PUT", f"/v1/blobs/{f.digest}", what, body=body, headers=headers, ok=_PUT_OK
        )
        if vf.error is not None:
            raise vf.error  # the server answered early; the local failure is the news
        if ans.status in (200, 201):
            return True
        if ans.status == 413:
            return False  # chunks may still fit
        if code_of(ans) == "digest_mismatch":
            raise changed(f, _field(ans, "actual"))
        raise self._rejection(ans, what)

    # long: the resumable upload's state machine reads best as one sequence
    async def _resumable(self, f: FilePayload, check_first: bool) -> None:
        """Find what the server holds, send the rest in chunks, complete. Every turn
        continues from the server's offset, never from 0."""
        what = f"uploading {label(f)}"
        if check_first and await self._stored(f, what):
            self.uploads.pop(f.digest, None)
            return
        source = _Pass(f)
        try:
            upload, offset = await self._open_upload(f, what)
            held = _Held(offset, [])
            idle = 0
            while True:
                before = offset
                if offset > f.size:
                    self.uploads.pop(f.digest, None)
                    raise RetriableError(f"{what}: the server held more bytes than the file has")
                if offset < f.size:
                    await self._chunk(source, held, offset)
                    ans = await self._patch(upload, offset, held.parts, what)
                    if ans.status == 404:  # expired or discarded: a new upload
                        self.uploads.pop(f.digest, None)
                        upload, offset = await self._open_upload(f, what)
                    else:
                        offset = _offset(ans, offset)
                else:
                    ans = await self._send(
                        "PUT", upload, what, params={"digest": f.digest}, ok=_COMPLETE_OK
                    )
                    if ans.status in (200, 201):
                        self.uploads.pop(f.digest, None)
                        return
                    if code_of(ans) == "digest_mismatch":
                        self.uploads.pop(f.digest, None)  # the server discarded it
                        raise changed(f, _field(ans, "actual"))
                    if ans.status == 400:
                        raise self._rejection(ans, what)
                    if ans.status == 404:
                        # Gone: perhaps completed under an answer that was lost.
                        self.uploads.pop(f.digest, None)
                        if await self._stored(f, what):
                            return
                        upload, offset = await self._open_upload(f, what)
                    else:  # 416: the server holds a different number of bytes
                        offset = _offset(ans, offset)
                idle = idle + 1 if offset <= before else 0
                if idle >= _NO_PROGRESS:
                    raise RetriableError(f"{what}: the server takes no more bytes; later")
        finally:
            await source.close()

    async def _chunk(self, source: _Pass, held: _Held, offset: int) -> None:
        """Make `held` the chunk starting at `offset`: what is left of the one in flight
        when the server took part of it, else the next one from the pass."""
        size = sum(map(len, held.parts))
        if held.start <= offset < held.start + size:
            held.parts = _trim(held.parts, offset - held.start)
        else:
            held.parts = []  # let it go before the next one is read
            n = min(self.chunk_size, source.f.size - offset)
            held.parts = await source.take(offset, n)
        held.start = offset

    async def _patch(self, upload: str, offset: int, parts: list[bytes], what: str) -> Answer:
        n = sum(map(len, parts))
        headers = {
            **_OCTETS,
            "Content-Length": str(n),
            "Content-Range": f"bytes {offset}-{offset + n - 1}/*",
        }
        return await self._send(
            "PATCH",
            upload,
            what,
            body=lambda: guarded(_parts(parts), self.timeout),
            headers=headers,
            ok=_PATCH_OK,
        )

    async def _open_upload(self, f: FilePayload, what: str) -> tuple[str, int]:
        """The upload this process started for `f` and the server's offset, or a new
        one (the server hands back a live upload declared with the same digest and
        size, so a daemon that restarted resumes too)."""
        upload_id = self.uploads.get(f.digest)
        if upload_id is not None:
            path = f"/v1/uploads/{upload_id}"
            ans = await self._send("HEAD", path, what, ok=frozenset({404}))
            if ans.status == 200:
                return path, int(ans.headers.get("Upload-Offset") or 0)
            self.uploads.pop(f.digest, None)
        ans = await self._send(
            "POST", "/v1/uploads", what, json_body={"digest": f.digest, "size": f.size}
        )
        d = ans.json()
        if not isinstance(d, dict) or not d.get("id"):
            raise RetriableError(f"{what}: the server's upload answer had no id")
        self.uploads[f.digest] = str(d["id"])
        return f"/v1/uploads/{d['id']}", int(d.get("offset") or 0)


_PUT_OK = frozenset({400, 413})
_PATCH_OK = frozenset({404, 416})
_COMPLETE_OK = frozenset({400, 404, 416})


def _field(ans: Answer, name: str) -> Any:
    body = ans.json()
    return body.get(name) if isinstance(body, dict) else None


def _offset(ans: Answer, offset: int) -> int:
    """The server's offset after a PATCH (2xx) or a refused one (416 bad_offset): the
    truth, whatever this side believed."""
    value = ans.headers.get("Upload-Offset") or _field(ans, "offset")
    try:
        return int(value) if value is not None else offset
    except (TypeError, ValueError):
        return offset
