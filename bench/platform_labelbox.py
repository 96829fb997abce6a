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

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import REPO, Workspace, median, spread
from platform_common import Samples, Sides, alternate, arg, print_report, runs_and_files

from tests.support.fakes.labelbox import FakeProcess

KEY_ENV = "INGESTD_BENCH_LABELBOX_KEY"
KEY = "labelbox-bench-key-3f9d"
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

SIDES = Sides("labelbox-python", "labelbox", SDK_SCRIPT, KEY_ENV, KEY)


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


def _measure(ws: Workspace, files: int, runs: int, task_seconds: float) -> Samples:
    def side(who: str, src: Path, dataset: str) -> tuple[float, int]:
        """A fresh fake for each side: its request count is that side's alone."""
        fake = FakeProcess(KEY, cwd=str(REPO), task_seconds=task_seconds)
        try:
            backend = {"kind": "labelbox", "api_key_env": KEY_ENV, "base_url": fake.url}
            dt = SIDES.run(who, ws, src, dataset, backend, {"BENCH_URL": fake.url})
            return dt, check_held(fake, src, dataset, who)
        finally:
            fake.stop()

    return alternate(
        ws,
        files,
        runs,
        side,
        writeback=True,
        label=f"tasks of {task_seconds:g} s, ",
        per_file_fmt=".4f",
    )


def measure(
    files: int = 1000, runs: int = 3, task_seconds: Sequence[float] = TASK_SECONDS
) -> dict[str, Any]:
    """Headline figures for tasks that end at once (the fake's default, as the issue
    measured); the notes give them again for each longer task time."""
    SIDES.prepare()
    with Workspace("labelbox") as ws:
        results = [(seconds, _measure(ws, files, runs, seconds)) for seconds in task_seconds]
    notes = [f"{runs} runs, medians; both sides with their defaults, a fresh fake per side"]
    for seconds, s in results:
        speed, per_file = s.speed, s.per_file
        notes.append(
            f"tasks of {seconds:g} s: ingestd {median(speed['ingestd']):,.1f} files/s "
            f"({spread(speed['ingestd'])}) at {median(per_file['ingestd']):.4f} requests/file, "
            f"labelbox-python {median(speed['sdk']):,.1f} files/s ({spread(speed['sdk'])}) at "
            f"{median(per_file['sdk']):.4f}, speed {s.ratio():.2f}×"
        )
    notes.append(
        "file uploads count as requests on both sides; the SDK sleeps 2 s between task "
        "polls, ingestd looks after 50 ms, then from 0.5 ms a row on"
    )
    return {**results[0][1].headline("labelbox", files), "notes": ". ".join(notes)}


def main() -> None:
    runs, files = runs_and_files()
    seconds = (arg("--task-seconds", -1.0),) if "--task-seconds" in sys.argv else TASK_SECONDS
    r = measure(files=files, runs=runs, task_seconds=seconds)
    print_report(
        f"Labelbox: ingestd vs labelbox-python `upsert_data_rows` ({files:,} × 10 KB PNGs)",
        r,
        "labelbox-python 7.17.0 upsert_data_rows",
        per_file_fmt=".4f",
        requests_ratio_fmt=".3f",
        command=f".venv/bin/python bench/platform_labelbox.py --runs {runs} --files {files}",
        notes_as_list=True,
    )


if __name__ == "__main__":
    main()
