"""Listing 100,000 objects on the S3 emulator: our `list_pages` vs a plain boto3
paginator over the same prefix, in the same run, and the memory of each listing.

moto's S3 server runs on 127.0.0.1 (started here, without IAM checks so that the
server's cost per request is the same for both clients). 100,000 small objects are
written once with boto3 in parallel threads; with INGESTD_BENCH_S3=<endpoint> a
running moto that already holds them is reused (only missing objects are written).

Each listing runs in a fresh child process, so its memory is its own: RSS after the
imports and client set-up ("before"), and the peak (VmHWM) and RSS at the end of the
listing. Variants, in rotated order per run:

- ours: `open_store(...).list_pages()` with 1,000-object pages, keeping nothing;
- boto3: `list_objects_v2` paginator, keeping nothing;
- ours, kept: the same listing collected into one Python list (what an unbounded
  listing would cost; the contrast for "memory stays bounded").

    .venv/bin/python bench/bucket_listing.py [--runs N]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import ENV, PYTHON, REPO, machine_md, median, runs_arg, spread, table

OBJECTS = int(os.environ.get("INGESTD_BENCH_LISTING_OBJECTS", "100000"))  # smaller for a smoke run
PREFIX = "bench/listing/"
BUCKET = "ingestd-bench-listing"
BODY = b"x" * 64


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# --- the child: one listing ------------------------------------------------------------


def child(variant: str, endpoint: str) -> None:
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    if variant == "boto3":
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        pages = client.get_paginator("list_objects_v2")
        before = _kib("VmRSS")
        cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        n = 0
        for page in pages.paginate(Bucket=BUCKET, Prefix=PREFIX):
            n += len(page.get("Contents", ()))
    else:
        import asyncio

        from ingestd.config import SourceOptions, parse_bucket_url
        from ingestd.sources.bucket import open_store

        store = open_store(
            parse_bucket_url(f"s3://{BUCKET}/{PREFIX}"),
            SourceOptions(endpoint=endpoint, allow_http=True, region="us-east-1"),
            page_size=1000,
        )
        kept: list[Any] = []

        async def listing() -> int:
            count = 0
            async for page in store.list_pages():
                count += len(page)
                if variant == "ours-kept":
                    kept.extend(page)
            await store.close()
            return count

        before = _kib("VmRSS")
        cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        n = asyncio.run(listing())
    took = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(
        json.dumps(
            {
                "variant": variant,
                "objects": n,
                "seconds": took,
                "cpu": cpu,
                "rss_before_kib": before,
                "hwm_kib": _kib("VmHWM"),
                "rss_after_kib": _kib("VmRSS"),
            }
        )
    )


# --- the parent ----------------------------------------------------------------------------


def fill(endpoint: str) -> tuple[int, float]:
    """Write the objects that are missing; returns (written, seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from botocore.config import Config

    cfg = Config(max_pool_connections=32, retries={"max_attempts": 5})
    kw = dict(
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        config=cfg,
    )
    s3 = boto3.client("s3", **kw)
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    have: set[str] = set()
    if BUCKET in existing:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX):
            have.update(o["Key"] for o in page.get("Contents", ()))
    else:
        s3.create_bucket(Bucket=BUCKET)
    keys = [f"{PREFIX}d{i // 1000:03d}/f{i:06d}.bin" for i in range(OBJECTS)]
    missing = [k for k in keys if k not in have]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=BUCKET, Key=k, Body=BODY), missing))
    return len(missing), time.perf_counter() - t0


def one(variant: str, endpoint: str) -> dict[str, Any]:
    out = subprocess.run(
        [PYTHON, str(Path(__file__).resolve()), "--child", variant, endpoint],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=1800,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{variant} listing failed ({out.returncode}):\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["objects"] != OBJECTS:
        raise RuntimeError(f"{variant} listed {res['objects']} objects, not {OBJECTS}")
    return res


def main(runs: int | None = None) -> str:
    runs = runs or runs_arg(3)
    sys.path.insert(0, str(REPO))
    from tests.support.services import start_s3

    emu = None
    endpoint = os.environ.get("INGESTD_BENCH_S3")
    t_start = time.perf_counter()
    if not endpoint:
        emu = start_s3(auth=False)
        endpoint = emu.endpoint
    started = time.perf_counter() - t_start
    try:
        written, fill_s = fill(endpoint)
        print(f"wrote {written} objects in {fill_s:.0f}s", file=sys.stderr)
        variants = ["ours", "boto3", "ours-kept"]
        results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for r in range(runs):
            order = variants[r % 3 :] + variants[: r % 3]
            for v in order:
                res = one(v, endpoint)
                results[v].append(res)
                print(
                    f"run {r + 1} {v}: {res['objects'] / res['seconds']:,.0f} objects/s, "
                    f"peak {res['hwm_kib'] / 1024:.1f} MiB",
                    file=sys.stderr,
                )
    finally:
        if emu is not None:
            emu.stop()

    def rate(v: str) -> list[float]:
        return [x["objects"] / x["seconds"] for x in results[v]]

    def mib(v: str, key: str) -> list[float]:
        return [x[key] / 1024 for x in results[v]]

    def growth(v: str) -> list[float]:
        return [(x["hwm_kib"] - x["rss_before_kib"]) / 1024 for x in results[v]]

    names = {
        "ours": "ours: `list_pages` (obstore), pages of 1,000",
        "boto3": "baseline: boto3 `list_objects_v2` paginator",
        "ours-kept": "ours, every page kept in one list (unbounded, for contrast)",
    }
    base = median(rate("boto3"))
    rows = []
    for v in variants:
        rows.append(
            [
                names[v],
                f"{median(rate(v)):,.0f}",
                spread(rate(v)),
                f"{median(rate(v)) / base:.2f}",
                f"{median([x['cpu'] for x in results[v]]):.2f}",
                f"{median(mib(v, 'rss_before_kib')):.1f}",
                f"{median(mib(v, 'hwm_kib')):.1f}",
                f"+{median(growth(v)):.1f}",
            ]
        )
    md = table(
        [
            "listing of 100,000 objects",
            "objects/s (median)",
            "objects/s (spread)",
            "ratio vs boto3",
            "client CPU s",
            "RSS before (MiB)",
            "peak RSS (MiB)",
            "peak − before (MiB)",
        ],
        rows,
    )
    src = f"reused {endpoint}" if emu is None else f"moto started in {started:.1f}s"
    notes = [
        f"- {runs} runs, each listing in a fresh child process, order rotated per run; "
        "medians, spread = min–max.",
        f"- {OBJECTS:,} objects of {len(BODY)} B under `{PREFIX}` in folders of 1,000; "
        f"{src}; {written:,} objects written this run with boto3 in 16 threads "
        f"({fill_s:.0f} s).",
        "- Both clients wait on the same single-process moto server, which builds each "
        "1,000-key XML page in Python: wall-clock throughput is mostly the server's; "
        "client CPU shows the clients' own cost.",
    ]
    return md + "\n\n" + "\n".join(notes)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        sys.path.insert(0, str(REPO))
        child(sys.argv[2], sys.argv[3])
        sys.exit(0)
    md = main()
    print(machine_md())
    print()
    print(md)
