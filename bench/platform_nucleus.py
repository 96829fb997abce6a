"""Scale Nucleus: ingestd's nucleus sink beside scale-nucleus's `append` on the same fake
Nucleus API (tests/support/fakes/nucleus.py), the same files, in the same run (issue 13,
points 4 and 7).

    .venv/bin/python bench/platform_nucleus.py [--runs N] [--files N] [--job-seconds S]

- Files: N random 10 KB PNGs (noise, so incompressible) in folders of 100, made anew
  each run; both sides send the same files, each into a dataset of its own.
- ingestd: `python -m ingestd.cli sync -c CONFIG` (nucleus backend, every setting at its
  default: 8 workers, the 600 requests a minute budget), timed from process start to
  exit.
- scale-nucleus 0.22.3 in its own venv (.cache/sdk/nucleus, made by `bash .ci/run`):
  `NucleusClient(key, endpoint=...)`, `create_dataset`, `append(items, update=True)`
  with its defaults (10 files a request, 10 requests at once), then
  `sleep_until_complete()` on the job it returns, as its documentation shows; timed from
  process start to exit. The SDK waits for every job but the last itself, polling each
  and sleeping 5 s after every poll.
- The fake's jobs take `--job-seconds` (default 0.5 s) before they report an end, the
  same for both sides. API requests per file are counted at the fake. Both sides must
  leave every file on the fake, byte for byte, or the run fails.
- `transfer: register` (bucket objects by URL, no bytes): the sink's batch put with
  remote FilePayloads, in groups as the sync step forms them.

The fake runs in a thread of this process, which does nothing else while a side runs.
Order alternates per run; medians of --runs.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

from common import Workspace
from platform_common import (
    Sides,
    alternate,
    arg,
    print_report,
    put_remote_items,
    register_row,
    runs_and_files,
)

from tests.support.fakes.nucleus import FakeNucleus, FakeNucleusThread

KEY_ENV = "INGESTD_BENCH_NUCLEUS_KEY"
KEY = "nucleus-bench-key-0b6e"
JOB_SECONDS = 0.5

SDK_SCRIPT = r"""
import os, warnings
from pathlib import Path
from nucleus import DatasetItem, NucleusClient

warnings.simplefilter("ignore", DeprecationWarning)
root = Path(os.environ["BENCH_ROOT"])
client = NucleusClient(os.environ["BENCH_KEY"], endpoint=os.environ["BENCH_URL"])
ds = client.create_dataset(os.environ["BENCH_DATASET"], is_scene=False)
items = [
    DatasetItem(image_location=str(p), reference_id="/" + p.relative_to(root).as_posix())
    for p in sorted(root.rglob("*.png"))
]
job = ds.append(items, update=True)
job.sleep_until_complete(verbose_std_out=False)
"""

SIDES = Sides("scale-nucleus", "nucleus", SDK_SCRIPT, KEY_ENV, KEY)


def check_held(fake: FakeNucleus, src: Path, dataset: str, who: str) -> None:
    """Every file under its key, with its bytes, and nothing else."""
    want = {
        "/" + p.relative_to(src).as_posix(): hashlib.sha256(p.read_bytes()).digest()
        for p in src.rglob("*.png")
    }
    blobs = fake.blobs(dataset)  # fails on two datasets of the name
    got = {ref: hashlib.sha256(data).digest() for ref, data in blobs.items()}
    if got != want or len(fake.items(dataset)) != len(want):
        raise RuntimeError(f"{who}: the fake holds {len(got)} of {len(want)} files as sent")


async def _register_through_sink(url: str, files: int) -> int:
    """The sink's batch put of `files` bucket objects, in groups of the sink's limit
    (what the sync step hands it): the API requests it made."""
    import logging

    import structlog

    # In this process the sink's debug lines would land in the printed markdown.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    from ingestd.config import NucleusBackend
    from ingestd.sinks.nucleus import NucleusSink

    sink = NucleusSink(NucleusBackend(kind="nucleus", api_key_env=KEY_ENV, base_url=url))
    return await put_remote_items(sink, files, lambda: sink.client.requests, https=True)


def measure(files: int = 1000, runs: int = 3, job_seconds: float = JOB_SECONDS) -> dict[str, Any]:
    SIDES.prepare()
    fake = FakeNucleus(KEY, job_polls=0, job_seconds=job_seconds)
    with FakeNucleusThread(fake), Workspace("nucleus") as ws:

        def side(who: str, src: Path, dataset: str) -> tuple[float, int]:
            before = len(fake.requests())
            backend = {"kind": "nucleus", "api_key_env": KEY_ENV, "base_url": fake.base_url}
            dt = SIDES.run(who, ws, src, dataset, backend, {"BENCH_URL": fake.base_url})
            check_held(fake, src, dataset, who)
            return dt, len(fake.requests()) - before

        samples = alternate(ws, files, runs, side, writeback=True)
        register = asyncio.run(_register_through_sink(fake.base_url, files)) / files
    return {
        **samples.headline("nucleus", files),
        "register_requests_per_file": register,
        "notes": (
            f"{runs} runs; {samples.spreads('scale-nucleus', '.1f')}; both sides with their "
            f"defaults; the fake's jobs end {job_seconds:g} s after they are made; the SDK "
            "sleeps 5 s after each job poll (JOB_POLLING_INTERVAL), ingestd polls a "
            "group's jobs with one jobs listing from 50 ms on; register measured through "
            "the sink's batch put with remote FilePayloads"
        ),
    }


def main() -> None:
    runs, files = runs_and_files()
    r = measure(files=files, runs=runs, job_seconds=arg("--job-seconds", JOB_SECONDS))
    print_report(
        f"Scale Nucleus: ingestd vs scale-nucleus `append` ({files:,} × 10 KB PNGs)",
        r,
        "scale-nucleus 0.22.3 append",
        speed_ratio_fmt=".1f",
        extra_rows=[register_row(r)],
    )


if __name__ == "__main__":
    main()
