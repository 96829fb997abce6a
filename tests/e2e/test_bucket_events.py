"""Bucket event queues, end to end: the daemon as a subprocess with a bucket watch that
names a queue, on real emulators.

- S3 → SQS: moto's server (S3 and SQS on one endpoint, IAM enforced). moto's S3 sends
  the event notifications to SQS itself once the bucket has a notification
  configuration (the `s3:TestEvent` first, then `ObjectCreated:*` / `ObjectRemoved:*`
  with URL-encoded keys), as S3 does.
- Azure: Azurite's blob and queue services. Azurite has no Event Grid, so the test plays
  Event Grid's part: it writes each blob event into the queue base64-encoded, in the
  Event Grid schema, as Event Grid's storage-queue handler does.

The listing interval is 1 h (the default with a queue), so everything after the start
listing arrives through the queue; the tests check that no other listing ran."""

from __future__ import annotations

import base64
import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from tests.support.daemon import Env, log_lines, sha256_digest, synced_lines
from tests.support.emulators import REGION, AzureEmulator, S3Emulator, unique_name
from tests.support.need import need
from tests.support.notifications import notified_bucket, sqs_client, visible_messages
from tests.support.services import ENV_AZURE_QUEUE_ENDPOINT
from tests.support.wait import wait_for

DEADLINE = 60.0  # generous: emulators and other sessions share two cores


@pytest.fixture
def s3(s3_emulator: S3Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Emulator]:
    for k, v in s3_emulator.env.items():
        monkeypatch.setenv(k, v)
    yield s3_emulator


def queue_watch(emu: Any, bucket: str, queue: str, **kw: Any) -> dict[str, Any]:
    return {
        "name": "b",
        "source": emu.url(bucket, "in"),
        "source_options": emu.source_options,
        "queue": {"url": queue},
        "dataset": "ds",
        "settle": "0.5s",
        "transfer": "copy",
        "on_delete": "delete",
        **kw,
    }


def listings(env: Env) -> int:
    return len(log_lines(env, "scan done", watch="b"))


def digest_of(env: Env, key: str) -> str | None:
    item = env.items_by_key().get(key)
    return item["slots"][0]["files"][0]["digest"] if item else None


def test_sqs_notified_watch_syncs_new_overwritten_and_deleted_objects(
    env: Env, s3: S3Emulator
) -> None:
    bucket, url = notified_bucket(s3)
    s3.put(bucket, "in/before.bin", b"there before the start")
    env.write_config([queue_watch(s3, bucket, url)])
    env.start()
    wait_for(lambda: "/before.bin" in env.items_by_key(), DEADLINE, what="the start listing")
    live = env.watch_status("b")
    assert live["mode"] == "queue", live
    assert url in live["mode_reason"] and "every 1h" in live["mode_reason"]

    # A key with a space and a plus: S3 sends it URL-encoded ('+' for the space).
    s3.put(bucket, "in/new dir/a b+c.bin", b"new")
    wait_for(
        lambda: digest_of(env, "/new dir/a b+c.bin") == sha256_digest(b"new"),
        DEADLINE,
        what="the new object synced through the queue",
    )
    s3.put(bucket, "in/before.bin", b"overwritten")
    wait_for(
        lambda: digest_of(env, "/before.bin") == sha256_digest(b"overwritten"),
        DEADLINE,
        what="the overwrite synced through the queue",
    )
    s3.delete(bucket, "in/new dir/a b+c.bin")
    wait_for(
        lambda: "/new dir/a b+c.bin" not in env.items_by_key(),
        DEADLINE,
        what="the deletion through the queue (on_delete: delete)",
    )
    s3.put(bucket, "elsewhere/x.bin", b"outside the prefix")
    wait_for(lambda: visible_messages(s3, url) == 0, DEADLINE, what="every message deleted")
    assert listings(env) == 1  # only the start listing: the rest came from the queue
    assert set(env.items_by_key()) == {"/before.bin"}
    assert env.watch_status("b")["problem"] is None
    assert env.stop() == 0


