"""A fake Labelbox GraphQL API on 127.0.0.1, for the labelbox sink's contract tests.

It follows what docs/platforms.md records and what labelbox-python 7.17 sends and
reads (lbox/request_client.py `execute`, client.py `create_dataset` and `upload_data`,
schema/dataset.py `upsert_data_rows` and `create_data_rows`, schema/internal/,
schema/task.py `DataUpsertTask`, schema/data_row_metadata.py, schema/organization.py
`get_iam_integrations`, client.py `get_data_row_ids_for_global_keys`), which
tests/e2e/test_labelbox_sdk.py runs against it, and the limits page (global keys of
at most 200 characters). Ids are 25 characters, as the SDK's models require.

- One endpoint, `POST /graphql`, header `Authorization: Bearer <key>`; a missing or
  wrong key is HTTP 401 with an AUTHENTICATION_ERROR. Queries are parsed with
  graphql-core: a syntax error is 400 GRAPHQL_PARSE_FAILED, a field this API does not
  have (on the root or inside a selection) is 400 GRAPHQL_VALIDATION_FAILED, a bad
  input is an INTERNAL_SERVER_ERROR with `exception.status` 400 (what the SDK calls a
  client error labelled server-side). Answers contain only the selected fields;
  inline fragments (`... on AwsIamIntegrationSettings {...}`) and `__typename` work.
- Datasets: `createDataset` (the SDK's Dataset fields), `updateDataset` (`deleted`),
  `organization`, `iamIntegrations` (none until `add_integration`), and
  `setSignerForDataset` / `validateDataset` as `create_dataset` uses them; a dataset's
  integration reads back as `signer`.
- `uploadFile` only as a GraphQL multipart request (`operations` with `file: null`,
  `map` = {"1": ["variables.file"]}, file part `1`); `contentLength` must match the
  bytes. The hosted URL is `<base>/files/<id>/<filename>`, built without encoding as
  the real one is said to be ("`#` in file names breaks URLs"), and `GET` on it serves
  the bytes only when the path names the file exactly.
- `upsertDataRows(data: {manifestUri})` reads the manifest
  `{"source", "item_count", "chunk_uris"}` and the JSON chunks (at most 10 MB each)
  from URLs this fake handed out, and answers a task. Rows are
  `{"id": {"type": GKEY|ID|AUTO, "value"}, "payload": {...}}`; GKEY "could be
  existing or non-existing" (labelbox-python KeyType): it updates the row holding the
  key or creates one. An update replaces the fields given, attachments and metadata
  included (labelbox-python's upsert tests: attachments 3 -> 1). Refused rows (a
  non-https `row_data`, a duplicate global key in one task: "Duplicate global key:
  '<key>'", unknown media or attachment types, metadata that does not fit its schema,
  a global key over 200 characters) are listed by `failedDataRowImports` with their
  message and spec; the task itself ends COMPLETE (FAILED when `fail_tasks` is set,
  `end_status` otherwise). Tasks say IN_PROGRESS for `task_polls` polls of
  `user { createdTasks(where: {id}) }` and at least `task_seconds`. Media types are
  labelbox 7.x's `MediaType` (no DICOM).
- Metadata: `customMetadataOntology` (reserved `tag`, `split` [train, valid, test],
  `captureDateTime`, plus custom schemas), `upsertCustomMetadataSchema` (a name in use
  or more than `max_custom_fields` custom fields is refused),
  `upsertDataRowCustomMetadata` (merges fields; answers only failures),
  `deleteDataRowCustomMetadata`, `dataRowCustomMetadata` by GKEY or ID.
- Deletes: `dataRowsForGlobalKeys` starts a job whose `dataRowsForGlobalKeysResult`
  lists `fetchedDataRows` in input order ("" for keys without a row) and
  `notFoundGlobalKeys`; `deleteDataRows(where: {dataRowIds})` deletes and frees the key.
- Faults: `fail_next` answers the next requests (optionally only one operation) with a
  status such as 429 and a Retry-After; `error_next` and `limit_next` with an HTTP 200
  carrying a GraphQL error or an exceeded API limit, as Labelbox does;
  `drop_next_upload` closes the connection after part of an upload body;
  `hold_uploads` keeps upload answers back until released (`most_uploading` counts the
  uploads answered at once).

Run in-process (`LabelboxFake`, started on a free port) or as a process:
`python -m tests.support.fakes.labelbox --key KEY [--port P] [--task-seconds S]`, which
prints `LISTENING <port>` and has control routes under `/_fake/` (state, fault, hold,
iam) for end-to-end tests and benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import itertools
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from aiohttp import web
from graphql import (
    DocumentNode,
    FieldNode,
    GraphQLError,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    parse,
    value_from_ast_untyped,
)

from tests.support.ports import listen

CHUNK_MAX = 10_000_000
GLOBAL_KEY_MAX = 200
# labelbox-python 7.x's MediaType (labelbox/schema/media_type.py): no DICOM.
MEDIA_TYPES = {
    "AUDIO",
    "CONVERSATIONAL",
    "HTML",
    "IMAGE",
    "LLM",
    "PDF",
    "POINT_CLOUD",
    "TEXT",
    "TMS_GEO",
    "TMS_SIMPLE",
    "VIDEO",
}
ATTACHMENT_TYPES = {"IMAGE", "VIDEO", "IMAGE_OVERLAY", "HTML", "RAW_TEXT", "TEXT_URL", "PDF_URL"}
PAYLOAD_KEYS = {
    "row_data",
    "global_key",
    "external_id",
    "media_type",
    "metadata_fields",
    "attachments",
    "dataset_id",
}
QUERY_FIELDS = {
    "datasets",
    "organization",
    "iamIntegrations",
    "user",
    "failedDataRowImports",
    "successesfulDataRowImports",
    "customMetadataOntology",
    "dataRowCustomMetadata",
    "dataRowsForGlobalKeys",
    "dataRowsForGlobalKeysResult",
}
MUTATION_FIELDS = {
    "createDataset",
    "updateDataset",
    "setSignerForDataset",
    "validateDataset",
    "upsertDataRows",
    "upsertCustomMetadataSchema",
    "upsertDataRowCustomMetadata",
    "deleteDataRowCustomMetadata",
    "deleteDataRows",
}


class GqlError(Exception):
    """A GraphQL error answer: `status` is the HTTP status, `code` the extensions code."""

    def __init__(
        self, message: str, code: str = "INTERNAL_SERVER_ERROR", status: int = 200, inner: int = 400
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.inner = inner

    def body(self) -> dict[str, Any]:
        ext: dict[str, Any] = {"code": self.code}
        if self.code == "INTERNAL_SERVER_ERROR":
            ext["exception"] = {"status": self.inner}
        return {"data": None, "errors": [{"message": self.message, "extensions": ext}]}


def bad_field(name: str, on: str) -> GqlError:
    return GqlError(
        f'Cannot query field "{name}" on type "{on}".', "GRAPHQL_VALIDATION_FAILED", 400
    )


@dataclass
class Fault:
    status: int
    retry_after: str | None = None
    match: str | None = None  # a root field name, "uploadFile", or None for any request
    body: dict[str, Any] | None = None  # the answer's JSON (default: a rate-limit message)


@dataclass
class Task:
    id: str
    status: str
    polls_left: int
    ready_at: float = 0.0  # time.monotonic() before which it says IN_PROGRESS
    failures: list[dict[str, Any]] = field(default_factory=list)
    successes: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@functools.lru_cache(maxsize=256)
def _parse(query: str) -> DocumentNode:
    """Clients send the same few documents over and over: parse each once."""
    return parse(query)


class LabelboxFake:
    def __init__(self, api_key: str = "lb-test-key-7d1e0c") -> None:
        self.api_key = api_key
        self.port = 0
        self._ids = itertools.count(1)
        self.datasets: dict[str, dict[str, Any]] = {}
        self.files: dict[str, dict[str, Any]] = {}
        self.rows: dict[str, dict[str, Any]] = {}
        self.by_gk: dict[str, str] = {}
        self.tasks: dict[str, Task] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.schemas: dict[str, dict[str, Any]] = {}
        self.integrations: dict[str, dict[str, Any]] = {}
        self._reserved()
        # knobs
        self.task_polls = 1
        self.task_seconds = 0.0  # a task also runs this long (for benchmarks)
        self.fail_tasks = False
        self.end_status: str | None = None  # a task's last status, e.g. CANCELED (default COMPLETE)
        self.max_custom_fields = 100
        self.refuse: Callable[[dict[str, Any]], str | None] = lambda payload: None
        # faults and observations
        self.faults: list[Fault] = []
        self._drop_after: int | None = None
        self._released = asyncio.Event()
        self._released.set()
        self.held = 0
        self.requests: list[tuple[float, str, int]] = []  # (monotonic, operation, status)
        self.auth_headers: set[str] = set()
        self.chunked_uploads = 0
        self.uploads_started = 0
        self.uploading = 0  # upload requests being answered now
        self.most_uploading = 0  # the most at once
        self.upsert_tasks: list[int] = []  # rows per upsertDataRows task
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=64 << 20)
        self.app.router.add_post("/graphql", self._graphql)
        self.app.router.add_get("/files/{id}/{name:.*}", self._file)
        self.app.router.add_get("/_fake/state", self._ctl_state)
        self.app.router.add_post("/_fake/fault", self._ctl_fault)
        self.app.router.add_post("/_fake/hold", self._ctl_hold)
        self.app.router.add_post("/_fake/iam", self._ctl_iam)

    # --- running -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        self._runner, self.port = await listen(self.app, port)

    async def stop(self) -> None:
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- test controls -------------------------------------------------------------------

    def fail_next(
        self, n: int, status: int = 429, retry_after: str | None = "1", match: str | None = None
    ) -> None:
        self.faults.extend(Fault(status, retry_after, match) for _ in range(n))

    def error_next(
        self,
        n: int,
        code: str,
        inner: int | None = None,
        message: str = "",
        match: str | None = None,
    ) -> None:
        """The next `n` requests answer HTTP 200 with a GraphQL error `code` (an
        INTERNAL_SERVER_ERROR's `exception.status` is `inner`), as Labelbox does."""
        ext: dict[str, Any] = {"code": code}
        if inner is not None:
            ext["exception"] = {"status": inner}
        body = {"data": None, "errors": [{"message": message or code, "extensions": ext}]}
        self.faults.extend(Fault(200, None, match, body) for _ in range(n))

    def limit_next(self, n: int, match: str | None = None) -> None:
        """The next `n` requests answer as an exceeded API limit does (HTTP 200)."""
        body = {"message": "You have exceeded the API limit; try again later"}
        self.faults.extend(Fault(200, None, match, body) for _ in range(n))

    def drop_next_upload(self, after_bytes: int) -> None:
        self._drop_after = after_bytes

    def hold_uploads(self) -> None:
        self._released.clear()

    def release_uploads(self) -> None:
        self._released.set()

    def new_id(self, prefix: str) -> str:
        # Labelbox ids are 25-character cuids; the SDK's models insist on the length.
        return f"{prefix}{next(self._ids):0{25 - len(prefix)}d}"

    def _reserved(self) -> None:
        for name, kind in (
            ("tag", "CustomMetadataString"),
            ("captureDateTime", "CustomMetadataDateTime"),
        ):
            sid = self.new_id("rsv")
            self.schemas[sid] = {
                "id": sid,
                "name": name,
                "kind": kind,
                "reserved": True,
                "options": [],
            }
        sid = self.new_id("rsv")
        options = []
        for opt in ("train", "valid", "test"):
            oid = self.new_id("opt")
            options.append(
                {"id": oid, "name": opt, "kind": "CustomMetadataEnumOption", "reserved": True}
            )
        self.schemas[sid] = {
            "id": sid,
            "name": "split",
            "kind": "CustomMetadataEnum",
            "reserved": True,
            "options": options,
        }

    # --- views for tests ----------------------------------------------------------------

    def dataset_id(self, name: str) -> str | None:
        for d in self.datasets.values():
            if d["name"] == name and not d["deleted"]:
                return str(d["id"])
        return None

    def rows_of(self, dataset: str) -> dict[str, dict[str, Any]]:
        """global key (the row id for a row without one) -> the row as a test wants
        to see it (metadata by name)."""
        ds = self.dataset_id(dataset)
        out = {}
        for row in self.rows.values():
            if row["dataset_id"] == ds and not row["deleted"]:
                out[row["global_key"] or row["id"]] = self.view(row)
        return out

    def view(self, row: dict[str, Any]) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        for f in row["metadata"]:
            schema, option = self._schema_or_option(f["schemaId"])
            if option is not None:
                metadata[schema["name"]] = option["name"]
            elif schema is not None and schema["kind"] != "CustomMetadataEnum":
                metadata[schema["name"]] = f["value"]
        return {
            "id": row["id"],
            "global_key": row["global_key"],
            "external_id": row["external_id"],
            "row_data": row["row_data"],
            "media_type": row["media_type"],
            "attachments": [dict(a) for a in row["attachments"]],
            "metadata": metadata,
        }

    def fetch(self, url: str) -> bytes | None:
        """The bytes a hosted URL serves, as a browser would resolve it (a '#' ends
        the path)."""
        parts = urlsplit(url)
        if f"{parts.scheme}://{parts.netloc}" != self.url:
            return None
        segs = unquote(parts.path).split("/", 3)
        if len(segs) != 4 or segs[1] != "files" or segs[2] not in self.files:
            return None
        f = self.files[segs[2]]
        return bytes(f["data"]) if f["filename"] == segs[3] else None

    def state(self) -> dict[str, Any]:
        return {
            "datasets": {
                d["name"]: self.rows_of(d["name"])
                for d in self.datasets.values()
                if not d["deleted"]
            },
            "dataset_count": {
                d["name"]: sum(1 for x in self.datasets.values() if x["name"] == d["name"])
                for d in self.datasets.values()
            },
            # the delegated-access integration (its name) attached to each live dataset
            "signers": {
                d["name"]: d["signer"]["name"] if d["signer"] else None
                for d in self.datasets.values()
                if not d["deleted"]
            },
            "files": {
                fid: {
                    "filename": f["filename"],
                    "size": len(f["data"]),
                    "sha256": hashlib.sha256(f["data"]).hexdigest(),
                }
                for fid, f in self.files.items()
            },
            "held": self.held,
            "uploads_started": self.uploads_started,
            "chunked_uploads": self.chunked_uploads,
            "upsert_tasks": self.upsert_tasks,
            "requests": [[t, op, status] for t, op, status in self.requests],
        }

    # --- HTTP ----------------------------------------------------------------------------

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        self.auth_headers.add(header)
        if header != f"Bearer {self.api_key}":
            body = GqlError("Invalid API key", "AUTHENTICATION_ERROR", 401).body()
            return web.json_response(body, status=401)
        return None

    def _fault(self, operation: str) -> web.Response | None:
        for i, f in enumerate(self.faults):
            if f.match is None or f.match == operation:
                del self.faults[i]
                headers = {"Retry-After": f.retry_after} if f.retry_after is not None else {}
                body = f.body if f.body is not None else {"message": "Too many requests"}
                return web.json_response(body, status=f.status, headers=headers)
        return None

    def _log(self, operation: str, resp: web.StreamResponse) -> web.StreamResponse:
        self.requests.append((time.monotonic(), operation, resp.status))
        return resp

    async def _graphql(self, request: web.Request) -> web.StreamResponse:
        denied = self._unauthorized(request)
        if denied is not None:
            return self._log("?", denied)
        # (aiohttp's request.content_type parses with the email package: slow)
        if request.headers.get("Content-Type", "").startswith("multipart/form-data"):
            return await self._upload(request)
        try:
            body = await request.json()
        except ValueError:
            return self._log("?", web.json_response({"message": "bad JSON"}, status=400))
        query = body.get("query") if isinstance(body, dict) else None
        variables = (body.get("variables") if isinstance(body, dict) else None) or {}
        try:
            doc = _parse(query or "")
        except GraphQLError as e:
            err = GqlError(f"Syntax Error: {e.message}", "GRAPHQL_PARSE_FAILED", 400)
            return self._log("?", web.json_response(err.body(), status=400))
        ops = [d for d in doc.definitions if isinstance(d, OperationDefinitionNode)]
        if len(ops) != 1:
            err = GqlError("exactly one operation expected", "GRAPHQL_VALIDATION_FAILED", 400)
            return self._log("?", web.json_response(err.body(), status=400))
        op = ops[0]
        names = [s.name.value for s in op.selection_set.selections if isinstance(s, FieldNode)]
        label = ",".join(names)
        fault = self._fault(names[0] if names else "?")
        if fault is not None:
            return self._log(label, fault)
        try:
            data = self._execute(op, variables)
        except GqlError as e:
            return self._log(label, web.json_response(e.body(), status=e.status))
        return self._log(label, web.json_response({"data": data}))

    def _execute(self, op: OperationDefinitionNode, variables: dict[str, Any]) -> dict[str, Any]:
        kind = op.operation.value
        allowed = MUTATION_FIELDS if kind == "mutation" else QUERY_FIELDS
        out: dict[str, Any] = {}
        for sel in op.selection_set.selections:
            if not isinstance(sel, FieldNode):
                raise GqlError("fragments are not supported here", "GRAPHQL_VALIDATION_FAILED", 400)
            name = sel.name.value
            if name == "uploadFile":
                raise GqlError(
                    'Variable "$file" of required type "Upload!" was not provided.',
                    "GRAPHQL_VALIDATION_FAILED",
                    400,
                )
            if name not in allowed:
                raise bad_field(name, "Mutation" if kind == "mutation" else "Query")
            args = {
                a.name.value: value_from_ast_untyped(a.value, variables)
                for a in sel.arguments or ()
            }
            value = getattr(self, f"r_{name}")(args)
            alias = sel.alias.value if sel.alias else name
            out[alias] = self._project(value, sel.selection_set, name, variables)
        return out

    def _project(
        self, value: Any, sel: SelectionSetNode | None, on: str, variables: dict[str, Any]
    ) -> Any:
        if sel is None or value is None:
            return value
        if isinstance(value, list):
            return [self._project(v, sel, on, variables) for v in value]
        out: dict[str, Any] = {}
        for s in sel.selections:
            if isinstance(s, InlineFragmentNode):  # `... on Type { fields }`
                kind = s.type_condition.name.value if s.type_condition else None
                if kind is None or value.get("__typename") == kind:
                    out.update(self._project(value, s.selection_set, on, variables))
                continue
            if not isinstance(s, FieldNode):
                raise GqlError("fragments are not supported here", "GRAPHQL_VALIDATION_FAILED", 400)
            name = s.name.value
            if name == "__typename":
                out[s.alias.value if s.alias else name] = value.get("__typename", on)
                continue
            if name not in value:
                raise bad_field(name, on)
            v = value[name]
            if callable(v):
                v = v(
                    {
                        a.name.value: value_from_ast_untyped(a.value, variables)
                        for a in s.arguments or ()
                    }
                )
            out[s.alias.value if s.alias else name] = self._project(
                v, s.selection_set, name, variables
            )
        return out

    # --- uploads -------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        self.uploads_started += 1
        self.uploading += 1
        self.most_uploading = max(self.most_uploading, self.uploading)
        try:
            return await self._upload_one(request)
        finally:
            self.uploading -= 1

    async def _upload_one(self, request: web.Request) -> web.StreamResponse:
        fault = self._fault("uploadFile")
        if fault is not None:
            await request.read()
            return self._log("uploadFile", fault)
        if "Content-Length" not in request.headers:
            self.chunked_uploads += 1
        if self._drop_after is not None:
            n, self._drop_after = self._drop_after, None
            await request.content.read(n)
            assert request.transport is not None
            request.transport.close()
            return self._log("uploadFile", web.Response(status=499))
        try:
            order, parts, filename, content_type, data = _multipart(
                request.headers.get("Content-Type", ""), await request.read()
            )
        except ValueError as e:
            err = GqlError(f"not a multipart request: {e}", inner=400)
            return self._log("uploadFile", web.json_response(err.body(), status=err.status))
        if not self._released.is_set():
            await self._hold()
        try:
            url = self._store_upload(order, parts, filename, content_type, data)
        except GqlError as e:
            return self._log("uploadFile", web.json_response(e.body(), status=e.status))
        return self._log(
            "uploadFile",
            web.json_response({"data": {"uploadFile": {"url": url, "filename": filename}}}),
        )

    async def _hold(self) -> None:
        self.held += 1
        await self._released.wait()

    def _store_upload(
        self,
        order: list[str],
        parts: dict[str, Any],
        filename: str | None,
        content_type: str | None,
        data: bytes,
    ) -> str:
        # The multipart request spec: operations, then map, then the files.
        if order[:2] != ["operations", "map"] or "1" not in order:
            raise GqlError(f"multipart parts out of order: {order}", inner=400)
        try:
            ops = json.loads(parts["operations"])
            mapping = json.loads(parts["map"])
        except ValueError as e:
            raise GqlError(f"invalid multipart JSON: {e}", inner=400) from None
        if mapping != {"1": ["variables.file"]}:
            raise GqlError(f"unexpected map {mapping}", inner=400)
        query = ops.get("query") or ""
        doc = _parse(query)
        fields = [
            s.name.value
            for d in doc.definitions
            if isinstance(d, OperationDefinitionNode)
            for s in d.selection_set.selections
            if isinstance(s, FieldNode)
        ]
        if fields != ["uploadFile"]:
            raise GqlError(f"a multipart request must be uploadFile, not {fields}", inner=400)
        variables = ops.get("variables") or {}
        if "file" not in variables or variables["file"] is not None:
            raise GqlError("variables.file must be null in operations", inner=400)
        if variables.get("contentLength") != len(data):
            raise GqlError(
                f"contentLength {variables.get('contentLength')} does not match the "
                f"{len(data)} bytes received",
                inner=400,
            )
        if not filename:
            raise GqlError("the file part has no filename", inner=400)
        fid = self.new_id("file")
        self.files[fid] = {"filename": filename, "content_type": content_type, "data": data}
        return f"{self.url}/files/{fid}/{filename}"

    async def _file(self, request: web.Request) -> web.StreamResponse:
        f = self.files.get(request.match_info["id"])
        if f is None or f["filename"] != request.match_info["name"]:
            raise web.HTTPNotFound()
        return web.Response(
            body=f["data"], content_type=f["content_type"] or "application/octet-stream"
        )

    def _hosted(self, url: Any) -> bytes:
        data = self.fetch(url) if isinstance(url, str) else None
        if data is None:
            raise GqlError(
                f"cannot read {url!r}: not a file uploaded to this organisation", inner=400
            )
        return data

    # --- datasets ------------------------------------------------------------------------

    def _matches(self, obj: dict[str, Any], where: Any) -> bool:
        if not where:
            return True
        if not isinstance(where, dict):
            raise GqlError(f"bad where {where!r}", inner=400)
        for k, v in where.items():
            if k == "AND":
                if not all(self._matches(obj, w) for w in v):
                    return False
            elif k not in obj:
                raise GqlError(f"unknown where field {k}", "GRAPHQL_VALIDATION_FAILED", 400)
            elif obj[k] != v:
                return False
        return True

    def r_datasets(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        found = [d for d in self.datasets.values() if self._matches(d, args.get("where"))]
        skip = int(args.get("skip") or 0)
        first = int(args.get("first") or 100)
        return found[skip : skip + first]

    def r_createDataset(self, args: dict[str, Any]) -> dict[str, Any]:
        data = args.get("data") or {}
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise GqlError("a dataset needs a name", inner=400)
        did = self.new_id("ds")
        self.datasets[did] = {
            "id": did,
            "name": name,
            "description": data.get("description") or "",
            "createdAt": _now(),
            "updatedAt": _now(),
            "rowCount": lambda _args, did=did: self._row_count(did),
            "deleted": False,
            "signer": None,  # the delegated-access integration attached to it
        }
        return self.datasets[did]

    def _row_count(self, did: str) -> int:
        return sum(1 for r in self.rows.values() if r["dataset_id"] == did and not r["deleted"])

    def _dataset(self, args: dict[str, Any]) -> dict[str, Any]:
        d = self.datasets.get(str((args.get("where") or {}).get("id")))
        if d is None or d["deleted"]:
            raise GqlError("Dataset not found", "RESOURCE_NOT_FOUND")
        return d

    def r_updateDataset(self, args: dict[str, Any]) -> dict[str, Any]:
        d = self._dataset(args)
        for k, v in (args.get("data") or {}).items():
            if k not in ("name", "description", "deleted"):
                raise GqlError(f"cannot update {k}", inner=400)
            d[k] = v
        return d

    # --- delegated access (IAM integrations) ---------------------------------------------

    def add_integration(
        self,
        name: str = "s3-read",
        *,
        default: bool = True,
        valid: bool = True,
        validates: bool = True,
    ) -> str:
        """An integration of the organisation; `validates`: a dataset it is attached to
        passes validateDataset."""
        iid = self.new_id("iam")
        self.integrations[iid] = {
            "id": iid,
            "name": name,
            "createdAt": _now(),
            "updatedAt": _now(),
            "provider": "AWS",
            "valid": valid,
            "lastValidAt": _now(),
            "isOrgDefault": default,
            "settings": {
                "__typename": "AwsIamIntegrationSettings",
                "roleArn": f"arn:aws:iam::000000000000:role/{name}",
                "readBucket": None,
            },
            "validates": validates,
        }
        return iid

    def r_organization(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"id": "org-1", "name": "ingestd tests", "createdAt": _now(), "updatedAt": _now()}

    def r_iamIntegrations(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return list(self.integrations.values())

    def r_setSignerForDataset(self, args: dict[str, Any]) -> dict[str, Any]:
        d = self._dataset(args)
        iid = (args.get("data") or {}).get("signerId")
        if iid not in self.integrations:
            raise GqlError(f"Integration {iid} not found", "RESOURCE_NOT_FOUND")
        d["signer"] = self.integrations[iid]
        return d

    def r_validateDataset(self, args: dict[str, Any]) -> dict[str, Any]:
        d = self._dataset(args)
        ok = d["signer"] is not None and bool(d["signer"]["validates"])
        return {"valid": ok, "checks": [{"name": "signer can read the bucket", "success": ok}]}

    # --- rows ----------------------------------------------------------------------------

    def r_upsertDataRows(self, args: dict[str, Any]) -> dict[str, Any]:
        uri = (args.get("data") or {}).get("manifestUri")
        try:
            manifest = json.loads(self._hosted(uri))
        except ValueError:
            raise GqlError("the manifest is not JSON", inner=400) from None
        if not isinstance(manifest, dict) or set(manifest) != {
            "source",
            "item_count",
            "chunk_uris",
        }:
            raise GqlError(f"bad manifest {str(manifest)[:200]}", inner=400)
        specs: list[Any] = []
        for chunk_uri in manifest["chunk_uris"]:
            raw = self._hosted(chunk_uri)
            if len(raw) > CHUNK_MAX:
                raise GqlError(f"chunk of {len(raw)} bytes is over {CHUNK_MAX}", inner=400)
            chunk = json.loads(raw)
            if not isinstance(chunk, list):
                raise GqlError("a chunk must be a JSON array", inner=400)
            specs.extend(chunk)
        if manifest["item_count"] != len(specs):
            raise GqlError(
                f"item_count {manifest['item_count']} but the chunks hold {len(specs)}", inner=400
            )
        task = Task(
            self.new_id("task"),
            "IN_PROGRESS",
            self.task_polls,
            time.monotonic() + self.task_seconds,
            rows=len(specs),
        )
        seen: set[str] = set()
        for spec in specs:
            message = self._row_problem(spec, seen)
            if message is None and self.fail_tasks:
                message = "Internal error"
            if message is not None:
                task.failures.append({"message": message, "spec": _spec_view(spec)})
                continue
            row = self._apply(spec)
            task.successes.append(row)
        if self.fail_tasks:
            task.successes = []
        self.tasks[task.id] = task
        self.upsert_tasks.append(len(specs))
        if task.polls_left <= 0 and time.monotonic() >= task.ready_at:
            self._finish(task)
        return self._task_view(task)

    def _row_problem(self, spec: Any, seen: set[str]) -> str | None:
        if not isinstance(spec, dict) or set(spec) != {"id", "payload"}:
            return f"a row must be {{id, payload}}, got {str(spec)[:100]}"
        key, payload = spec["id"], spec["payload"]
        if not isinstance(key, dict) or key.get("type") not in ("GKEY", "ID", "AUTO"):
            return f"bad key {key!r}"
        if not isinstance(payload, dict):
            return "the payload must be an object"
        extra = set(payload) - PAYLOAD_KEYS
        if extra:
            return f"unknown payload fields {sorted(extra)}"
        ds = self.datasets.get(str(payload.get("dataset_id")))
        if ds is None or ds["deleted"]:
            return f"Dataset {payload.get('dataset_id')} not found"
        gk = payload.get("global_key") or (key["value"] if key["type"] == "GKEY" else None)
        if key["type"] == "GKEY" and payload.get("global_key") not in (None, key["value"]):
            return "the payload's global_key differs from the key"
        if gk is not None:
            if not isinstance(gk, str) or not gk or len(gk) > GLOBAL_KEY_MAX:
                return f"Global key must be 1 to {GLOBAL_KEY_MAX} characters"
            if gk in seen:
                return f"Duplicate global key: '{gk}'"
            seen.add(gk)
        existing = self.by_gk.get(gk) if key["type"] == "GKEY" and gk else None
        row_data = payload.get("row_data")
        if existing is None and key["type"] != "ID" and row_data is None:
            return "row_data is required to create a data row"
        if row_data is not None and not self._https_or_hosted(row_data):
            return f"Invalid row_data {row_data!r}: assets must be https URLs"
        media = payload.get("media_type")
        if media is not None and media not in MEDIA_TYPES:
            return f"Invalid media type {media!r}"
        for a in payload.get("attachments") or []:
            if not isinstance(a, dict) or a.get("type") not in ATTACHMENT_TYPES:
                return f"Invalid attachment type in {a!r}"
            if not isinstance(a.get("value"), str) or not a["value"]:
                return "Attachment value must be a non-empty string"
            if a["type"] != "RAW_TEXT" and not self._https_or_hosted(a["value"]):
                return f"Invalid attachment value {a['value']!r}: must be an https URL"
        for f in payload.get("metadata_fields") or []:
            problem = self._metadata_problem(f)
            if problem:
                return problem
        return self.refuse(payload)

    def _https_or_hosted(self, url: Any) -> bool:
        return isinstance(url, str) and (
            url.startswith("https://") or url.startswith(self.url + "/files/")
        )

    def _apply(self, spec: dict[str, Any]) -> dict[str, Any]:
        key, payload = spec["id"], spec["payload"]
        gk = payload.get("global_key") or (key["value"] if key["type"] == "GKEY" else None)
        rid = self.by_gk.get(gk) if gk else None
        if key["type"] == "ID":
            rid = key["value"]
        row = self.rows.get(rid) if rid else None
        if row is None or row["deleted"]:
            rid = self.new_id("dr")
            row = {
                "id": rid,
                "dataset_id": payload["dataset_id"],
                "global_key": gk,
                "external_id": None,
                "row_data": None,
                "media_type": None,
                "metadata": [],
                "attachments": [],
                "deleted": False,
                "created": _now(),
            }
            self.rows[rid] = row
        for k in ("row_data", "external_id", "media_type"):
            if k in payload:
                row[k] = payload[k]
        if "attachments" in payload:
            row["attachments"] = [dict(a) for a in payload["attachments"] or []]
        if "metadata_fields" in payload:
            row["metadata"] = [
                {"schemaId": f["schemaId"], "value": f["value"]}
                for f in payload["metadata_fields"] or []
            ]
        if gk:
            row["global_key"] = gk
            self.by_gk[gk] = rid
        return row

    def _finish(self, task: Task) -> None:
        task.status = "FAILED" if self.fail_tasks else self.end_status or "COMPLETE"

    def _task_view(self, task: Task) -> dict[str, Any]:
        return {
            "id": task.id,
            "name": "JSON Import",
            "type": "adv-upsert-data-rows",
            "status": task.status,
            "completionPercentage": 100.0 if task.status != "IN_PROGRESS" else 0.0,
            "createdAt": _now(),
            "updatedAt": _now(),
            "result": None,
            "errors": None,
            "metadata": None,
        }

    def r_user(self, args: dict[str, Any]) -> dict[str, Any]:
        def created_tasks(a: dict[str, Any]) -> list[dict[str, Any]]:
            wanted = (a.get("where") or {}).get("id")
            task = self.tasks.get(wanted)
            if task is None:
                return []
            if task.status == "IN_PROGRESS":
                task.polls_left -= 1
                if task.polls_left <= 0 and time.monotonic() >= task.ready_at:
                    self._finish(task)
            return [self._task_view(task)]

        return {
            "id": "user-1",
            "email": "tester@example.org",
            "name": "Tester",
            "nickname": "tester",
            "picture": "",
            "isViewer": False,
            "isExternalUser": False,
            "createdAt": _now(),
            "updatedAt": _now(),
            "lastLoginAt": _now(),
            "createdTasks": created_tasks,
        }

    def _page(self, items: list[Any], args: dict[str, Any]) -> tuple[list[Any], str | None]:
        data = args.get("data") or {}
        start = int(data.get("from") or 0)
        first = int(data.get("first") or 5000)
        page = items[start : start + first]
        after = str(start + first) if start + first < len(items) else None
        return page, after

    def _done_task(self, args: dict[str, Any]) -> Task:
        task = self.tasks.get((args.get("data") or {}).get("taskId"))
        if task is None:
            raise GqlError("Task not found", "RESOURCE_NOT_FOUND")
        if task.status == "IN_PROGRESS":
            raise GqlError("the task is still running", inner=400)
        return task

    def r_failedDataRowImports(self, args: dict[str, Any]) -> dict[str, Any]:
        task = self._done_task(args)
        page, after = self._page(task.failures, args)
        return {"after": after, "total": len(task.failures), "results": page}

    def r_successesfulDataRowImports(self, args: dict[str, Any]) -> dict[str, Any]:
        task = self._done_task(args)
        nodes = [
            {
                "id": r["id"],
                "externalId": r["external_id"],
                "globalKey": r["global_key"],
                "rowData": r["row_data"],
            }
            for r in task.successes
        ]
        page, after = self._page(nodes, args)
        return {"after": after, "total": len(nodes), "nodes": page}

    # --- metadata ------------------------------------------------------------------------

    def _schema_or_option(self, sid: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        if sid in self.schemas:
            return self.schemas[sid], None
        for s in self.schemas.values():
            for o in s["options"]:
                if o["id"] == sid:
                    return s, o
        return None, None

    def _metadata_problem(self, f: Any) -> str | None:
        if not isinstance(f, dict) or "schemaId" not in f or "value" not in f:
            return f"a metadata field must be {{schemaId, value}}, got {f!r}"
        schema, option = self._schema_or_option(str(f["schemaId"]))
        if schema is None:
            return f"Schema Id `{f['schemaId']}` not found in ontology"
        value = f["value"]
        kind = "option" if option is not None else schema["kind"]
        if kind == "CustomMetadataString" and (not isinstance(value, str) or len(value) > 4096):
            return f"{schema['name']}: expected a string of at most 4096 characters"
        if kind == "CustomMetadataNumber" and (
            isinstance(value, bool) or not isinstance(value, int | float)
        ):
            return f"{schema['name']}: expected a number, got {value!r}"
        if kind == "CustomMetadataDateTime":
            try:
                datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            except ValueError:
                return f"{schema['name']}: expected an ISO datetime, got {value!r}"
        if kind in ("CustomMetadataEnum", "option") and value != {}:
            return f"{schema['name']}: enum fields take the option's schema id and {{}}"
        return None

    def r_customMetadataOntology(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return list(self.schemas.values())

    def r_upsertCustomMetadataSchema(self, args: dict[str, Any]) -> dict[str, Any]:
        data = args.get("data") or {}
        name, kind = data.get("name"), data.get("kind")
        if not isinstance(name, str) or not 1 <= len(name.strip()) <= 100:
            raise GqlError("schema names are 1 to 100 characters", inner=400)
        if kind not in (
            "CustomMetadataString",
            "CustomMetadataNumber",
            "CustomMetadataDateTime",
            "CustomMetadataEnum",
            "CustomMetadataEmbedding",
        ):
            raise GqlError(f"unknown kind {kind!r}", inner=400)
        if data.get("id") is None and any(s["name"] == name for s in self.schemas.values()):
            raise GqlError(f"A metadata schema named {name!r} already exists", inner=400)
        if data.get("id") is None and sum(
            1 for s in self.schemas.values() if not s["reserved"]
        ) >= (self.max_custom_fields):
            raise GqlError(
                f"Custom metadata limit of {self.max_custom_fields} fields reached", inner=400
            )
        sid = data.get("id") or self.new_id("cms")
        options = [
            {
                "id": self.new_id("opt"),
                "name": o["name"],
                "kind": "CustomMetadataEnumOption",
                "reserved": False,
            }
            for o in data.get("options") or []
        ]
        self.schemas[sid] = {
            "id": sid,
            "name": name,
            "kind": kind,
            "reserved": False,
            "options": options,
        }
        return self.schemas[sid]

    def _row_by_identifier(self, ident: str, id_type: str) -> dict[str, Any] | None:
        rid = self.by_gk.get(ident) if id_type == "GKEY" else ident
        row = self.rows.get(rid) if rid else None
        return row if row is not None and not row["deleted"] else None

    def r_dataRowCustomMetadata(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        ids = ((args.get("where") or {}).get("dataRowIdentifiers")) or {}
        out = []
        for ident in ids.get("ids") or []:
            row = self._row_by_identifier(ident, ids.get("idType") or "ID")
            if row is not None:
                out.append(
                    {
                        "dataRowId": row["id"],
                        "globalKey": row["global_key"],
                        "fields": [dict(f) for f in row["metadata"]],
                    }
                )
        return out

    def r_upsertDataRowCustomMetadata(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        failures = []
        for entry in args.get("data") or []:
            gk, rid = entry.get("globalKey"), entry.get("dataRowId")
            row = self._row_by_identifier(gk, "GKEY") if gk else self._row_by_identifier(rid, "ID")
            fields = entry.get("fields") or []
            problem = None if row is not None else "Data row not found"
            for f in fields:
                problem = problem or self._metadata_problem(f)
            if problem is not None:
                failures.append(
                    {"globalKey": gk, "dataRowId": rid, "error": problem, "fields": fields}
                )
                continue
            assert row is not None
            for f in fields:
                schema, option = self._schema_or_option(f["schemaId"])
                if option is not None and schema is not None:  # one option per enum
                    others = {o["id"] for o in schema["options"]}
                    row["metadata"] = [m for m in row["metadata"] if m["schemaId"] not in others]
                row["metadata"] = [m for m in row["metadata"] if m["schemaId"] != f["schemaId"]]
                row["metadata"].append({"schemaId": f["schemaId"], "value": f["value"]})
        return failures

    def r_deleteDataRowCustomMetadata(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        failures = []
        for entry in args.get("dataRowIdentifiers") or []:
            ident = entry.get("dataRowIdentifier") or {}
            row = self._row_by_identifier(ident.get("id"), ident.get("idType") or "ID")
            if row is None:
                failures.append(
                    {"dataRowId": ident.get("id"), "error": "Data row not found", "fields": []}
                )
                continue
            drop = set(entry.get("schemaIds") or [])
            row["metadata"] = [m for m in row["metadata"] if m["schemaId"] not in drop]
        return failures

    # --- deletes -------------------------------------------------------------------------

    def r_dataRowsForGlobalKeys(self, args: dict[str, Any]) -> dict[str, Any]:
        keys = (args.get("where") or {}).get("ids")
        if not isinstance(keys, list):
            raise GqlError("where.ids must be a list of global keys", inner=400)
        fetched, missing = [], []
        for gk in keys:
            row = self._row_by_identifier(gk, "GKEY")
            fetched.append({"id": row["id"] if row else ""})
            if row is None:
                missing.append(gk)
        jid = self.new_id("job")
        self.jobs[jid] = {
            "polls_left": self.task_polls,
            "data": {
                "fetchedDataRows": fetched,
                "notFoundGlobalKeys": missing,
                "accessDeniedGlobalKeys": [],
            },
        }
        return {"jobId": jid}

    def r_dataRowsForGlobalKeysResult(self, args: dict[str, Any]) -> dict[str, Any]:
        job = self.jobs.get((args.get("jobId") or {}).get("id"))
        if job is None:
            raise GqlError("Job not found", "RESOURCE_NOT_FOUND")
        job["polls_left"] -= 1
        if job["polls_left"] > 0:
            return {"data": None, "jobStatus": "IN_PROGRESS"}
        return {"data": job["data"], "jobStatus": "COMPLETE"}

    def r_deleteDataRows(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        ids = (args.get("where") or {}).get("dataRowIds")
        if not isinstance(ids, list):
            raise GqlError("where.dataRowIds must be a list", inner=400)
        out = []
        for rid in ids:
            row = self.rows.get(rid)
            if row is None or row["deleted"]:
                continue
            row["deleted"] = True
            if row["global_key"] and self.by_gk.get(row["global_key"]) == rid:
                del self.by_gk[row["global_key"]]
            out.append({"id": rid})
        return out

    # --- control routes (for the fake as a process) --------------------------------------

    async def _ctl_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _ctl_fault(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.fail_next(
            int(body.get("count", 1)),
            int(body.get("status", 429)),
            body.get("retry_after"),
            body.get("match"),
        )
        return web.json_response({"faults": len(self.faults)})

    async def _ctl_iam(self, request: web.Request) -> web.Response:
        body = await request.json()
        iid = self.add_integration(
            str(body.get("name") or "s3-read"),
            default=bool(body.get("default", True)),
            valid=bool(body.get("valid", True)),
            validates=bool(body.get("validates", True)),
        )
        return web.json_response({"id": iid})

    async def _ctl_hold(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("hold"):
            self.hold_uploads()
        else:
            self.release_uploads()
        return web.json_response({"held": self.held})


_PARAM = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _multipart(
    content_type: str, body: bytes
) -> tuple[list[str], dict[str, str], str | None, str | None, bytes]:
    """A multipart/form-data body: part names in order, the text parts, and file part
    `1`'s filename, content type and bytes. Read whole and split on the boundary
    (aiohttp's streaming reader costs a millisecond a request, which would make the
    fake, not the client, what a benchmark measures)."""
    boundary = next(
        (
            p.split("=", 1)[1].strip().strip('"')
            for p in content_type.split(";")[1:]
            if p.strip().lower().startswith("boundary=")
        ),
        "",
    )
    if not boundary:
        raise ValueError("no boundary")
    order: list[str] = []
    parts: dict[str, str] = {}
    filename = ctype = None
    data = b""
    sections = body.split(b"--" + boundary.encode())
    if len(sections) < 3 or not sections[-1].startswith(b"--"):
        raise ValueError("the body does not end with the closing boundary")
    for section in sections[1:-1]:
        head, sep, content = section.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep or not content.endswith(b"\r\n"):
            raise ValueError("a part without headers or the line break before a boundary")
        content = content[:-2]
        headers = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        params = {
            k.lower(): unquote(re.sub(r"\\(.)", r"\1", v))
            for k, v in _PARAM.findall(headers.get("content-disposition", ""))
        }
        name = params.get("name", "")
        order.append(name)
        if name == "1":
            filename, ctype, data = params.get("filename"), headers.get("content-type"), content
        else:
            parts[name] = content.decode()
    return order, parts, filename, ctype, data


def _spec_view(spec: Any) -> dict[str, Any]:
    payload = spec.get("payload") if isinstance(spec, dict) else None
    payload = payload if isinstance(payload, dict) else {}
    key = spec.get("id") if isinstance(spec, dict) else None
    gk = payload.get("global_key") or (
        key.get("value") if isinstance(key, dict) and key.get("type") == "GKEY" else None
    )
    return {
        "externalId": payload.get("external_id"),
        "globalKey": gk,
        "rowData": payload.get("row_data"),
        "metadata": payload.get("metadata_fields") or [],
        "attachments": payload.get("attachments") or [],
    }


class FakeProcess:
    """The fake as a child process (`python -m tests.support.fakes.labelbox`), driven through its
    `/_fake/` control routes: for end-to-end tests, and for measuring the client side
    alone."""

    def __init__(self, key: str, cwd: str | None = None, task_seconds: float = 0.0) -> None:
        import os
        import subprocess

        # tests/support/fakes/labelbox.py -> the repository
        repo = cwd or os.path.dirname(
            os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        )
        self.key = key
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.fakes.labelbox",
                "--key",
                key,
                "--task-seconds",
                str(task_seconds),
            ],
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": repo},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("LISTENING "):
            self.proc.kill()
            raise RuntimeError(f"the fake Labelbox did not start: {line!r}")
        self.port = int(line.split()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def state(self) -> dict[str, Any]:
        return self._call("GET", "/_fake/state")  # type: ignore[no-any-return]

    def fault(
        self, count: int, status: int = 429, retry_after: str | None = "1", match: str | None = None
    ) -> None:
        self._call(
            "POST",
            "/_fake/fault",
            {"count": count, "status": status, "retry_after": retry_after, "match": match},
        )

    def add_integration(self, name: str = "s3-read", **flags: bool) -> str:
        """An IAM integration of the organisation (LabelboxFake.add_integration)."""
        return str(self._call("POST", "/_fake/iam", {"name": name, **flags})["id"])

    def hold(self, on: bool) -> int:
        return int(self._call("POST", "/_fake/hold", {"hold": on})["held"])

    def fetch(self, url: str) -> bytes | None:
        import urllib.error
        import urllib.request

        if not url.startswith(self.url + "/files/"):
            return None
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return bytes(r.read())
        except urllib.error.HTTPError:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait(timeout=10)


async def _serve(port: int, key: str, task_seconds: float = 0.0) -> None:
    fake = LabelboxFake(key)
    fake.task_seconds = task_seconds
    await fake.start(port)
    print(f"LISTENING {fake.port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="A fake Labelbox GraphQL API for tests")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--key", required=True)
    p.add_argument("--task-seconds", type=float, default=0.0, help="how long a task runs")
    args = p.parse_args(argv)
    try:
        asyncio.run(_serve(args.port, args.key, args.task_seconds))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
