"""The `http` sink: items go to an `ingestd serve` ingestion server
(daemon/ingestd/server/API.md), on the shared sink skeleton (sinks/kit).

Small items (files of at most `small` bytes, and registered bucket objects) travel in
groups: one POST /v1/batch carries their manifests and blobs, and the answer holds a
result per item. Bigger files go as in an OCI registry, bytes first: each blob is
PUT (after a HEAD for those worth asking about) or sent through the resumable upload
protocol (blobs.py), then the item's manifest is PUT, which the server accepts only
once every blob it names is stored. Either way an interrupted put leaves nothing
half-visible, and a redo is idempotent (the server's upsert tells unchanged items).

Every request goes through one kit ApiClient: its retry rule (connection errors, 408,
429, 5xx), full-jitter backoff honouring Retry-After, long waits handed to the ledger.
Outages are handled once for the whole sink by the client's gate (gate.py): one probe
at a time while the server is down, `reachable` False meanwhile, one warning when it
starts and one info when it ends.

The token is sent as a bearer header and appears nowhere else: not in logs, not in
error reasons, not in the URL.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from yarl import URL

from ingestd.core.errors import RetriableError, SyncError
from ingestd.core.model import FilePayload, ItemPayload, item_key
from ingestd.sinks.base import (
    BatchItem,
    BatchLimits,
    Capabilities,
    Manifest,
    PutResult,
    SinkBase,
)
from ingestd.sinks.http import wire
from ingestd.sinks.http.blobs import BlobUploader
from ingestd.sinks.http.gate import OutageGate
from ingestd.sinks.http.groups import item_bytes, read_group
from ingestd.sinks.http.single import OneByOne
from ingestd.sinks.http.tls import CONDITION as TLS_CONDITION
from ingestd.sinks.http.tls import TlsApiClient, client_context
from ingestd.sinks.kit.batches import chunked
from ingestd.sinks.kit.client import Answer
from ingestd.sinks.kit.datasets import DatasetCache

if TYPE_CHECKING:
    from ingestd.config import HttpBackend

# Below this size a blob is PUT without asking first: the PUT costs the same round
# trip as a HEAD, and the server answers 200 for a blob it has.
HEAD_MIN_SIZE = 64 << 10
PAGE_SIZE = 500


class HttpSink(SinkBase):
    capabilities = Capabilities(
        remote_urls=True,
        metadata_update=False,
        delete=True,
        # One request per group: 256 items of 10 KB are ~2.6 MB, well within the
        # server's batch limits (API.md: 1,000 items, 64 MiB, 4 MiB a blob).
        batch=BatchLimits(items=256, bytes=8 << 20, linger=0.05, small=1 << 20),
    )
    page_size = PAGE_SIZE

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        workers: int = 8,
        resumable_threshold: int = 64 << 20,
        chunk_size: int = 8 << 20,
        timeout: float = 60.0,
        key_hint: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL such as http://ingest.example:8750")
        # Drop any user:password@ so that nothing secret reaches logs or reasons; the
        # token is the credential.
        netloc = parts.netloc.rpartition("@")[2]
        self.url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self.key_hint = key_hint or "backend.token_env or backend.token_file"
        headers = {"User-Agent": "ingestd"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.gate = OutageGate(
            self.url, lambda: (self.client.backoff_base, self.client.backoff_cap)
        )
        self.client = TlsApiClient(
            self.url,
            headers,
            per_minute=None,
            key_hint=self.key_hint,
            reject=lambda answer, what: wire.rejection(self.url, self.key_hint, answer, what),
            max_attempts=5,
            backoff_base=0.5,
            backoff_cap=30.0,
            timeout=timeout,
            connections=max(2, workers),
            gate=self.gate,
            ssl_context=ssl_context,
            host=parts.hostname,
        )
        self.blobs = BlobUploader(
            self._request,
            self.client.rejection,
            resumable_threshold=resumable_threshold,
            chunk_size=chunk_size,
            head_min_size=HEAD_MIN_SIZE,
            timeout=timeout,
        )
        self.single = OneByOne(self._request, self.blobs, self.client.rejection)
        self._datasets: DatasetCache[bool] = DatasetCache(self._create_dataset)
        self.batch_route = True  # False once the server said it has no /v1/batch
        self._closed = False

    @classmethod
    def from_backend(cls, backend: HttpBackend, *, workers: int = 8) -> HttpSink:
        """The sink for a configured `backend: {kind: http}`: a refused token names the
        setting it came from."""
        if backend.token_env:
            hint = f"the {backend.token_env} environment variable (backend.token_env)"
        elif backend.token_file:
            hint = f"the token file {backend.token_file} (backend.token_file)"
        else:
            hint = "backend.token_env or backend.token_file (no token is configured)"
        context = None
        if backend.url.startswith("https:"):
            context = client_context(backend.ca_file, backend.client_cert, backend.client_key)
        return cls(
            backend.url, backend.token(), workers=workers, key_hint=hint, ssl_context=context
        )

    def __repr__(self) -> str:  # never the token
        return f"HttpSink({self.url!r})"

    # The retry rule's tuning, on the kit client (tests and one-off tools tighten it).
    @property
    def max_attempts(self) -> int:
        return self.client.max_attempts

    @max_attempts.setter
    def max_attempts(self, n: int) -> None:
        self.client.max_attempts = n

    @property
    def backoff_base(self) -> float:
        return self.client.backoff_base

    @backoff_base.setter
    def backoff_base(self, seconds: float) -> None:
        self.client.backoff_base = seconds

    @property
    def backoff_cap(self) -> float:
        return self.client.backoff_cap

    @backoff_cap.setter
    def backoff_cap(self, seconds: float) -> None:
        self.client.backoff_cap = seconds

    @property
    def reachable(self) -> bool:
        """False while the server refuses connections (between the outage's warning
        and its recovery info): callers can log their own retries quietly meanwhile."""
        return not self.gate.down

    @property
    def problem(self) -> str | None:
        """Why the server cannot be reached now (a TLS problem names the certificate's
        fault), or None: what status shows while items wait."""
        return self.gate.problem

    def _url(self, path: str) -> URL:
        return URL(self.url + path, encoded=True)  # segments are already percent-encoded

    async def _request(self, method: str, path: str, what: str, **kw: Any) -> Answer:
        if self._closed:
            raise RetriableError("the http sink is closed")
        try:
            return await self.client.request(method, self._url(path), what=what, **kw)
        except RetriableError as e:
            if not self.gate.tls or getattr(e, "condition", None) is not None:
                raise
            # The server's certificate (or our trust in it), not this item: the sync
            # pool holds every item and probes with one (RetriableError.condition; set
            # as an attribute so this works whichever of the two changes lands first).
            tls = RetriableError(f"{what} at {self.url}: {self.gate.reason}")
            tls.condition = TLS_CONDITION
            raise tls from e

    # --- the Sink interface ----------------------------------------------------------

    async def ensure_dataset(self, dataset: str) -> None:
        await self._datasets.get(dataset)

    async def _create_dataset(self, dataset: str) -> bool:
        what = f"creating dataset {dataset!r}"
        await self._request("PUT", wire.dataset_path(dataset), what)
        return True

    def _batchable(self, item: ItemPayload) -> bool:
        limits = self.capabilities.batch
        return (
            self.batch_route
            and limits is not None
            and item_bytes(item) <= limits.small
            and all(
                f.local_path or f.opener for s in item.slots for f in s.files if not f.is_remote
            )
        )

    async def put_item(
        self, dataset: str, item: ItemPayload, previous: Manifest | None = None
    ) -> PutResult:
        if self._batchable(item):  # one request instead of a blob's and a manifest's
            (result,) = await self._put_group([(dataset, item)])
            if isinstance(result, Exception):
                raise result
            return result
        return await self.single.put(dataset, item)

    async def put_items(self, items: Sequence[BatchItem]) -> list[PutResult | Exception]:
        """The batch put (sinks.base.BatchPutter): small items in as few POST /v1/batch
        as the limits allow, the others one by one (a few at once)."""
        limits = self.capabilities.batch
        assert limits is not None
        pairs = [(b.dataset, b.item) for b in items]
        out: list[PutResult | Exception | None] = [None] * len(items)
        small = [i for i, (_, item) in enumerate(pairs) if self._batchable(item)]
        alone = [i for i, (_, item) in enumerate(pairs) if not self._batchable(item)]
        for group in chunked(small, limits.items, limits.bytes, lambda i: item_bytes(pairs[i][1])):
            for i, r in zip(group, await self._put_group([pairs[i] for i in group]), strict=True):
                out[i] = r
        for i, r in zip(alone, await self.single.put_each([pairs[i] for i in alone]), strict=True):
            out[i] = r
        return [r for r in out if r is not None]

    async def delete_item(self, dataset: str, path: str, name: str) -> None:
        what = f"deleting item {item_key(path, name)!r} from dataset {dataset!r}"
        # 404: already gone, which is what was asked (a retried DELETE lands here).
        await self._request(
            "DELETE", wire.item_path(dataset, path, name), what, ok=frozenset({404})
        )

    async def close(self) -> None:
        self._closed = True
        self.gate.close()
        await self.client.close()

    # --- listing (for `ingestd items`) -----------------------------------------------

    async def list_items(
        self, dataset: str, prefix: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Every item of `dataset` in key order, as `ingestd items --json` shows them,
        one page of `page_size` at a time. An unknown dataset has no items."""
        what = f"listing dataset {dataset!r}"
        path = f"{wire.dataset_path(dataset)}/items"
        cursor: str | None = None
        while True:
            params = {"limit": str(self.page_size)}
            if prefix:
                params["prefix"] = prefix
            if cursor:
                params["cursor"] = cursor
            ans = await self._request("GET", path, what, params=params, ok=frozenset({404}))
            page = ans.json()
            if ans.status == 404 or not isinstance(page, dict):
                return  # the API's own 404: no such dataset
            for it in page.get("items") or []:
                yield it
            cursor = page.get("next_cursor")
            if not cursor:
                return

    # --- groups ----------------------------------------------------------------------

    async def _put_group(
        self, items: Sequence[tuple[str, ItemPayload]]
    ) -> list[PutResult | Exception]:
        """One POST /v1/batch for `items` (small ones): each item's result or error."""
        blobs, files, failed = await read_group(items)
        wanted = {
            f.digest
            for i, (_, item) in enumerate(items)
            if i not in failed
            for s in item.slots
            for f in s.files
            if not f.is_remote
        }
        frame = wire.frame(items, {d: b for d, b in blobs.items() if d in wanted}, failed)
        out: dict[int, PutResult | Exception] = dict(frame.refused)
        if frame.sent:
            if len(frame.sent) == 1:
                dataset, item = items[frame.sent[0]]
                what = f"storing item {item.key!r} in dataset {dataset!r}"
            else:
                what = f"storing a batch of {len(frame.sent)} items"
            try:
                ans = await self._request(
                    "POST",
                    "/v1/batch",
                    what,
                    body=lambda: frame.body,
                    headers={"Content-Type": wire.BATCH_CONTENT_TYPE},
                    ok=frozenset({404, 405, 413}),
                )
            except SyncError as e:  # the whole request failed: each item hears why
                out.update({i: e for i in frame.sent})
            else:
                out.update(
                    await self._results(ans, [items[i] for i in frame.sent], frame.sent, files)
                )
        return [out[i] for i in range(len(items))]

    async def _results(
        self,
        ans: Answer,
        sent: list[tuple[str, ItemPayload]],
        indices: list[int],
        files: dict[str, FilePayload],
    ) -> dict[int, PutResult | Exception]:
        if ans.status in (404, 405, 413):
            if ans.status != 413:
                # A server older than the batch route: single-item routes from now on.
                self.batch_route = False
            # 413: too big for one request (a small --max-body): each item alone.
            return dict(zip(indices, await self.single.put_each(sent), strict=True))
        body = ans.json()
        results = body.get("results") if isinstance(body, dict) else None
        if not isinstance(results, list) or len(results) != len(sent):
            e = RetriableError(f"the server's batch answer does not list {len(sent)} results")
            return {i: e for i in indices}
        return {
            i: wire.result(dataset, item, r, files, self.url)
            for i, (dataset, item), r in zip(indices, sent, results, strict=True)
        }
