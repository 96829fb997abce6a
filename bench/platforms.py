"""The platform sinks against each platform's fake, each beside its official SDK on the
same fake, the same files, in the same run (issue 13, point 7):

    .venv/bin/python bench/platforms.py [--runs N] [--files N]

For each platform: 1,000 random 10 KB PNGs (default), whole processes on both sides
(`python -m ingestd.cli sync` for ingestd; the SDK's own upload call in its venv under
.cache/sdk, made by `bash .ci/run`), files/s and API requests per file counted at the
fake, medians of N runs, and the ratios. For a rate-limited API requests per file *is*
throughput: V7 allows 1,000 requests a minute per key, so 2 requests per file is at
most 500 files a minute whatever the client does.

The figures of each platform come from bench/platform_<name>.py (`measure`); this
script runs them in turn and prints the markdown for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import platform_darwin
import platform_labelbox
import platform_nucleus
from common import machine_md, table

PLATFORMS = [platform_darwin, platform_labelbox, platform_nucleus]
TARGETS = {
    "darwin": "files/s ≥ 3× darwin-py `push`; requests/file ≤ darwin-py's; register ≤ 0.05",
    "labelbox": "files/s ≥ 3× labelbox-python `upsert_data_rows`; requests/file ≤ the SDK's",
    "nucleus": "files/s ≥ 3× scale-nucleus `append`; requests/file ≤ the SDK's",
}


def row(r: dict[str, Any]) -> list[str]:
    speed = r["ingestd_files_s"] / r["sdk_files_s"] if r["sdk_files_s"] else float("nan")
    return [
        r["platform"],
        str(r["files"]),
        f"{r['ingestd_files_s']:.1f}",
        f"{r['sdk_files_s']:.1f}",
        f"{speed:.2f}×",
        f"{r['ingestd_requests_per_file']:.3f}",
        f"{r['sdk_requests_per_file']:.3f}",
        TARGETS.get(r["platform"], ""),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--files", type=int, default=1000)
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = []
    for bench in PLATFORMS:
        print(f"== {bench.__name__}", file=sys.stderr)
        results.append(bench.measure(files=args.files, runs=args.runs))
    print(f"### Platform sinks vs the official SDKs ({started})\n")
    print(f"`.venv/bin/python bench/platforms.py --runs {args.runs} --files {args.files}`\n")
    print(machine_md())
    print()
    print(
        table(
            [
                "platform",
                "files",
                "ingestd files/s",
                "SDK files/s",
                "ratio",
                "ingestd req/file",
                "SDK req/file",
                "target",
            ],
            [row(r) for r in results],
        )
    )
    for r in results:
        extra = {k: v for k, v in r.items() if k.endswith("_per_file") and "sdk" not in k}
        extra.pop("ingestd_requests_per_file", None)
        for k, v in extra.items():
            print(f"\n- {r['platform']} {k.replace('_', ' ')}: {v:.3f}")
        if r.get("notes"):
            print(f"\n- {r['platform']}: {r['notes']}")


if __name__ == "__main__":
    main()
