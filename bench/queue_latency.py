"""Object written → item synced, with a bucket event queue, on a prefix already holding
many objects; against the listing the queue replaces, measured in the same run.

moto's server (S3 + SQS, no IAM checks) runs on 127.0.0.1; the prefix is filled with
OBJECTS small objects by concurrent puts (their events are purged from the queue), and
the bucket notifies the queue. One `ingestd run` watches the prefix with `queue`,
`settle: 1s`, `transfer: register`, the local store, and `poll_interval: 1h`. After its
start listing has synced the prefix, NEW objects are written one at a time, each waited
for; latency = the daemon's "synced" log time − the put's time.

Baseline, same run, same daemon: the start listing's own duration (its "scan done"
seconds). Without a queue a new object waits for the next listing: on average
poll_interval/2 plus that duration, and never less than the duration.

    .venv/bin/python bench/queue_latency.py [--objects N] [--new M] [--settle S]
"""

from __future__ import annotations

import argparse
import json
import os
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

    svc = start_s3(auth=False)
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
        from concurrent.futures import ThreadPoolExecutor

        def put(i: int) -> None:
            local = put.__dict__.setdefault(os.getpid(), {})
            import threading

            c = local.get(threading.get_ident())
            if c is None:
                c = local[threading.get_ident()] = boto3.client("s3", **kw)
            c.put_object(Bucket=BUCKET, Key=f"in/d{i // 1000:04d}/o{i:07d}.bin", Body=b"x" * 64)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, range(args.objects)))
        fill = time.monotonic() - t0
        print(f"filled {args.objects} objects in {fill:.0f}s", flush=True)
        s3.put_bucket_notification_configuration(
            Bucket=BUCKET,
            NotificationConfiguration={
                "QueueConfigurations": [
                    {"QueueArn": arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}
                ]
            },
        )
        sqs.purge_queue(QueueUrl=url)

        tmp = Path(tempfile.mkdtemp(prefix="ingestd-bench-queue-"))
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
            while time.monotonic() < deadline:
                synced = sum(1 for e in log_events(logf) if e.get("event") == "synced")
                if synced >= args.objects:
                    break
                if daemon.poll() is not None:
                    raise SystemExit(f"daemon exited:\n{logf.read_text()[-3000:]}")
                time.sleep(2)
            scan = next(e for e in log_events(logf) if e.get("event") == "scan done")
            listing_s = float(scan["seconds"])
            print(f"start listing {listing_s:.1f}s; initial sync done", flush=True)
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
            ("listing only: one listing of the prefix (baseline)", f"{listing_s:.1f} s"),
            (
                "listing only, poll_interval 60 s: mean wait ≈ 30 s + listing",
                f"{30 + listing_s:.1f} s",
            ),
            ("ratio listing (best case) / queue p99", f"{listing_s / percentile(lat, 99):.1f}×"),
        ]
        print(
            f"\n{args.objects} objects under the prefix, {args.new} new objects one by one, "
            f"settle {args.settle:g}s\n"
        )
        print(table(("measure", "value"), rows))
        print("\n" + machine_md())
        return 0
    finally:
        svc.stop()


if __name__ == "__main__":
    sys.exit(main())