def restricted_key(emu: S3Emulator) -> tuple[str, str]:
    """A user that may read the bucket and receive messages but not delete them: each
    batch is recorded and then its delete fails, as if the daemon died right there."""
    iam = boto3.client(
        "iam",
        endpoint_url=emu.endpoint,
        region_name=REGION,
        aws_access_key_id=emu.access_key,
        aws_secret_access_key=emu.secret_key,
    )
    name = unique_name("nodelete")
    iam.create_user(UserName=name)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["s3:*"], "Resource": "*"},
            {
                "Effect": "Allow",
                "Action": ["sqs:ReceiveMessage", "sqs:GetQueueAttributes"],
                "Resource": "*",
            },
        ],
    }
    iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def test_sigkill_between_recording_hints_and_deleting_messages_loses_nothing(
    env: Env, s3: S3Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, url = notified_bucket(s3, visibility=2)
    access, secret = restricted_key(s3)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    env.write_config([queue_watch(s3, bucket, url)])
    env.start()
    wait_for(lambda: listings(env) >= 1, DEADLINE, what="the start listing")
    bodies = {f"/k{i}.bin": f"object {i}".encode() for i in range(5)}
    for key, data in bodies.items():
        s3.put(bucket, "in" + key, data)
    # Recorded and synced, but every delete is refused: the messages stay in the queue.
    problem = wait_for(
        lambda: (p := env.watch_status("b")["problem"]) and "delete" in p and p,
        DEADLINE,
        what="the refused delete as the watch's problem",
    )
    assert problem.startswith("queue denied: ") and "sqs:DeleteMessage" in problem
    wait_for(
        lambda: all(digest_of(env, k) == sha256_digest(v) for k, v in bodies.items()),
        DEADLINE,
        what="the objects synced from the recorded hints",
    )
    env.kill()  # SIGKILL, messages undeleted
    assert visible_messages(s3, url) > 0
    s3.put(bucket, "in/while-down.bin", b"written while the daemon was dead")

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    env.restart()
    wait_for(
        lambda: (
            digest_of(env, "/while-down.bin") == sha256_digest(b"written while the daemon was dead")
        ),
        DEADLINE,
        what="the object written while down",
    )
    wait_for(lambda: visible_messages(s3, url) == 0, DEADLINE, what="the messages, redelivered")
    wait_for(lambda: env.watch_status("b")["problem"] is None, DEADLINE, what="problem cleared")
    for key in bodies:
        assert len(synced_lines(env, key)) == 1, key  # uploaded once, across the crash
    assert env.watch_status("b")["pending"] == 0
    assert env.stop() == 0


def test_a_bad_queue_url_is_a_named_problem_and_the_daemon_stays_up(
    env: Env, s3: S3Emulator
) -> None:
    bucket = s3.create_bucket()
    s3.put(bucket, "in/a.bin", b"a")
    bad = f"{s3.endpoint}/123456789012/{unique_name('missing')}"
    env.write_config([queue_watch(s3, bucket, bad)])
    env.start()
    problem = wait_for(
        lambda: env.watch_status("b")["problem"], DEADLINE, what="the queue's problem"
    )
    assert problem.startswith("queue not_found: "), problem
    assert bad in problem and "fix watches[].queue.url" in problem
    # The listing works regardless: what is there is synced, the daemon runs on.
    wait_for(lambda: "/a.bin" in env.items_by_key(), DEADLINE, what="the listing's item")
    assert env.status()["daemon"]["running"]
    assert env.daemon is not None and env.daemon.poll() is None
    assert env.stop(signal.SIGTERM) == 0


def test_a_queue_missing_the_buckets_events_is_named_after_a_listing(
    env: Env, s3: S3Emulator
) -> None:
    bucket = s3.create_bucket()  # no notification configuration at all
    url = sqs_client(s3).create_queue(QueueName=unique_name("silent"))["QueueUrl"]
    env.write_config([queue_watch(s3, bucket, url)])
    env.start()
    wait_for(lambda: listings(env) >= 1, DEADLINE, what="the start listing")
    s3.put(bucket, "in/unannounced.bin", b"u")

    def named() -> str | None:
        # The object must be older than the grace (30 s + settle) before a listing
        # counts it against the queue; ask for listings until one does.
        env.cli("retry")
        p = env.watch_status("b")["problem"]
        return p if p and p.startswith("queue not receiving: ") else None

    problem = wait_for(named, 120, interval=5, what="the silent queue named")
    assert url in problem and "unannounced.bin" in problem and "not even" in problem
    assert "/unannounced.bin" in env.items_by_key()  # the listing synced it meanwhile
    assert env.stop() == 0


# -- Azure ----------------------------------------------------------------------------------------


def grid_message(container: str, key: str, etype: str, size: int) -> str:
    event = {
        "topic": "/subscriptions/0/resourceGroups/g/providers/Microsoft.Storage/"
        "storageAccounts/devstoreaccount1",
        "subject": f"/blobServices/default/containers/{container}/blobs/{key}",
        "eventType": f"Microsoft.Storage.{etype}",
        "eventTime": "2024-05-01T10:00:00.0000000Z",
        "id": unique_name("ev"),
        "data": {"api": "PutBlob", "contentLength": size, "blobType": "BlockBlob"},
        "dataVersion": "",
        "metadataVersion": "1",
    }
    return base64.b64encode(json.dumps(event).encode()).decode()


def test_azure_blob_events_through_a_storage_queue(
    env: Env, azure_emulator: AzureEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = os.environ.get(ENV_AZURE_QUEUE_ENDPOINT, "")
    need(endpoint, f"Azurite's queue service is not running ({ENV_AZURE_QUEUE_ENDPOINT})")
    from azure.storage.queue import QueueClient

    for k, v in azure_emulator.env.items():
        monkeypatch.setenv(k, v)
    conn = azure_emulator.connection_string + f"QueueEndpoint={endpoint};"
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", conn)
    container = azure_emulator.create_bucket()
    qname = unique_name("q").lower()
    queue = QueueClient.from_connection_string(conn, qname)
    queue.create_queue()
    # One item only: deleting it is 100% of the watch, over the default max_delete.
    watch = queue_watch(azure_emulator, container, f"{endpoint}/{qname}", max_delete="100%")
    env.write_config([watch])
    env.start()
    wait_for(lambda: listings(env) >= 1, DEADLINE, what="the start listing")
    assert env.watch_status("b")["mode"] == "queue"

    azure_emulator.put(container, "in/scan 1.bin", b"blob one")
    queue.send_message(grid_message(container, "in/scan 1.bin", "BlobCreated", 8))
    wait_for(
        lambda: digest_of(env, "/scan 1.bin") == sha256_digest(b"blob one"),
        DEADLINE,
        what="the blob synced through the queue",
    )
    azure_emulator.delete(container, "in/scan 1.bin")
    queue.send_message(grid_message(container, "in/scan 1.bin", "BlobDeleted", 0))
    wait_for(lambda: "/scan 1.bin" not in env.items_by_key(), DEADLINE, what="the deletion")
    wait_for(
        lambda: queue.get_queue_properties().approximate_message_count == 0,
        DEADLINE,
        what="the messages deleted",
    )
    assert listings(env) == 1
    assert env.stop() == 0
