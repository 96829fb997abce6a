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

from tests.support.fakes.darwin import API_KEY, STORAGE, TEAM, FakeDarwin, FakeDarwinThread

KEY_ENV = "INGESTD_BENCH_V7_KEY"
SDK_PYTHON = REPO / ".cache" / "sdk" / "darwin" / "bin" / "python"
SIZE = 10 * 1024
PER_DIR = 100
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


def check_held(fake: FakeDarwin, dataset: str, files: int, who: str) -> None:
    live = fake.live(dataset)  # fails on a key held twice
    done = [i for i in live.values() if i["status"] == "new"]
    if len(live) != files or len(done) != files:
        raise RuntimeError(f"{who}: the fake holds {len(done)} complete of {files} items")


def run_ingestd(ws: Workspace, src: Path, fake: FakeDarwin, dataset: str) -> float:
    run = ws.fresh("ingestd")
    cfg = run / "ingestd.yaml"
    backend = {
        "kind": "darwin",
        "team": TEAM,
        "api_key_env": KEY_ENV,
        "base_url": fake.url,
        "requests_per_minute": UNTHROTTLED,
    }
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


def run_sdk(ws: Workspace, src: Path, fake: FakeDarwin, dataset: str) -> float:
    run = ws.fresh("darwin-py")
    env = {
        **os.environ,
        "DARWIN_BASE_URL": fake.url.removesuffix("/api"),
        "HOME": str(run),  # darwin-py may look for ~/.darwin; keep it out of the user's
        "BENCH_KEY": API_KEY,
        "BENCH_DATASET": dataset,
        "BENCH_ROOT": str(src),
    }
    return _timed([str(SDK_PYTHON), "-c", SDK_SCRIPT], run / "stderr.log", env, "darwin-py")


def _timed(cmd: list[str], log: Path, env: dict[str, str], who: str) -> float:
    with open(log, "wb") as err:
        t = time.perf_counter()
        proc = subprocess.run(
            cmd, stdout=err, stderr=err, env=env, cwd=REPO, timeout=1800, check=False
        )
        dt = time.perf_counter() - t
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-5:]
        raise RuntimeError(f"{who} exited {proc.returncode}: {tail}")
    return dt


# --- transfer: register ------------------------------------------------------------------


async def _register_through_sink(url: str, files: int) -> int:
    """The sink's batch put of `files` bucket objects, in groups of the sink's limit
    (what the sync step hands it): the API requests it made."""
    import structlog
    from ingestd.config import DarwinBackend
    from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
    from ingestd.sinks.base import BatchItem
    from ingestd.sinks.darwin import DarwinSink

    # The sink's log lines go to stderr: stdout is the report.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    backend = DarwinBackend.model_validate(
        {
            "kind": "darwin",
            "team": TEAM,
            "api_key_env": KEY_ENV,
            "base_url": url,
            "storage_slug": STORAGE,
            "requests_per_minute": UNTHROTTLED,
        },
        context={"check_paths": False},
    )
    sink = DarwinSink(backend)
    limits = sink.capabilities.batch
    assert limits is not None
    items = []
    for i in range(files):
        key = f"raw/d{i // PER_DIR:04d}/img{i:06d}.png"
        f = FilePayload(key.rsplit("/", 1)[-1], "", SIZE, "", url=f"s3://bkt/{key}", etag=f'"{i}"')
        items.append(
            ItemPayload("/" + key.rsplit("/", 1)[0], f.name, (SlotPayload("0", "image", (f,)),), {})
        )
    dataset = f"register-{time.time_ns()}"
    try:
        await sink.ensure_dataset(dataset)
        before = sink.v7.api.requests
        for at in range(0, files, limits.items):
            group = [BatchItem(dataset, it) for it in items[at : at + limits.items]]
            results = await sink.put_items(group)
            bad = [r for r in results if isinstance(r, Exception)]
            if bad:
                raise RuntimeError(f"register through the sink: {bad[0]}")
        return sink.v7.api.requests - before
    finally:
        await sink.close()


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
        run = ws.fresh("ingestd")
        cfg = run / "ingestd.yaml"
        dataset = f"register-{time.time_ns()}"
        watch = {
            "name": "w",
            "source": emu.url(bucket),
            "source_options": emu.source_options,
            "transfer": "register",
            "dataset": dataset,
            "settle": "0s",
        }
        backend = {
            "kind": "darwin",
            "team": TEAM,
            "api_key_env": KEY_ENV,
            "base_url": fake.url,
            "storage_slug": STORAGE,
            "requests_per_minute": UNTHROTTLED,
        }
        cfg.write_text(
            yaml.safe_dump(
                {"state_dir": str(run / "state"), "backend": backend, "watches": [watch]},
                sort_keys=False,
            )
        )
        before = len(fake.calls)
        _timed([*INGESTD, "sync", "-c", str(cfg)], run / "stderr.log", {**ENV, **emu.env}, "sync")
        check_held(fake, dataset, files, "ingestd register")
        return (
            len(fake.calls) - before
        ) / files, "register measured by `ingestd sync` of a moto S3 bucket"


