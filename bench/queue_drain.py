"""How far a bucket's event queue falls behind a busy bucket, with 1 receive in flight
against RECEIVERS (sources/queues/feed.py), measured in the same run on moto's SQS.

A producer sends S3 event notifications at RATE messages/s for SECONDS (10 per
`send_message_batch`, each with its send time as `eventTime`); one `QueueFeed` on
`SqsQueue` consumes them, and its `record` waits COMMIT ms per batch, as the daemon's
ledger commit does (a loaded PostgreSQL group commit takes tens of ms). Reported per
case: messages/s taken, each message's lag (recorded − sent: p50, p99, max), and how
long the queue took to drain after the producer stopped. moto scans the whole queue on
every receive and delete, so a consumer that falls behind gets slower still: the cost
the 20,000-object run of tests/e2e/test_many_daemons.py paid (1,063 s).

    .venv/bin/python bench/queue_drain.py [--rate 200] [--seconds 20] [--commit 50] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import percentile

from tests.support.services import start_s3


def body(n: int) -> str:
    sent = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    record = {
        "eventName": "ObjectCreated:Put",
        "eventTime": sent,
        "s3": {"bucket": {"name": "bkt"}, "object": {"key": f"in/o{n:07}.bin"}},
    }
    return json.dumps({"Records": [record]})


def produce(sqs: Any, url: str, rate: float, seconds: float, start: int) -> int:
    """Send at `rate` for `seconds`, in batches of 10; returns how many were sent."""
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        due = t0 + (n + 10) / rate
        entries = [{"Id": str(i), "MessageBody": body(start + n + i)} for i in range(10)]
        sqs.send_message_batch(QueueUrl=url, Entries=entries)
        n += 10
        time.sleep(max(0.0, due - time.monotonic()))
    return n


async def case(
    sqs: Any, url: str, receivers: int, rate: float, seconds: float, commit: float, start: int
) -> dict[str, float]:
    from ingestd.config import SourceOptions, parse_bucket_url
    from ingestd.sources.queues import QueueFeed
    from ingestd.sources.queues.sqs import SqsQueue

    client = SqsQueue(url, parse_bucket_url("s3://bkt/in"), SourceOptions())
    feed = QueueFeed(client, "bench", receivers=receivers)
    lags: list[float] = []

    async def record(hints: list[Any]) -> None:
        await asyncio.sleep(commit / 1000)
        now = time.time()
        lags.extend(now - h.event_time for h in hints)

    async def report(problem: str | None) -> None:
        if problem:
            print("queue problem:", problem, flush=True)

    sent: list[int] = []
    producer = threading.Thread(
        target=lambda: sent.append(produce(sqs, url, rate, seconds, start)), daemon=True
    )
    task = asyncio.create_task(feed.run(record, report))
    t0 = time.monotonic()
    producer.start()
    while producer.is_alive():
        await asyncio.sleep(0.1)
    stopped = time.monotonic()
    while len(lags) < sent[0] and time.monotonic() - stopped < 300:
        await asyncio.sleep(0.1)
    end = time.monotonic()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await client.close()
    lags.sort()
    return {
        "sent": sent[0],
        "taken": len(lags),
        "per_s": len(lags) / (end - t0),
        "p50": percentile(lags, 50),
        "p99": percentile(lags, 99),
        "max": lags[-1] if lags else float("nan"),
        "drain": end - stopped,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--commit", type=float, default=50.0, help="ms per recorded batch")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--receivers", type=int, default=4)
    args = ap.parse_args()
    import boto3
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    # The feed's client reads the same chain as the daemon's: any key works on moto here.
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    tmp = Path(tempfile.mkdtemp(prefix="ingestd-bench-drain-"))
    svc = start_s3(auth=False, log_dir=tmp)
    try:
        sqs = boto3.client(
            "sqs",
            endpoint_url=svc.endpoint,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )
        rows: list[tuple[int, int, dict[str, float]]] = []
        start = 0
        for r in range(args.rounds):
            for k in (1, args.receivers) if r % 2 == 0 else (args.receivers, 1):
                url = sqs.create_queue(QueueName=f"drain-{r}-{k}")["QueueUrl"]
                got = asyncio.run(case(sqs, url, k, args.rate, args.seconds, args.commit, start))
                start += int(got["sent"])
                rows.append((r, k, got))
                print(
                    f"round {r} receivers {k}: {got['taken']:.0f}/{got['sent']:.0f} taken,"
                    f" {got['per_s']:.0f}/s, lag p50 {got['p50']:.2f}s p99 {got['p99']:.2f}s"
                    f" max {got['max']:.2f}s, drained {got['drain']:.1f}s after the producer",
                    flush=True,
                )
        for k in (1, args.receivers):
            p99 = sorted(g["p99"] for _, kk, g in rows if kk == k)
            print(f"receivers {k}: lag p99 by round {', '.join(f'{x:.2f}s' for x in p99)}")
    finally:
        svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
