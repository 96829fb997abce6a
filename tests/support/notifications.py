"""S3 event notifications into SQS on moto's server, for the queue tests: a bucket that
notifies a new queue (moto's S3 sends `s3:TestEvent`, then `ObjectCreated:*` and
`ObjectRemoved:*` with URL-encoded keys, as S3 does), and the queue's message count."""

from __future__ import annotations

from typing import Any

import boto3

from tests.support.emulators import REGION, S3Emulator, unique_name


def sqs_client(emu: S3Emulator, key: tuple[str, str] | None = None) -> Any:
    access, secret = key or (emu.access_key, emu.secret_key)
    return boto3.client(
        "sqs",
        endpoint_url=emu.endpoint,
        region_name=REGION,
        aws_access_key_id=access,
        aws_secret_access_key=secret,
    )


def notified_bucket(emu: S3Emulator, visibility: int = 2) -> tuple[str, str]:
    """A bucket whose ObjectCreated/ObjectRemoved events go to a new SQS queue
    (messages received and not deleted come back after `visibility` seconds)."""
    bucket = emu.create_bucket()
    return bucket, notify_queue(emu, bucket, visibility)


def notify_queue(emu: S3Emulator, bucket: str, visibility: int = 2) -> str:
    """Make `bucket` send its ObjectCreated/ObjectRemoved events to a new SQS queue, from
    now on (objects already there send nothing); returns the queue's URL."""
    sqs = sqs_client(emu)
    url = sqs.create_queue(
        QueueName=unique_name("q"), Attributes={"VisibilityTimeout": str(visibility)}
    )["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    emu.client().put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {"QueueArn": arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}
            ]
        },
    )
    return url


def visible_messages(emu: S3Emulator, url: str) -> int:
    """Messages in the queue, received or not."""
    attrs = sqs_client(emu).get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(
        attrs["ApproximateNumberOfMessagesNotVisible"]
    )
