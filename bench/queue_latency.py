"""Object written → item synced, with a bucket event queue, on a prefix already holding
many objects; against the listing the queue replaces, measured in the same run.

moto's server (S3 + SQS, no IAM checks) runs on 127.0.0.1; the prefix is filled with
OBJECTS small objects (64 B) by FILL_AT_ONCE concurrent asynchronous puts (obstore: the
client costs little CPU, so moto's ~370 puts/s on this machine is the limit; 100,000
take ~4.5 minutes), before the bucket notifies the queue, so their events never reach
it. One `ingestd run` watches the prefix with `queue`, `settle: 1s`, `transfer:
register`, the local store, `poll_interval: 1h`, and `include: ["new/**"]`: its start
pass LISTS the whole prefix (every key is listed and compared with the ledger, then
dropped by the filter), but plans and syncs only the new objects of the measurement.
Syncing the 100,000 filler objects first would take ~20 minutes here and measure
nothing the latency depends on (the queue path is a HEAD per hinted key, whatever the
prefix holds). After the start pass, NEW objects are written one at a time under
new/, each waited for; latency = the daemon's "synced" log time − the put's time.

Baseline, same run, same daemon: the start pass's own duration (its "scan done"
seconds: the listing of every object of the prefix). Without a queue a new object
waits for the next listing: on average poll_interval/2 plus that duration, and never
less than the duration. With the filter the pass records no entry for the filler, so
this baseline is a lower bound of a real listing's cost (which also compares each key
with its ledger entry).

    nice -n 10 .venv/bin/python bench/queue_latency.py [--objects N] [--new M] [--settle S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ENV, PYTHON, REPO, machine_md, percentile, table

from tests.support.services import start_s3

BUCKET = "ingestd-bench-queue"
FILL_AT_ONCE = 32  # puts in flight while filling


async def fill(endpoint: str, n: int) -> None:
    """Write n objects of 64 B under in/ (1,000 per folder), FILL_AT_ONCE at a time."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        BUCKET,
        endpoint=endpoint,
        allow_http=True,
        access_key_id="bench",
        secret_access_key="bench",
        region="us-east-1",
    )
    limit = asyncio.Semaphore(FILL_AT_ONCE)

    async def put(i: int) -> None:
        async with limit:
            await obstore.put_async(store, f"in/d{i // 1000:04d}/o{i:07d}.bin", b"x" * 64)

    for lo in range(0, n, 10_000):  # tasks made a slice at a time, not 100,000 at once
        await asyncio.gather(*(put(i) for i in range(lo, min(n, lo + 10_000))))


def list_requests(logs: Path) -> int:
    """ListObjectsV2 requests moto answered (its request log is in `logs`): only the
    daemon lists, so these are the pages of its start pass."""
    return sum(
        f.read_text(errors="replace").count("list-type=2") for f in logs.glob("ingestd-moto-*.log")
    )


def log_events(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--new", type=int, default=50)
    ap.add_argument("--settle", type=float, default=1.0)
    args = ap.parse_args()
    import boto3

    tmp = Path(tempfile.mkdtemp(prefix="ingestd-bench-queue-"))
    svc = start_s3(auth=False, log_dir=tmp)  # its request log counts the listing's pages
    try:
        kw = dict(
            endpoint_url=svc.endpoint,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )
        s3, sqs = boto3.client("s3", **kw), boto3.client("sqs", **kw)
        s3.create_bucket(Bucket=BUCKET)
        url = sqs.create_queue(QueueName="bench-events")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        t0 = time.monotonic()
        asyncio.run(fill(svc.endpoint, args.objects))
        fill_s = time.monotonic() - t0
        print(f"filled {args.objects} objects in {fill_s:.0f}s", flush=True)
        s3.put_bucket_notification_configuration(
            Bucket=BUCKET,
            NotificationConfiguration={
                "QueueConfigurations": [
                    {"QueueArn": arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}
                ]
            },
        )
        sqs.purge_queue(QueueUrl=url)

        config = tmp / "ingestd.yaml"
        config.write_text(
            json.dumps(
                {
                    "state_dir": str(tmp / "state"),
                    "log": {"level": "debug", "format": "json"},
                    "status": {"listen": None},
                    "backend": {"kind": "local", "path": str(tmp / "store")},
                    "watches": [
                        {
                            "name": "b",
                            "source": f"s3://{BUCKET}/in",
                            "source_options": {"endpoint": svc.endpoint, "allow_http": True},
                            "queue": {"url": url},
                            "transfer": "register",
                            "settle": f"{args.settle}s",
                            "dataset": "ds",
                            # Listed in full, planned only for the measurement's objects.
                            "include": ["new/**"],
                        }
                    ],
                }
            )
        )
        env = {
            **ENV,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        logf = tmp / "ingestd.log"
        with open(logf, "wb") as out:
            daemon = subprocess.Popen(
                [PYTHON, "-m", "ingestd.cli", "run", "-c", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        try:
            deadline = time.monotonic() + 3600
            scan = None
            while scan is None:
                scan = next((e for e in log_events(logf) if e.get("event") == "scan done"), None)
                if daemon.poll() is not None:
                    raise SystemExit(f"daemon exited:\n{logf.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise SystemExit("no start listing within an hour")
                time.sleep(1)
            listing_s, pages = float(scan["seconds"]), list_requests(tmp)
            print(f"start listing: {pages} pages in {listing_s:.1f}s", flush=True)
            if pages * 1000 < args.objects:
                raise SystemExit(f"the start pass listed {pages} pages: not the whole prefix")
            lat: list[float] = []
            for i in range(args.new):
                key = f"new/n{i:04d}.bin"
                put_at = time.time()
                s3.put_object(Bucket=BUCKET, Key=f"in/{key}", Body=f"new {i}".encode())
                want = f"/{key}"
                while True:
                    hit = [
                        e
                        for e in log_events(logf)
                        if e.get("event") == "synced" and e.get("item") == want
                    ]
                    if hit:
                        lat.append(ts(hit[0]) - put_at)
                        break
                    if time.time() - put_at > 120:
                        raise SystemExit(f"{want} not synced within 120 s")
                    time.sleep(0.05)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
        lat.sort()
        rows = [
            ("queue: write → synced, p50", f"{percentile(lat, 50):.2f} s"),
            ("queue: write → synced, p99", f"{percentile(lat, 99):.2f} s"),
            ("queue: write → synced, max", f"{max(lat):.2f} s"),
            ("bound asked: settle + 2 s", f"{args.settle + 2:.2f} s"),
            (
                f"listing only: the start pass, {pages} pages of ≤ 1,000 keys (baseline)",
                f"{listing_s:.1f} s",
            ),
            (
                "listing only, poll_interval 60 s: mean wait ≈ 30 s + listing",
                f"{30 + listing_s:.1f} s",
            ),
            ("ratio listing (best case) / queue p99", f"{listing_s / percentile(lat, 99):.1f}×"),
        ]
        print(
            f"\n{args.objects} objects under the prefix, {args.new} new objects one by one, "
            f"settle {args.settle:g}s; filled in {fill_s:.0f} s\n"
        )
        print(table(("measure", "value"), rows))
        print("\n" + machine_md())
        return 0
    finally:
        svc.stop()
        if not os.environ.get("INGESTD_BENCH_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
