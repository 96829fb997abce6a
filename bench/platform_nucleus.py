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
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from common import ENV, INGESTD, REPO, Workspace, machine_md, median, runs_arg, spread, table

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.fakes.nucleus import FakeNucleus, FakeNucleusThread

KEY_ENV = "INGESTD_BENCH_NUCLEUS_KEY"
KEY = "nucleus-bench-key-0b6e"
SDK_PYTHON = REPO / ".cache" / "sdk" / "nucleus" / "bin" / "python"
SIZE = 10 * 1024
PER_DIR = 100
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


def make_pngs(root: Path, files: int) -> int:
    """`files` PNGs of random pixels, each about SIZE bytes; returns the bytes written."""
    from PIL import Image

    side = int((SIZE / 3) ** 0.5)  # RGB noise does not compress: ~3 bytes a pixel
    total = 0
    for i in range(files):
        d = root / f"d{i // PER_DIR:04d}"
        if i % PER_DIR == 0:
            d.mkdir(parents=True, exist_ok=True)
        p = d / f"img{i:06d}.png"
        Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(p)
        total += p.stat().st_size
    return total


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


def run_ingestd(ws: Workspace, src: Path, fake: FakeNucleus, dataset: str) -> float:
    run = ws.fresh("ingestd")
    cfg = run / "ingestd.yaml"
    backend = {"kind": "nucleus", "api_key_env": KEY_ENV, "base_url": fake.base_url}
    cfg.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(run / "state"),
                "log": {"level": "info", "format": "json"},
                "backend": backend,
                "watches": [{"name": "w", "source": str(src), "dataset": dataset, "settle": "0s"}],
            },
            sort_keys=False,
        )
    )
    return _timed([*INGESTD, "sync", "-c", str(cfg)], run / "stderr.log", ENV, "ingestd sync")


def run_sdk(ws: Workspace, src: Path, fake: FakeNucleus, dataset: str) -> float:
    run = ws.fresh("scale-nucleus")
    env = {
        **os.environ,
        "BENCH_KEY": KEY,
        "BENCH_URL": fake.base_url,
        "BENCH_DATASET": dataset,
        "BENCH_ROOT": str(src),
    }
    return _timed([str(SDK_PYTHON), "-c", SDK_SCRIPT], run / "stderr.log", env, "scale-nucleus")


def _timed(cmd: list[str], log: Path, env: dict[str, str], who: str) -> float:
    with open(log, "wb") as err:
        t = time.perf_counter()
        proc = subprocess.run(
            cmd, stdout=err, stderr=err, env=env, cwd=REPO, timeout=3600, check=False
        )
        dt = time.perf_counter() - t
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-5:]
        raise RuntimeError(f"{who} exited {proc.returncode}: {tail}")
    return dt


async def _register_through_sink(url: str, files: int) -> int:
    """The sink's batch put of `files` bucket objects, in groups of the sink's limit
    (what the sync step hands it): the API requests it made."""
    import logging

    import structlog

    # In this process the sink's debug lines would land in the printed markdown.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    from ingestd.config import NucleusBackend
    from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
    from ingestd.sinks.base import BatchItem
    from ingestd.sinks.nucleus import NucleusSink

    sink = NucleusSink(NucleusBackend(kind="nucleus", api_key_env=KEY_ENV, base_url=url))
    limits = sink.capabilities.batch
    assert limits is not None
    items = []
    for i in range(files):
        key = f"raw/d{i // PER_DIR:04d}/img{i:06d}.png"
        f = FilePayload(
            key.rsplit("/", 1)[-1],
            "",
            SIZE,
            "",
            url=f"s3://bkt/{key}",
            etag=f'"{i}"',
            https_url=f"https://bkt.s3.amazonaws.com/{key}",  # as the bucket source gives it
        )
        items.append(
            ItemPayload("/" + key.rsplit("/", 1)[0], f.name, (SlotPayload("0", "image", (f,)),), {})
        )
    dataset = f"register-{time.time_ns()}"
    try:
        await sink.ensure_dataset(dataset)
        before = sink.client.requests
        for at in range(0, files, limits.items):
            group = [BatchItem(dataset, it) for it in items[at : at + limits.items]]
            bad = [r for r in await sink.put_items(group) if isinstance(r, Exception)]
            if bad:
                raise RuntimeError(f"register through the sink: {bad[0]}")
        return sink.client.requests - before
    finally:
        await sink.close()


