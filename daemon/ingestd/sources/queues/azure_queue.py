"""Azure Blob events through an Azure Storage queue: Event Grid delivers each
`Microsoft.Storage.BlobCreated` / `BlobDeleted` event of the storage account as one
base64-encoded JSON message (docs/bucket-events.md), read with azure-storage-queue.

Storage queues have no long polling: an empty receive is followed by a pause of
IDLE_WAIT before the next, which bounds the added latency (and costs one request a
second per watch while the account is quiet). Credentials as for the blobs: the
connection string's key or SAS, AZURE_STORAGE_ACCOUNT_KEY / AZURE_STORAGE_SAS_KEY, or
the Azure identity chain when azure-identity is installed.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any
from urllib.parse import urlsplit

from ingestd.config import BucketUrl, SourceOptions
from ingestd.sources.queues.feed import QueueError, queue_error
from ingestd.sources.queues.messages import Parsed, parse_event_grid
from ingestd.sources.queues.threads import off_loop

BATCH = 32  # the largest receive of a storage queue
IDLE_WAIT = 1.0  # seconds between receives while the queue is empty
VISIBILITY = 60  # seconds a received message stays hidden (it comes back after a crash)


def _connection_string() -> dict[str, str]:
    out: dict[str, str] = {}
    for part in os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "").split(";"):
        k, sep, v = part.partition("=")
        if sep:
            out[k.strip()] = v.strip()
    return out


def account_of(url: str, options: SourceOptions) -> str | None:
    """The storage account: from the queue's host (acct.queue.core.windows.net), the
    path of an emulator URL (http://127.0.0.1:10001/acct/queue), or the settings."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ".queue." in host:
        return host.split(".", 1)[0]
    segments = [s for s in parts.path.split("/") if s]
    if len(segments) >= 2:
        return segments[0]
    return (
        options.account
        or _connection_string().get("AccountName")
        or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
    )


def credential_for(url: str, options: SourceOptions) -> Any:
    conn = _connection_string()
    account = account_of(url, options)
    key = conn.get("AccountKey") or os.environ.get("AZURE_STORAGE_ACCOUNT_KEY")
    if key and account:
        return {"account_name": account, "account_key": key}
    sas = conn.get("SharedAccessSignature") or os.environ.get("AZURE_STORAGE_SAS_KEY")
    if sas:
        return sas.lstrip("?")
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError:
        raise queue_error(
            "credentials",
            url,
            "no Azure credentials for the queue",
            "set AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_ACCOUNT_KEY or "
            "AZURE_STORAGE_SAS_KEY, or install azure-identity for the identity chain",
            "none found",
        ) from None
    return DefaultAzureCredential()


class AzureQueue:
    def __init__(self, url: str, bucket: BucketUrl, options: SourceOptions) -> None:
        self.url = url
        self.bucket = bucket
        self.options = options
        self.describe = f"Azure Blob events (Event Grid) from {url}"
        self.batch = BATCH
        self._client: Any = None
        self._making = threading.Lock()  # receivers run in threads (threads.py): one client

    def _queue(self) -> Any:
        with self._making:
            if self._client is None:
                from azure.storage.queue import QueueClient

                self._client = QueueClient.from_queue_url(
                    self.url,
                    credential=credential_for(self.url, self.options),
                    connection_timeout=5,
                    read_timeout=20,
                    retry_total=2,
                )
            return self._client

    async def receive(self) -> list[tuple[Any, str]]:
        def call() -> list[tuple[Any, str]]:
            try:
                msgs = self._queue().receive_messages(
                    messages_per_page=BATCH, max_messages=BATCH, visibility_timeout=VISIBILITY
                )
                return [((m.id, m.pop_receipt), str(m.content or "")) for m in msgs]
            except QueueError:
                raise
            except Exception as e:
                raise self._error(e, "receive") from e

        batch = await off_loop(call, "azure-queue-receive")
        if not batch:
            await asyncio.sleep(IDLE_WAIT)
        return batch

    async def delete(self, receipts: list[Any]) -> None:
        def call() -> None:
            from azure.core.exceptions import ResourceNotFoundError

            for msg_id, pop in receipts:
                try:
                    self._queue().delete_message(msg_id, pop)
                except ResourceNotFoundError as e:
                    if "MessageNotFound" not in str(e):
                        raise self._error(e, "delete") from e
                    # already gone: another consumer's, or a receipt past its time
                except Exception as e:
                    raise self._error(e, "delete") from e

        await off_loop(call, "azure-queue-delete")

    def parse(self, body: str) -> Parsed:
        return parse_event_grid(body, self.bucket.bucket, self.bucket.prefix)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _error(self, e: Exception, op: str) -> QueueError:
        name = type(e).__name__
        code = str(getattr(e, "error_code", "") or "")
        status = getattr(e, "status_code", None)
        detail = f"{code or name}: {str(e).splitlines()[0] if str(e) else ''}"
        if code == "QueueNotFound" or name == "ResourceNotFoundError":
            return queue_error(
                "not_found",
                self.url,
                "the queue does not exist",
                "create it or fix watches[].queue.url",
                detail,
            )
        if status == 403 and code.startswith("Authorization"):
            return queue_error(
                "denied",
                self.url,
                f"access denied ({op})",
                "grant these credentials the Storage Queue Data Message Processor role",
                detail,
            )
        if name == "ClientAuthenticationError" or status == 403:
            return queue_error(
                "credentials",
                self.url,
                "the credentials were rejected",
                "check AZURE_STORAGE_CONNECTION_STRING or the account key or SAS",
                detail,
            )
        if name in ("ServiceRequestError", "ServiceResponseError"):
            return queue_error(
                "unreachable",
                self.url,
                "cannot reach the queue",
                "check watches[].queue.url, DNS, the network and any proxy",
                detail,
            )
        return queue_error("other", self.url, f"{op} failed", "see the log", detail)
