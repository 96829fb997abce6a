"""One item at a time, bytes first, as in an OCI registry: each of its blobs is sent
(blobs.py), then its manifest is PUT, which the server accepts only once every blob it
names is stored. For items too big for a batch, and for servers without batches."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from ingestd.core.errors import PermanentError, RetriableError, SyncError
from ingestd.core.model import FilePayload, ItemPayload
from ingestd.sinks.base import PutResult
from ingestd.sinks.http import wire
from ingestd.sinks.http.blobs import BlobUploader
from ingestd.sinks.kit.client import Answer
from ingestd.sinks.kit.errors import worst

FILES_PER_ITEM = 4  # blobs of one item uploaded at once (a DICOM series can have hundreds)
SINGLES = 4  # items of a group that go one by one, at once


class OneByOne:
    def __init__(
        self,
        request: Callable[..., Awaitable[Answer]],
        blobs: BlobUploader,
        rejection: Callable[[Answer, str], Exception],
    ) -> None:
        self._request = request
        self.blobs = blobs
        self._rejection = rejection

    async def put_each(
        self, items: Sequence[tuple[str, ItemPayload]]
    ) -> list[PutResult | Exception]:
        """`put` for several items, a few at once: each one's result or error."""
        limit = asyncio.Semaphore(SINGLES)

        async def one(dataset: str, item: ItemPayload) -> PutResult | Exception:
            async with limit:
                try:
                    return await self.put(dataset, item)
                except SyncError as e:
                    return e

        return list(await asyncio.gather(*(one(d, it) for d, it in items)))

    async def put(self, dataset: str, item: ItemPayload) -> PutResult:
        # Files registered by URL carry no local bytes; their manifest entry is enough.
        blobs: dict[str, FilePayload] = {}
        for slot in item.slots:
            for f in slot.files:
                if not f.is_remote:
                    blobs.setdefault(f.digest, f)
        await self._upload_all(list(blobs.values()))
        what = f"storing item {item.key!r} in dataset {dataset!r}"
        path = wire.item_path(dataset, item.path, item.name)
        body = wire.manifest_json(item)
        ans = await self._put_manifest(path, body, what)
        if ans.status == 409:
            # The server lost (or never kept) blobs it said it had: send them again, once.
            answer = ans.json()
            missing = [str(d) for d in (answer.get("missing") if isinstance(answer, dict) else [])]
            if not missing or any(d not in blobs for d in missing):
                raise PermanentError(
                    f"{what}: the server misses blobs this item does not hold: {missing}"
                )
            await self._upload_all([blobs[d] for d in missing], check_first=False)
            ans = await self._put_manifest(path, body, what)
            if ans.status == 409:
                raise RetriableError(
                    f"{what}: the server still misses blobs after they were sent again"
                )
        d = ans.json()
        d = d if isinstance(d, dict) else {}
        return PutResult(
            backend_id=str(d.get("key") or item.key),
            version=int(d.get("version") or 1),
            changed=bool(d.get("changed", ans.status == 201)),
        )

    async def _put_manifest(self, path: str, body: bytes, what: str) -> Answer:
        ans = await self._request(
            "PUT",
            path,
            what,
            body=lambda: body,
            headers={"Content-Type": "application/json"},
            ok=frozenset({409}),
        )
        if ans.status == 409 and wire.code_of(ans) != "missing_blobs":
            raise self._rejection(ans, what)
        return ans

    async def _upload_all(self, files: list[FilePayload], *, check_first: bool = True) -> None:
        if len(files) == 1:
            await self.blobs.ensure(files[0], check_first)
            return
        limit = asyncio.Semaphore(FILES_PER_ITEM)

        async def one(f: FilePayload) -> BaseException | None:
            async with limit:
                try:
                    await self.blobs.ensure(f, check_first)
                except Exception as e:
                    return e
                return None

        # Every file finishes (or fails) before the item fails, so no upload is still
        # running when the caller hears about it.
        error = worst(await asyncio.gather(*(one(f) for f in files)))
        if error is not None:
            raise error
