"""The requests the darwin sink sends to V7, on the kit's ApiClient: one client for the
API (the key's budget of 1,000 requests a minute, V7's retry rule) and one for the
pre-signed storage URLs (no key, no budget: V7 counts API requests, and a PUT to
storage is not one)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urljoin

import structlog

from ingestd.config import DarwinBackend
from ingestd.core.errors import PermanentError, RetriableError
from ingestd.sinks.darwin.api import (
    DEFAULT_BASE_URL,
    DEFAULT_REQUESTS_PER_MINUTE,
    LOOKUP_NAMES,
    PAGE_SIZE,
    Dataset,
    Found,
    Key,
    Registered,
    read_found,
    read_registered,
    slugify,
)
from ingestd.sinks.darwin.shapes import Source
from ingestd.sinks.kit.batches import chunked
from ingestd.sinks.kit.client import Answer, ApiClient, Verdict, auth_or_rejection, http_rule

log = structlog.get_logger("ingestd.sink.darwin")

# What a refused PUT to storage answers (the body is not worth a retry of the same URL).
_STORAGE_REFUSALS = frozenset({400, 401, 403, 404, 411, 413, 501})
_URL_BUDGET = 4000  # characters of names and paths per lookup request
_TAKEN = frozenset({422})  # a dataset name "has already been taken"


def _error_code(answer: Answer) -> str:
    data = answer.json()
    errors = data.get("errors") if isinstance(data, Mapping) else None
    return str(errors.get("code") or "") if isinstance(errors, Mapping) else ""


def v7_rule(answer: Answer) -> Verdict:
    """V7's retry rule: 429 and 5xx are retried, except the 429 V7 sends when the team
    is out of storage (darwin-py's InsufficientStorage), which waiting does not fix."""
    if answer.status == 429 and _error_code(answer) == "INSUFFICIENT_REMAINING_STORAGE":
        return "reject"
    return http_rule(answer)


class DatasetGone(RetriableError):
    """V7 no longer knows a dataset this sink found or made (deleted by hand)."""


class V7:
    def __init__(self, backend: DarwinBackend, connections: int) -> None:
        self.team = backend.team
        self.base = (backend.base_url or DEFAULT_BASE_URL).rstrip("/")
        if backend.api_key_file is not None:
            hint = f"backend.api_key_file ({backend.api_key_file})"
        else:
            hint = f"the {backend.api_key_env} environment variable (backend.api_key_env)"
        self.api = ApiClient(
            "V7",
            {"Authorization": f"ApiKey {backend.api_key()}", "Accept": "application/json"},
            per_minute=backend.requests_per_minute or DEFAULT_REQUESTS_PER_MINUTE,
            key_hint=hint,
            rule=v7_rule,
            reject=self._rejection,
            connections=connections,
        )
        self.storage = ApiClient(
            "V7 storage",
            {},
            per_minute=None,
            key_hint="the pre-signed upload URL",
            connections=connections,
        )

    def __repr__(self) -> str:  # never the key
        return f"V7(team={self.team!r}, base={self.base!r})"

    def _rejection(self, answer: Answer, what: str) -> Exception:
        if _error_code(answer) == "INSUFFICIENT_REMAINING_STORAGE":
            return PermanentError(
                f"V7 {what}: the team is out of storage (INSUFFICIENT_REMAINING_STORAGE); "
                "free space or raise the plan's storage in V7, then run `ingestd retry`"
            )
        return auth_or_rejection("V7", self.api.key_hint, answer, what)

    def v2(self, tail: str) -> str:
        return f"{self.base}/v2/teams/{quote(self.team, safe='')}/{tail}"

    async def close(self) -> None:
        await self.api.close()
        await self.storage.close()

    # --- datasets ------------------------------------------------------------------

    async def find_or_create(self, name: str) -> Dataset:
        found = await self._find_dataset(name)
        if found is not None:
            return found
        what = f"creating dataset {name!r}"
        ans = await self.api.request(
            "POST", f"{self.base}/datasets", what=what, json_body={"name": name}, ok=_TAKEN
        )
        if ans.status == 422:
            # "has already been taken": made meanwhile, or under a name that slugs the same
            found = await self._find_dataset(name)
            if found is not None:
                return found
            raise PermanentError(
                f"V7 {what}: refused ({ans.text()}); a dataset with this name or slug "
                f"({slugify(name)}) may exist but be archived or hidden from this API key: "
                "restore it in V7 or choose another dataset name"
            )
        d = ans.json()
        if not isinstance(d, Mapping) or "id" not in d:
            raise RetriableError(f"V7 {what}: unexpected answer {ans.text(120)!r}")
        log.info("created dataset on V7", dataset=name, slug=d.get("slug"))
        return Dataset(int(d["id"]), str(d.get("slug") or slugify(name)), name)

    async def _find_dataset(self, name: str) -> Dataset | None:
        ans = await self.api.request("GET", f"{self.base}/datasets", what="listing datasets")
        data = ans.json()
        if not isinstance(data, list):
            raise RetriableError(f"V7 listing datasets: unexpected answer {ans.text(120)!r}")
        slug = slugify(name)
        for d in data:
            if isinstance(d, Mapping) and (d.get("slug") == slug or d.get("name") == name):
                return Dataset(int(d["id"]), str(d.get("slug") or slug), name)
        return None

    # --- items ---------------------------------------------------------------------

    async def register(
        self, ds: Dataset, items: list[dict[str, Any]], storage_slug: str | None, what: str
    ) -> Registered:
        """One register request for `items` (uploads when `storage_slug` is None, else
        bucket objects through register_existing)."""
        body: dict[str, Any] = {"dataset_slug": ds.slug, "items": items}
        if storage_slug is not None:
            body["storage_slug"] = storage_slug
            route = "items/register_existing"
        else:
            route = "items/register_upload"
        ans = await self.api.request(
            "POST", self.v2(route), what=what, json_body=body, ok=frozenset({404})
        )
        if ans.status == 404:
            raise DatasetGone(
                f"V7 {what}: dataset {ds.slug!r} was not found ({ans.text()}); it is "
                "created again on the next attempt"
            )
        data = ans.json()
        if not isinstance(data, Mapping):
            raise RetriableError(f"V7 {what}: unexpected answer {ans.text(120)!r}")
        return read_registered(data)

    async def find(self, ds: Dataset, keys: Sequence[Key]) -> dict[Key, Found]:
        """What the dataset holds at each of `keys`: one listing per ~100 names (V7
        filters by names and by paths; the exact pairs are picked here), paged."""
        out: dict[Key, Found] = {k: Found() for k in keys}
        for chunk in chunked(keys, LOOKUP_NAMES, _URL_BUDGET, _key_length):
            wanted = set(chunk)
            base: list[tuple[str, Any]] = [("dataset_ids[]", ds.id)]
            base += [("item_names[]", n) for n in sorted({n for _, n in chunk})]
            base += [("item_paths[]", p) for p in sorted({p for p, _ in chunk})]
            base.append(("page[size]", PAGE_SIZE))
            cursor: Any = None
            what = f"looking up {len(chunk)} item(s) in dataset {ds.name!r}"
            for _ in range(10_000):
                params = base if cursor is None else [*base, ("page[from]", cursor)]
                ans = await self.api.request("GET", self.v2("items"), what=what, params=params)
                data = ans.json()
                if not isinstance(data, Mapping) or not isinstance(data.get("items"), list):
                    raise RetriableError(f"V7 {what}: unexpected answer {ans.text(120)!r}")
                read_found(data["items"], wanted, out)
                page = data.get("page")
                cursor = page.get("next") if isinstance(page, Mapping) else None
                if not cursor:
                    break
        return out

    async def remove(self, ds: Dataset, ids: Sequence[str], how: str, what: str) -> None:
        """Archive or delete items, all in one request."""
        if not ids:
            return
        body = {"filters": {"item_ids": list(ids), "dataset_ids": [ds.id]}}
        if how == "archive":
            await self.api.request(
                "POST", self.v2("items/archive"), what=f"archiving {what}", json_body=body
            )
        else:
            await self.api.request(
                "DELETE", self.v2("items"), what=f"deleting {what}", json_body=body
            )

    # --- bytes ---------------------------------------------------------------------

    async def upload(self, src: Source, upload_id: str, key: str) -> None:
        """sign, PUT, confirm: one V7 file. An expired or refused signature is signed
        again once; the bytes are checked while they stream, and a source that
        changed is never confirmed."""
        uid = quote(upload_id, safe="")
        for attempt in range(2):
            ans = await self.api.request(
                "GET", self.v2(f"items/uploads/{uid}/sign"), what=f"signing {src.file_name}"
            )
            data = ans.json()
            url = data.get("upload_url") if isinstance(data, Mapping) else None
            if not url:
                raise RetriableError(f"V7 signing {src.file_name}: no upload_url in the answer")
            put = await self._put(urljoin(self.base + "/", str(url)), src, key)
            if put.status < 300:
                break
            if put.status in (400, 403) and attempt == 0:
                continue  # e.g. the signature expired while a retry waited
            raise PermanentError(
                f"V7 storage refused {src.file_name} of item {key} (HTTP {put.status}: "
                f"{put.text() or 'no message'})"
            )
        await self.api.request(
            "POST",
            self.v2(f"items/uploads/{uid}/confirm"),
            what=f"confirming {src.file_name} of item {key}",
            json_body={},
        )

    async def _put(self, url: str, src: Source, key: str) -> Answer:
        # A body whose verified stream fails ends the request with that error (the
        # kit's client), and `src.body` raises it again rather than resend the bytes.
        return await self.storage.request(
            "PUT",
            url,
            what=f"uploading {src.file_name} of item {key}",
            body=src.body,
            headers={
                "Content-Length": str(src.size),
                "Content-Type": "application/octet-stream",
            },
            auth=False,
            ok=_STORAGE_REFUSALS,
        )


def _key_length(k: Key) -> int:
    return len(k[0]) + len(k[1])
