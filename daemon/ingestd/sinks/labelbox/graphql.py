"""Labelbox's GraphQL API as ingestd speaks it: the queries and mutations (as
labelbox-python 7.x sends them), which answers are worth another attempt (the retry
rule handed to the kit's ApiClient), what a refused answer means in words, and the
GraphQL multipart body that `uploadFile` takes.

Labelbox answers most failures with HTTP 200 and an `errors` list whose
`extensions.code` says what went wrong (lbox/request_client.py): AUTHENTICATION_ERROR,
AUTHORIZATION_ERROR, GRAPHQL_VALIDATION_FAILED / GRAPHQL_PARSE_FAILED (our query is
wrong), RESOURCE_NOT_FOUND, and INTERNAL_SERVER_ERROR, which the server also uses for
client errors (then `extensions.exception.status` is 400, 422 or 426). API limits come
back as `{"message": "You have exceeded ..."}` or as HTTP 429.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ingestd.core.errors import PermanentError, RetriableError
from ingestd.sinks.kit.client import Answer, Verdict, auth_or_rejection, http_rule

# (query, variables, what) -> the answer's data: the sink's one way to ask
Gql = Callable[[str, Mapping[str, Any], str], Awaitable[dict[str, Any]]]

# --- datasets ----------------------------------------------------------------------------

# `signer` is the dataset's delegated-access (IAM) integration (labelbox-python's
# Dataset.iam_integration relationship).
Q_DATASETS = """query GetDatasetsPyApi($name: String!, $deleted: Boolean!) {
  datasets(where: {AND: [{name: $name}, {deleted: $deleted}]}, skip: 0, first: 100) {
    id name createdAt signer { id }
  }
}"""
# The same with the organisation's delegated-access integrations
# (Organization.get_iam_integrations), which a dataset that has to be created needs:
# one request instead of two.
Q_DATASETS_IAM = """query GetDatasetsPyApi($name: String!, $deleted: Boolean!) {
  datasets(where: {AND: [{name: $name}, {deleted: $deleted}]}, skip: 0, first: 100) {
    id name createdAt signer { id }
  }
  iamIntegrations { id name provider valid isOrgDefault }
}"""
M_CREATE_DATASET = """mutation CreateDatasetPyApi($name: String!) {
  createDataset(data: {name: $name}) { id name createdAt }
}"""
# Client.create_dataset: the default integration is attached, then the dataset validated.
M_SET_SIGNER = """mutation setSignerForDatasetPyApi($signerId: ID!, $datasetId: ID!) {
  setSignerForDataset(data: {signerId: $signerId}, where: {id: $datasetId}) { id }
}"""
M_VALIDATE_DATASET = """mutation validateDatasetPyApi($id: ID!) {
  validateDataset(where: {id: $id}) { valid checks { name success } }
}"""
M_DELETE_DATASET = """mutation deleteDatasetPyApi($datasetId: ID!) {
  updateDataset(where: {id: $datasetId}, data: {deleted: true}) { id }
}"""

# --- bytes and rows ----------------------------------------------------------------------

M_UPLOAD_FILE = """mutation UploadFile($file: Upload!, $contentLength: Int!, $sign: Boolean) {
  uploadFile(file: $file, contentLength: $contentLength, sign: $sign) { url filename }
}"""
M_UPSERT_ROWS = """mutation UpsertDataRowsPyApi($manifestUri: String!) {
  upsertDataRows(data: {manifestUri: $manifestUri}) { id status completionPercentage }
}"""
Q_TASK = """query GetUserCreatedTasksPyApi($taskId: ID!) {
  user { createdTasks(where: {id: $taskId}, skip: 0, first: 1) { id status completionPercentage } }
}"""
Q_FAILED_ROWS = """query FailedDataRowImportsPyApi($taskId: ID!, $first: Int, $from: String) {
  failedDataRowImports(data: {taskId: $taskId, first: $first, from: $from}) {
    after total results { message spec { externalId globalKey rowData } }
  }
}"""

# --- metadata ----------------------------------------------------------------------------

Q_ONTOLOGY = """query GetMetadataOntologyBetaPyApi {
  customMetadataOntology { id name kind reserved options { id kind name reserved } }
}"""
M_UPSERT_SCHEMA = """mutation UpsertCustomMetadataSchemaPyApi($data: UpsertCustomMetadataSchemaInput!) {
  upsertCustomMetadataSchema(data: $data) { id name kind options { id name kind } }
}"""
Q_ROW_METADATA = """query dataRowCustomMetadataPyApi(
  $dataRowIdentifiers: DataRowCustomMetadataDataRowIdentifiersInput
) {
  dataRowCustomMetadata(where: {dataRowIdentifiers: $dataRowIdentifiers}) {
    dataRowId globalKey fields { value schemaId }
  }
}"""
M_DELETE_METADATA = """mutation DeleteDataRowMetadataBetaPyApi(
  $deletes: [DataRowIdentifierCustomMetadataBatchDeleteInput!]
) {
  deleteDataRowCustomMetadata(dataRowIdentifiers: $deletes) {
    dataRowId error fields { value schemaId }
  }
}"""
M_UPSERT_METADATA = """mutation UpsertDataRowMetadataBetaPyApi(
  $metadata: [DataRowCustomMetadataBatchUpsertInput!]!
) {
  upsertDataRowCustomMetadata(data: $metadata) {
    globalKey dataRowId error fields { value schemaId }
  }
}"""

# --- deletes -----------------------------------------------------------------------------

Q_KEYS_JOB = """query getDataRowsForGlobalKeysPyApi($globalKeys: [ID!]!) {
  dataRowsForGlobalKeys(where: {ids: $globalKeys}) { jobId }
}"""
Q_KEYS_RESULT = """query getDataRowsForGlobalKeysResultPyApi($jobId: ID!) {
  dataRowsForGlobalKeysResult(jobId: {id: $jobId}) {
    data { fetchedDataRows { id } notFoundGlobalKeys accessDeniedGlobalKeys } jobStatus
  }
}"""
M_DELETE_ROWS = """mutation DeleteDataRowsPyApi($ids: [ID!]!) {
  deleteDataRows(where: {dataRowIds: $ids}) { id }
}"""

# --- answers -----------------------------------------------------------------------------

# Client errors the server labels INTERNAL_SERVER_ERROR (lbox/request_client.py).
_CLIENT_STATUSES = frozenset({400, 422, 426})
_REFUSED_CODES = frozenset(
    {
        "AUTHENTICATION_ERROR",
        "AUTHORIZATION_ERROR",
        "GRAPHQL_VALIDATION_FAILED",
        "GRAPHQL_PARSE_FAILED",
        "RESOURCE_NOT_FOUND",
        "RESOURCE_CONFLICT",
        "MALFORMED_REQUEST",
        "OPERATION_NOT_ALLOWED",
    }
)


class LabelboxRefused(PermanentError):
    """Labelbox refused a request; `code` is its GraphQL error code ("" for none)."""

    def __init__(self, reason: str, code: str = "") -> None:
        super().__init__(reason)
        self.code = code


def _errors(body: Any) -> list[dict[str, Any]]:
    errors = body.get("errors") if isinstance(body, dict) else None
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


def _code(error: dict[str, Any]) -> str:
    ext = error.get("extensions")
    return str(ext.get("code") or "") if isinstance(ext, dict) else ""


def _inner_status(error: dict[str, Any]) -> int | None:
    ext = error.get("extensions")
    exc = ext.get("exception") if isinstance(ext, dict) else None
    status = exc.get("status") if isinstance(exc, dict) else None
    return status if isinstance(status, int) else None


def _over_limit(body: Any) -> bool:
    message = body.get("message") if isinstance(body, dict) else None
    return isinstance(message, str) and message.startswith("You have exceeded")


def labelbox_rule(answer: Answer) -> Verdict:
    """The ApiClient retry rule: besides 429 and 5xx, a 200 whose errors say the API
    limit was hit or the server failed is worth another attempt; a 200 whose errors
    name our request (auth, validation, a client error) is refused at once."""
    if not 200 <= answer.status < 300:
        return http_rule(answer)
    body = answer.json()
    if not isinstance(body, dict) or _over_limit(body):
        return "retry"
    errors = _errors(body)
    if not errors:
        return "ok" if isinstance(body.get("data"), dict) else "retry"
    for e in errors:
        code = _code(e)
        if code in _REFUSED_CODES:
            return "reject"
        if code == "INTERNAL_SERVER_ERROR" and _inner_status(e) in _CLIENT_STATUSES:
            return "reject"
        if _inner_status(e) == 429 or code in ("RATE_LIMITED", "TOO_MANY_REQUESTS"):
            return "retry"
    if all(_code(e) == "INTERNAL_SERVER_ERROR" for e in errors):
        return "retry"
    return "reject"


def refusal(answer: Answer, what: str, key_hint: str) -> PermanentError:
    """A refused answer in words a user can act on (the ApiClient's reject mapper)."""
    body = answer.json()
    errors = _errors(body)
    if not errors:
        if answer.status in (401, 403):
            return auth_or_rejection("Labelbox", key_hint, answer, what)
        message = body.get("message") if isinstance(body, dict) else None
        return LabelboxRefused(
            f"Labelbox {what}: rejected (HTTP {answer.status}): "
            f"{message or answer.text() or 'no message'}"
        )
    messages = "; ".join(str(e.get("message") or "no message") for e in errors[:3])
    code = _code(errors[0])
    if code == "AUTHENTICATION_ERROR" or answer.status == 401:
        return LabelboxRefused(
            f"Labelbox {what}: the API key was refused (HTTP {answer.status}: {messages}); "
            f"check {key_hint}",
            code,
        )
    if code == "AUTHORIZATION_ERROR" or answer.status == 403:
        return LabelboxRefused(
            f"Labelbox {what}: the API key may not do this ({messages}); check the key's "
            f"role and {key_hint}",
            code,
        )
    if code in ("GRAPHQL_VALIDATION_FAILED", "GRAPHQL_PARSE_FAILED"):
        return LabelboxRefused(
            f"Labelbox {what}: the API refused ingestd's request ({messages}); "
            "the Labelbox API may have changed: please report this",
            code,
        )
    return LabelboxRefused(f"Labelbox {what}: rejected: {messages}", code)


def data_of(answer: Answer, what: str) -> dict[str, Any]:
    """The `data` of an answer the rule called "ok"."""
    body = answer.json()
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise RetriableError(f"Labelbox {what}: an answer without data: {answer.text(200)}")
    return data


# --- uploadFile as a GraphQL multipart request ---------------------------------------------


class Multipart:
    """The body of one `uploadFile` request (the GraphQL multipart request spec:
    `operations`, then `map`, then file part `1`): `head` and `tail` around the bytes."""

    def __init__(self, filename: str, content_type: str, size: int) -> None:
        self.boundary = f"ingestd{secrets.token_hex(16)}"
        operations = json.dumps(
            {
                "query": M_UPLOAD_FILE,
                "variables": {"file": None, "contentLength": size, "sign": False},
            }
        )
        quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
        b = self.boundary
        self.head = (
            f"--{b}\r\n"
            'Content-Disposition: form-data; name="operations"\r\n'
            "Content-Type: application/json\r\n\r\n"
            f"{operations}\r\n"
            f"--{b}\r\n"
            'Content-Disposition: form-data; name="map"\r\n'
            "Content-Type: application/json\r\n\r\n"
            '{"1": ["variables.file"]}\r\n'
            f"--{b}\r\n"
            f'Content-Disposition: form-data; name="1"; filename="{quoted}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        self.tail = f"\r\n--{b}--\r\n".encode()
        self.length = len(self.head) + size + len(self.tail)

    @property
    def headers(self) -> dict[str, str]:
        return {
            "Content-Type": f"multipart/form-data; boundary={self.boundary}",
            "Content-Length": str(self.length),
        }


def uploaded_url(answer: Answer, what: str) -> str:
    url = str((data_of(answer, what).get("uploadFile") or {}).get("url") or "")
    if not url:
        raise RetriableError(f"Labelbox {what}: no URL in the answer")
    return url