# --- the benchmark -------------------------------------------------------------------------


def measure(files: int = 1000, runs: int = 3) -> dict[str, Any]:
    if not SDK_PYTHON.exists():
        raise SystemExit(f"no darwin-py venv at {SDK_PYTHON.parent.parent}: run `bash .ci/run`")
    os.environ[KEY_ENV] = API_KEY
    ENV[KEY_ENV] = API_KEY
    speed: dict[str, list[float]] = {"ingestd": [], "sdk": []}
    per_file: dict[str, list[float]] = {"ingestd": [], "sdk": []}
    with FakeDarwinThread() as fake, Workspace("darwin") as ws:
        for i in range(runs):
            src = ws.fresh("files")
            make_pngs(src, files)
            sides = ["ingestd", "sdk"] if i % 2 == 0 else ["sdk", "ingestd"]
            for side in sides:
                dataset = f"{side}-{i}"
                before = len(fake.calls)
                run = run_ingestd if side == "ingestd" else run_sdk
                dt = run(ws, src, fake, dataset)
                check_held(fake, dataset, files, side)
                speed[side].append(files / dt)
                per_file[side].append((len(fake.calls) - before) / files)
                print(
                    f"run {i + 1}/{runs} {side}: {files / dt:,.0f} files/s, "
                    f"{per_file[side][-1]:.3f} API requests/file",
                    file=sys.stderr,
                )
        register, how = measure_register(fake, files)
    ratio = median(speed["ingestd"]) / median(speed["sdk"])
    return {
        "platform": "darwin",
        "files": files,
        "ingestd_files_s": median(speed["ingestd"]),
        "sdk_files_s": median(speed["sdk"]),
        "ingestd_requests_per_file": median(per_file["ingestd"]),
        "sdk_requests_per_file": median(per_file["sdk"]),
        "register_requests_per_file": register,
        "notes": (
            f"{runs} runs; files/s spread ingestd {spread(speed['ingestd'])}, darwin-py "
            f"{spread(speed['sdk'])}; speed ratio {ratio:.2f}×; {how}; ingestd with "
            "requests_per_minute lifted, darwin-py with its defaults (6 upload threads here)"
        ),
    }


def main() -> None:
    runs = runs_arg(3)
    args = sys.argv[1:]
    files = int(args[args.index("--files") + 1]) if "--files" in args else 1000
    r = measure(files=files, runs=runs)
    print(f"### V7 Darwin: ingestd vs darwin-py `push` ({files:,} × 10 KB PNGs)\n")
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
                    "darwin-py 3.6.3 push",
                    f"{r['sdk_files_s']:,.1f}",
                    f"{r['sdk_requests_per_file']:.3f}",
                ],
                [
                    "ratio",
                    f"{r['ingestd_files_s'] / r['sdk_files_s']:.2f}×",
                    f"{r['ingestd_requests_per_file'] / r['sdk_requests_per_file']:.2f}×",
                ],
                ["ingestd, transfer: register", "", f"{r['register_requests_per_file']:.3f}"],
            ],
        )
    )
    print(f"\n{r['notes']}")


if __name__ == "__main__":
    main()
