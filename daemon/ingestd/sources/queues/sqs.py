"""S3 event notifications through an SQS queue, on boto3.

Long polling (20 s, up to 10 messages a call) costs one request per 20 s while the
bucket is quiet and hands a message over as soon as it arrives. Messages are deleted in
batches of up to 10, after the runner has recorded their hints. The visibility timeout
is the queue's own: set it well above `settle` (docs/bucket-events.md).
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any
from urllib.parse import urlsplit

from ingestd.config import BucketUrl, SourceOptions
from ingestd.sources.queues.feed import QueueError, queue_error
from ingestd.sources.queues.messages import Parsed, parse_s3
from ingestd.sources.queues.threads import off_loop

WAIT_SECONDS = 20  # SQS's longest long poll
BATCH = 10  # SQS's largest receive and delete batch

_REGION_HOST = re.compile(r"^(?:sqs[.-])?([a-z]{2}(?:-gov|-iso[a-z]*)?-[a-z]+-\d)\.")

_XML_CODE = re.compile(r"<Code>([^<]+)</Code>")
_XML_MESSAGE = re.compile(r"<Message>([^<]+)</Message>")
_NOT_FOUND = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")
_DENIED = ("AccessDenied", "AccessDeniedException", "AuthorizationError")
_CREDENTIALS = (
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
    "InvalidAccessKeyId",
    "ExpiredToken",
    "InvalidSecurity",
)


def region_of(url: str, options: SourceOptions) -> str:
    """The queue's region: from an AWS queue host (sqs.eu-west-1.amazonaws.com), else
    the bucket's region setting, else the environment, else us-east-1."""
    host = urlsplit(url).hostname or ""
    m = _REGION_HOST.match(host) if host.endswith(".amazonaws.com") else None
    if m:
        return m.group(1)
    return (
        options.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1"
    )


class SqsQueue:
    def __init__(self, url: str, bucket: BucketUrl, options: SourceOptions) -> None:
        self.url = url
        self.bucket = bucket
        self.options = options
        self.describe = f"S3 event notifications from {url}"
        self.batch = BATCH
        self._client: Any = None
        # Receivers run in threads of their own (threads.py); boto3 makes clients from a
        # session that is not thread-safe, so the first calls must not race to make one.
        # The client itself is thread-safe.
        self._making = threading.Lock()

    def _sqs(self) -> Any:
        with self._making:
            return self._client or self._make()

    def _make(self) -> Any:
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise QueueError(
                    "other", f"{self.url}: reading SQS needs boto3; pip install boto3"
                ) from None
            parts = urlsplit(self.url)
            self._client = boto3.client(
                "sqs",
                endpoint_url=f"{parts.scheme}://{parts.netloc}",
                region_name=region_of(self.url, self.options),
                config=Config(
                    connect_timeout=5,
                    read_timeout=WAIT_SECONDS + 10,
                    retries={"max_attempts": 3, "mode": "standard"},
                ),
            )
        return self._client

    async def receive(self) -> list[tuple[Any, str]]:
        def call() -> list[tuple[Any, str]]:
            try:
                r = self._sqs().receive_message(
                    QueueUrl=self.url, MaxNumberOfMessages=BATCH, WaitTimeSeconds=WAIT_SECONDS
                )
            except QueueError:
                raise
            except Exception as e:
                raise self._error(e, "receive") from e
            return [(m["ReceiptHandle"], m.get("Body", "")) for m in r.get("Messages", [])]

        return await off_loop(call, "sqs-receive")

    async def delete(self, receipts: list[Any]) -> None:
        def call() -> None:
            for i in range(0, len(receipts), BATCH):
                entries = [
                    {"Id": str(n), "ReceiptHandle": h}
                    for n, h in enumerate(receipts[i : i + BATCH])
                ]
                try:
                    r = self._sqs().delete_message_batch(QueueUrl=self.url, Entries=entries)
                except Exception as e:
                    raise self._error(e, "delete") from e
                # A receipt that is no longer valid: the message became visible again
                # (recording took longer than the visibility timeout) and is someone's
                # to record and delete now. Recording it twice is harmless.
                failed = [
                    f for f in r.get("Failed") or [] if f.get("Code") != "ReceiptHandleIsInvalid"
                ]
                if failed:
                    f = failed[0]
                    raise self._coded(str(f.get("Code", "")), str(f.get("Message", "")), "delete")

        await off_loop(call, "sqs-delete")

    def parse(self, body: str) -> Parsed:
        return parse_s3(body, self.bucket.bucket, self.bucket.prefix)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _error(self, e: Exception, op: str) -> QueueError:
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            err = response.get("Error") or {}
            return self._coded(str(err.get("Code", "")), str(err.get("Message", e)), op)
        name = type(e).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return queue_error(
                "credentials",
                self.url,
                "no AWS credentials found",
                "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role",
                name,
            )
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"):
            return queue_error(
                "unreachable",
                self.url,
                "cannot reach the queue",
                "check watches[].queue.url, DNS, the network and any proxy",
                f"{name}: {e}",
            )
        return queue_error("other", self.url, f"{op} failed", "see the log", f"{name}: {e}")

    def _coded(self, code: str, message: str, op: str) -> QueueError:
        # Some SQS-compatible servers answer the JSON protocol with an XML error body,
        # which botocore reports as the bare HTTP status: read the code from the XML.
        xml_code, xml_message = _XML_CODE.search(message), _XML_MESSAGE.search(message)
        if xml_code:
            code = xml_code.group(1)
        if xml_message:
            message = xml_message.group(1)
        detail = f"{code}: {message}"
        if code in _NOT_FOUND:
            return queue_error(
                "not_found",
                self.url,
                "the queue does not exist",
                "create it or fix watches[].queue.url",
                detail,
            )
        if code in _DENIED:
            return queue_error(
                "denied",
                self.url,
                f"access denied ({op})",
                "grant these credentials sqs:ReceiveMessage and sqs:DeleteMessage on the queue",
                detail,
            )
        if code in _CREDENTIALS:
            return queue_error(
                "credentials",
                self.url,
                "the credentials were rejected",
                "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role",
                detail,
            )
        return queue_error("other", self.url, f"{op} failed", "see the log", detail)