def measure(files: int = 1000, runs: int = 3, job_seconds: float = JOB_SECONDS) -> dict[str, Any]:
    if not SDK_PYTHON.exists():
        raise SystemExit(f"no scale-nucleus venv at {SDK_PYTHON.parent.parent}: run `bash .ci/run`")
    os.environ[KEY_ENV] = KEY
    ENV[KEY_ENV] = KEY
    speed: dict[str, list[float]] = {"ingestd": [], "sdk": []}
    per_file: dict[str, list[float]] = {"ingestd": [], "sdk": []}
    fake = FakeNucleus(KEY, job_polls=0, job_seconds=job_seconds)
    with FakeNucleusThread(fake), Workspace("nucleus") as ws:
        for i in range(runs):
            src = ws.fresh("files")
            make_pngs(src, files)
            os.sync()  # the tree's writeback must not land inside a measurement
            sides = ["ingestd", "sdk"] if i % 2 == 0 else ["sdk", "ingestd"]
            for side in sides:
                dataset = f"{side}-{i}"
                before = len(fake.requests())
                run = run_ingestd if side == "ingestd" else run_sdk
                dt = run(ws, src, fake, dataset)
                check_held(fake, src, dataset, side)
                speed[side].append(files / dt)
                per_file[side].append((len(fake.requests()) - before) / files)
                print(
                    f"run {i + 1}/{runs} {side}: {files / dt:,.1f} files/s, "
                    f"{per_file[side][-1]:.3f} API requests/file",
                    file=sys.stderr,
                )
        register = asyncio.run(_register_through_sink(fake.base_url, files)) / files
    ratio = median(speed["ingestd"]) / median(speed["sdk"])
    return {
        "platform": "nucleus",
        "files": files,
        "ingestd_files_s": median(speed["ingestd"]),
        "sdk_files_s": median(speed["sdk"]),
        "ingestd_requests_per_file": median(per_file["ingestd"]),
        "sdk_requests_per_file": median(per_file["sdk"]),
        "register_requests_per_file": register,
        "notes": (
            f"{runs} runs; files/s spread ingestd {spread(speed['ingestd'])}, scale-nucleus "
            f"{spread(speed['sdk'])}; speed ratio {ratio:.1f}×; both sides with their "
            f"defaults; the fake's jobs end {job_seconds:g} s after they are made; the SDK "
            "sleeps 5 s after each job poll (JOB_POLLING_INTERVAL), ingestd polls a "
            "group's jobs with one jobs listing from 50 ms on; register measured through "
            "the sink's batch put with remote FilePayloads"
        ),
    }


def _arg(name: str, default: float) -> float:
    args = sys.argv[1:]
    return float(args[args.index(name) + 1]) if name in args else default


def main() -> None:
    runs = runs_arg(3)
    files = int(_arg("--files", 1000))
    r = measure(files=files, runs=runs, job_seconds=_arg("--job-seconds", JOB_SECONDS))
    print(f"### Scale Nucleus: ingestd vs scale-nucleus `append` ({files:,} × 10 KB PNGs)\n")
    print(machine_md())
    print()
    print(
        table(
            ["", "files/s", "API requests/file"],
            [
                [
                    "ingestd",
                    f"{r['ingestd_files_s']:,.1f}",
                    f"{r['ingestd_requests_per_file']:.3f}",
                ],
                [
                    "scale-nucleus 0.22.3 append",
                    f"{r['sdk_files_s']:,.1f}",
                    f"{r['sdk_requests_per_file']:.3f}",
                ],
                [
                    "ratio",
                    f"{r['ingestd_files_s'] / r['sdk_files_s']:.1f}×",
                    f"{r['ingestd_requests_per_file'] / r['sdk_requests_per_file']:.2f}×",
                ],
                ["ingestd, transfer: register", "", f"{r['register_requests_per_file']:.3f}"],
            ],
        )
    )
    print(f"\n{r['notes']}")


if __name__ == "__main__":
    main()
