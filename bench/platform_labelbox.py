"""Labelbox: ingestd's labelbox sink beside labelbox-python's `upsert_data_rows` on the
same fake Labelbox API (tests/support/fakes/labelbox.py), the same files, in the same
run (issue 13, points 4 and 7).

    .venv/bin/python bench/platform_labelbox.py [--runs N] [--files N] [--task-seconds S]

- Files: N random 10 KB PNGs (noise, so incompressible) in folders of 100, made anew
  each run; both sides send the same files, each into a dataset of its own.
- ingestd: `python -m ingestd.cli sync -c CONFIG` (labelbox backend, every setting at
  its default), timed from process start to exit.
- labelbox-python 7.17.0 in its own venv (.cache/sdk/labelbox, made by `bash .ci/run`):
  `Client(api_key, endpoint=...)`, `create_dataset`, `upsert_data_rows` of the local
  paths with the rows ingestd makes (global key, external id, media type), then
  `wait_till_done()` on the task, as its documentation shows; timed from process start
  to exit. The SDK uploads the files with 20 threads and sleeps 2 s between task polls.
- The fake runs as its own process, fresh for each side; its import tasks end at once
  (the fake's default, as in the issue's measurement) and, in a second round, after
  half a second (`--task-seconds S` measures one setting), the same for both sides.
  API requests per file are counted at the fake, file uploads included. Both sides
  must leave every file on the fake, byte for byte, or the run fails.

Order alternates per run; medians of --runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from common import ENV, INGESTD, REPO, Workspace, machine_md, median, runs_arg, spread, table

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.fakes.labelbox import FakeProcess

KEY_ENV = "INGESTD_BENCH_LABELBOX_KEY"
KEY = "labelbox-bench-key-3f9d"
SDK_PYTHON = REPO / ".cache" / "sdk" / "labelbox" / "bin" / "python"
SIZE = 10 * 1024
PER_DIR = 100
# How long the fake's import tasks run: at once (the fake's default; the SDK still
# sleeps its 2 s), and half a second, both sides alike.
TASK_SECONDS = (0.0, 0.5)

SDK_SCRIPT = r"""
import os
from pathlib import Path
import labelbox as lb

root = Path(os.environ["BENCH_ROOT"])
url = os.environ["BENCH_URL"]
dataset_name = os.environ["BENCH_DATASET"]
client = lb.Client(api_key=os.environ["BENCH_KEY"], endpoint=url + "/graphql",
                   rest_endpoint=url + "/api/v1")
dataset = client.create_dataset(name=dataset_name)
rows = []
for p in sorted(root.rglob("*.png")):
    key = "/" + p.relative_to(root).as_posix()
    rows.append({"row_data": str(p), "global_key": f"ingestd:{dataset_name}:{key}",
                 "external_id": key, "media_type": "IMAGE"})
task = dataset.upsert_data_rows(rows)
task.wait_till_done()
if task.status != "COMPLETE":
    raise SystemExit(f"task ended {task.status}")
