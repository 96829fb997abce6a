"""V7 Darwin: ingestd's darwin sink beside darwin-py's `push` on the same fake V7 API
(tests/support/fakes/darwin.py), the same files, in the same run (issue 13, points 3 and 7).

    .venv/bin/python bench/platform_darwin.py [--runs N] [--files N]

- Files: N random 10 KB PNGs (noise, so incompressible) in folders of 100, made anew
  each run; both sides send the same files, each into a dataset of its own.
- ingestd: `python -m ingestd.cli sync -c CONFIG` (darwin backend, default workers,
  `requests_per_minute` lifted so the client-side throttle does not set the pace),
  timed from process start to exit.
- darwin-py 3.6.3: `Client.from_api_key(...)`, `create_dataset`, `push(folder,
  preserve_folders=True)` in its own venv (.cache/sdk/darwin, made by `bash .ci/run`),
  timed from process start to exit.
- API requests per file are counted at the fake (PUTs to the signed storage URLs are
  not API requests: V7's 1,000 a minute counts API requests). Both sides must leave
  every file on the fake, complete, or the run fails.
- `transfer: register` (bucket objects registered by URL, no bytes): with the S3
  emulator running (`. .ci/services.sh && start_services`), a whole `ingestd sync` of
  a bucket watch; otherwise the sink's batch put with remote FilePayloads directly,
  in groups as the sync step forms them (the notes say which).

The fake runs in a thread of this process, which does nothing else while a side runs.
Order alternates per run; medians of --runs.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from common import ENV, Workspace
from platform_common import (
    Sides,
    alternate,
    ingestd_sync,
    print_report,
    put_remote_items,
    register_row,
    runs_and_files,
)

from tests.support.fakes.darwin import API_KEY, STORAGE, TEAM, FakeDarwin, FakeDarwinThread

KEY_ENV = "INGESTD_BENCH_V7_KEY"
UNTHROTTLED = 1_000_000_000  # requests_per_minute: the client-side budget lifted

SDK_SCRIPT = r"""
import os, sys
from darwin.client import Client

client = Client.from_api_key(os.environ["BENCH_KEY"])
ds = client.create_dataset(os.environ["BENCH_DATASET"])
handler = ds.push([os.environ["BENCH_ROOT"]], preserve_folders=True)
if handler.errors or handler.blocked_count:
    sys.exit(f"darwin-py: {len(handler.errors)} errors, {handler.blocked_count} blocked")
"""

# darwin-py may look for ~/.darwin: HOME in the run's folder keeps it out of the user's.
SIDES = Sides("darwin-py", "darwin", SDK_SCRIPT, KEY_ENV, API_KEY, timeout=1800, own_home=True)


def backend(url: str, **extra: Any) -> dict[str, Any]:
    """The darwin backend on the fake at `url`, `requests_per_minute` lifted so the
    client-side throttle does not set the pace."""
    return {
        "kind": "darwin",
        "team": TEAM,
        "api_key_env": KEY_ENV,
        "base_url": url,
        **extra,
        "requests_per_minute": UNTHROTTLED,
    }


def check_held(fake: FakeDarwin, dataset: str, files: int, who: str) -> None:
    live = fake.live(dataset)  # fails on a key held twice
    done = [i for i in live.values() if i["status"] == "new"]
    if len(live) != files or len(done) != files:
        raise RuntimeError(f"{who}: the fake holds {len(done)} complete of {files} items")


# --- transfer: register ------------------------------------------------------------------


async def _register_through_sink(url: str, files: int) -> int:
    """The sink's batch put of `files` bucket objects, in groups of the sink's limit
    (what the sync step hands it): the API requests it made."""
    import structlog
    from ingestd.config import DarwinBackend
    from ingestd.sinks.darwin import DarwinSink

    # The sink's log lines go to stderr: stdout is the report.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    sink = DarwinSink(
        DarwinBackend.model_validate(
            backend(url, storage_slug=STORAGE), context={"check_paths": False}
        )
    )
    return await put_remote_items(sink, files, lambda: sink.v7.api.requests, https=False)


def measure_register(fake: FakeDarwin, files: int) -> tuple[float, str]:
    """API requests per bucket object under `transfer: register`, and how it was measured."""
    from tests.support.emulators import from_env

    emu = from_env("s3")
    if emu is None:
        n = asyncio.run(_register_through_sink(fake.url, files))
        how = (
            "register measured through the sink's batch put with remote FilePayloads "
            "(no S3 emulator running), groups as the sync step forms them"
        )
        return n / files, how
    with Workspace("darwin-register") as ws:
        bucket = emu.create_bucket("v7reg")
        emu.put_many(bucket, ((f"raw/{i:06d}.png", b"x" * 64) for i in range(files)))
        dataset = f"register-{time.time_ns()}"
        watch = {
            "name": "w",
            "source": emu.url(bucket),
            "source_options": emu.source_options,
            "transfer": "register",
            "dataset": dataset,
            "settle": "0s",
        }
        before = len(fake.calls)
        ingestd_sync(
            ws.fresh("ingestd"),
            backend(fake.url, storage_slug=STORAGE),
            [watch],
            timeout=SIDES.timeout,
            env={**ENV, **emu.env},
            who="sync",
            log=None,
        )
        check_held(fake, dataset, files, "ingestd register")
        return (
            len(fake.calls) - before
        ) / files, "register measured by `ingestd sync` of a moto S3 bucket"


# --- the benchmark -------------------------------------------------------------------------


def measure(files: int = 1000, runs: int = 3) -> dict[str, Any]:
    SIDES.prepare()
    with FakeDarwinThread() as fake, Workspace("darwin") as ws:

        def side(who: str, src: Path, dataset: str) -> tuple[float, int]:
            before = len(fake.calls)
            sdk_env = {"DARWIN_BASE_URL": fake.url.removesuffix("/api")}
            dt = SIDES.run(who, ws, src, dataset, backend(fake.url), sdk_env)
            check_held(fake, dataset, files, who)
            return dt, len(fake.calls) - before

        samples = alternate(ws, files, runs, side, speed_fmt=",.0f")
        register, how = measure_register(fake, files)
    return {
        **samples.headline("darwin", files),
        "register_requests_per_file": register,
        "notes": (
            f"{runs} runs; {samples.spreads('darwin-py', '.2f')}; {how}; ingestd with "
            "requests_per_minute lifted, darwin-py with its defaults (6 upload threads here)"
        ),
    }


def main() -> None:
    runs, files = runs_and_files()
    r = measure(files=files, runs=runs)
    print_report(
        f"V7 Darwin: ingestd vs darwin-py `push` ({files:,} × 10 KB PNGs)",
        r,
        "darwin-py 3.6.3 push",
        extra_rows=[register_row(r)],
    )


if __name__ == "__main__":
    main()