"""


def make_pngs(root: Path, files: int) -> None:
    """`files` PNGs of random pixels, each about SIZE bytes."""
    from PIL import Image

    side = int((SIZE / 3) ** 0.5)  # RGB noise does not compress: ~3 bytes a pixel
    for i in range(files):
        d = root / f"d{i // PER_DIR:04d}"
        if i % PER_DIR == 0:
            d.mkdir(parents=True, exist_ok=True)
        Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(
            d / f"img{i:06d}.png"
        )


def check_held(fake: FakeProcess, src: Path, dataset: str, who: str) -> int:
    """Every file as one row under its key, with its bytes; returns the requests the
    fake has answered so far."""
    import hashlib

    state = fake.state()
    want = {
        f"ingestd:{dataset}:/" + p.relative_to(src).as_posix(): hashlib.sha256(
            p.read_bytes()
        ).hexdigest()
        for p in src.rglob("*.png")
    }
    rows = state["datasets"].get(dataset, {})
    files = state["files"]
    got = {}
    for gk, row in rows.items():
        fid = row["row_data"].split("/files/", 1)[-1].split("/", 1)[0]
        got[gk] = files.get(fid, {}).get("sha256")
    if got != want or state["dataset_count"].get(dataset) != 1:
        raise RuntimeError(f"{who}: the fake holds {len(got)} of {len(want)} files as sent")
    return len(state["requests"])


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


def run_ingestd(ws: Workspace, src: Path, fake: FakeProcess, dataset: str) -> float:
    run = ws.fresh("ingestd")
    cfg = run / "ingestd.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(run / "state"),
                "log": {"level": "info", "format": "json"},
                "backend": {"kind": "labelbox", "api_key_env": KEY_ENV, "base_url": fake.url},
                "watches": [{"name": "w", "source": str(src), "dataset": dataset, "settle": "0s"}],
            },
            sort_keys=False,
        )
    )
    return _timed([*INGESTD, "sync", "-c", str(cfg)], run / "stderr.log", ENV, "ingestd sync")


def run_sdk(ws: Workspace, src: Path, fake: FakeProcess, dataset: str) -> float:
    run = ws.fresh("labelbox-python")
    env = {
        **os.environ,
        "BENCH_KEY": KEY,
        "BENCH_URL": fake.url,
        "BENCH_DATASET": dataset,
        "BENCH_ROOT": str(src),
    }
    return _timed([str(SDK_PYTHON), "-c", SDK_SCRIPT], run / "stderr.log", env, "labelbox-python")


def _measure(
    ws: Workspace, files: int, runs: int, task_seconds: float
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    speed: dict[str, list[float]] = {"ingestd": [], "sdk": []}
    per_file: dict[str, list[float]] = {"ingestd": [], "sdk": []}
    for i in range(runs):
        src = ws.fresh("files")
        make_pngs(src, files)
        os.sync()  # the tree's writeback must not land inside a measurement
        sides = ["ingestd", "sdk"] if i % 2 == 0 else ["sdk", "ingestd"]
        for side in sides:
            fake = FakeProcess(KEY, cwd=str(REPO), task_seconds=task_seconds)
            try:
                dataset = f"{side}-{i}"
                run = run_ingestd if side == "ingestd" else run_sdk
                dt = run(ws, src, fake, dataset)
                requests = check_held(fake, src, dataset, side)
            finally:
                fake.stop()
            speed[side].append(files / dt)
            per_file[side].append(requests / files)
            print(
                f"tasks of {task_seconds:g} s, run {i + 1}/{runs} {side}: "
                f"{files / dt:,.1f} files/s, {per_file[side][-1]:.4f} API requests/file",
                file=sys.stderr,
            )
    return speed, per_file


def measure(
    files: int = 1000, runs: int = 3, task_seconds: Sequence[float] = TASK_SECONDS
) -> dict[str, Any]:
    """Headline figures for tasks that end at once (the fake's default, as the issue
    measured); the notes give them again for each longer task time."""
    if not SDK_PYTHON.exists():
        raise SystemExit(f"no labelbox venv at {SDK_PYTHON.parent.parent}: run `bash .ci/run`")
    os.environ[KEY_ENV] = KEY
    ENV[KEY_ENV] = KEY
    results = []
    with Workspace("labelbox") as ws:
        for seconds in task_seconds:
            speed, per_file = _measure(ws, files, runs, seconds)
            results.append((seconds, speed, per_file))
    notes = [f"{runs} runs, medians; both sides with their defaults, a fresh fake per side"]
    for seconds, speed, per_file in results:
        ratio = median(speed["ingestd"]) / median(speed["sdk"])
        notes.append(
            f"tasks of {seconds:g} s: ingestd {median(speed['ingestd']):,.1f} files/s "
            f"({spread(speed['ingestd'])}) at {median(per_file['ingestd']):.4f} requests/file, "
            f"labelbox-python {median(speed['sdk']):,.1f} files/s ({spread(speed['sdk'])}) at "
            f"{median(per_file['sdk']):.4f}, speed {ratio:.2f}×"
        )
    notes.append(
        "file uploads count as requests on both sides; the SDK sleeps 2 s between task "
        "polls, ingestd looks after 50 ms, then from 0.5 ms a row on"
    )
    _, speed, per_file = results[0]
    return {
        "platform": "labelbox",
        "files": files,
        "ingestd_files_s": median(speed["ingestd"]),
        "sdk_files_s": median(speed["sdk"]),
        "ingestd_requests_per_file": median(per_file["ingestd"]),
        "sdk_requests_per_file": median(per_file["sdk"]),
        "notes": ". ".join(notes),
    }


def _arg(name: str, default: float) -> float:
    args = sys.argv[1:]
    return float(args[args.index(name) + 1]) if name in args else default


def main() -> None:
    runs = runs_arg(3)
    files = int(_arg("--files", 1000))
    seconds = (_arg("--task-seconds", -1.0),) if "--task-seconds" in sys.argv else TASK_SECONDS
    r = measure(files=files, runs=runs, task_seconds=seconds)
    print(f"### Labelbox: ingestd vs labelbox-python `upsert_data_rows` ({files:,} × 10 KB PNGs)\n")
    print(f"`.venv/bin/python bench/platform_labelbox.py --runs {runs} --files {files}`\n")
    print(machine_md())
    print()
    print(
        table(
            ["", "files/s", "API requests/file"],
            [
                [
                    "ingestd",
                    f"{r['ingestd_files_s']:,.1f}",
                    f"{r['ingestd_requests_per_file']:.4f}",
                ],
                [
                    "labelbox-python 7.17.0 upsert_data_rows",
                    f"{r['sdk_files_s']:,.1f}",
                    f"{r['sdk_requests_per_file']:.4f}",
                ],
                [
                    "ratio",
                    f"{r['ingestd_files_s'] / r['sdk_files_s']:.2f}×",
                    f"{r['ingestd_requests_per_file'] / r['sdk_requests_per_file']:.3f}×",
                ],
            ],
        )
    )
    print()
    for note in r["notes"].split(". "):
        print(f"- {note}")


if __name__ == "__main__":
    main()
