"""What the platform benchmarks (bench/platform_<name>.py) share: the same PNG tree for
both sides, ingestd and the official SDK run the same way as whole processes, the runs
alternated and summed up the same way, and the same report. Each platform module keeps
only what is its own: the SDK's script, the fake, how requests are counted there, the
backend config, its extra figures and its notes. Not a benchmark itself."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from common import ENV, INGESTD, REPO, Workspace, machine_md, median, runs_arg, spread, table

# The fakes and emulators live in REPO/tests/support: a platform module imports them
# after this module, so the checkout's root must be on the path first.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

if TYPE_CHECKING:
    from typing import Protocol

    from ingestd.sinks.base import BatchPutter, Sink

    class BatchSink(Sink, BatchPutter, Protocol):
        """A sink whose batch put the register measurement drives."""


SIZE = 10 * 1024  # bytes a PNG: the measurement used 10 KB images
PER_DIR = 100  # files a folder
SIDES = ("ingestd", "sdk")
LOG = {"level": "info", "format": "json"}  # ingestd's log: JSON lines, into the run's log

SideRun = Callable[[str, Path, str], tuple[float, int]]
"""One side ("ingestd" or "sdk") sends the tree at `src` into `dataset`: the seconds it
took and the API requests the fake counted for it."""


# --- the files -----------------------------------------------------------------------------


def make_pngs(root: Path, files: int) -> int:
    """`files` PNGs of random pixels, each about SIZE bytes, in folders of PER_DIR;
    returns the bytes written. Real images, so both sides' type checks pass, and noise,
    so no side gains from compression."""
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


# --- running a side ------------------------------------------------------------------------


def timed(cmd: Sequence[str], log: Path, env: Mapping[str, str], who: str, timeout: float) -> float:
    """Seconds from `cmd`'s start to its exit, its output in `log`: whole processes, so
    start-up and shutdown count on both sides as a user would wait for them. A failed
    run raises with the log's tail, because its time would mean nothing."""
    with open(log, "wb") as err:
        t = time.perf_counter()
        proc = subprocess.run(
            list(cmd), stdout=err, stderr=err, env=dict(env), cwd=REPO, timeout=timeout, check=False
        )
        dt = time.perf_counter() - t
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-5:]
        raise RuntimeError(f"{who} exited {proc.returncode}: {tail}")
    return dt


def ingestd_sync(
    run: Path,
    backend: Mapping[str, Any],
    watches: Sequence[Mapping[str, Any]],
    *,
    timeout: float,
    env: Mapping[str, str] = ENV,
    who: str = "ingestd sync",
    log: Mapping[str, str] | None = LOG,
) -> float:
    """`ingestd sync` of a config written into the folder `run` (its state and log
    there too), timed: the one command a user would run to send a tree once."""
    cfg = run / "ingestd.yaml"
    data: dict[str, Any] = {"state_dir": str(run / "state")}
    if log is not None:
        data["log"] = dict(log)
    data["backend"] = dict(backend)
    data["watches"] = [dict(w) for w in watches]
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    return timed([*INGESTD, "sync", "-c", str(cfg)], run / "stderr.log", env, who, timeout)


@dataclass(frozen=True)
class Sides:
    """How one platform's two sides run. The SDK runs `script` in its own venv
    (.cache/sdk/<venv>, made by `bash .ci/run`) so its pinned dependencies never meet
    ingestd's; the script reads the key, dataset and tree from BENCH_* variables, so
    one script serves every run."""

    sdk: str  # the SDK's name in logs, errors and run folders: "darwin-py"
    venv: str  # its folder under .cache/sdk
    script: str
    key_env: str  # the variable ingestd's config names in `api_key_env`
    key: str
    timeout: float = 3600  # seconds a side may take before the run fails
    own_home: bool = False  # HOME in the run's folder, for an SDK that reads ~/.<sdk>

    @property
    def python(self) -> Path:
        return REPO / ".cache" / "sdk" / self.venv / "bin" / "python"

    def prepare(self) -> None:
        """Fail early without the SDK's venv, and put the key where ingestd looks for
        it: in this process (an in-process sink) and in the env of its syncs."""
        if not self.python.exists():
            raise SystemExit(
                f"no {self.sdk} venv at {self.python.parent.parent}: run `bash .ci/run`"
            )
        os.environ[self.key_env] = self.key
        ENV[self.key_env] = self.key

    def run(
        self,
        who: str,
        ws: Workspace,
        src: Path,
        dataset: str,
        backend: Mapping[str, Any],
        sdk_env: Mapping[str, str],
    ) -> float:
        """Side `who` sends `src` into `dataset`, timed: ingestd with `backend`, the SDK
        with `sdk_env` (its endpoint) besides the BENCH_* variables."""
        if who == "ingestd":
            watch = {"name": "w", "source": str(src), "dataset": dataset, "settle": "0s"}
            return ingestd_sync(ws.fresh("ingestd"), backend, [watch], timeout=self.timeout)
        run = ws.fresh(self.sdk)
        env = {
            **os.environ,
            **({"HOME": str(run)} if self.own_home else {}),
            **sdk_env,
            "BENCH_KEY": self.key,
            "BENCH_DATASET": dataset,
            "BENCH_ROOT": str(src),
        }
        cmd = [str(self.python), "-c", self.script]
        return timed(cmd, run / "stderr.log", env, self.sdk, self.timeout)


# --- the runs ------------------------------------------------------------------------------


@dataclass
class Samples:
    """Each side's files/s and API requests per file, one entry a run."""

    speed: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SIDES})
    per_file: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SIDES})

    def ratio(self) -> float:
        """ingestd's median files/s over the SDK's."""
        return median(self.speed["ingestd"]) / median(self.speed["sdk"])

    def headline(self, platform: str, files: int) -> dict[str, Any]:
        """The figures every platform reports, under the keys bench/platforms.py reads."""
        return {
            "platform": platform,
            "files": files,
            "ingestd_files_s": median(self.speed["ingestd"]),
            "sdk_files_s": median(self.speed["sdk"]),
            "ingestd_requests_per_file": median(self.per_file["ingestd"]),
            "sdk_requests_per_file": median(self.per_file["sdk"]),
        }

    def spreads(self, sdk: str, ratio_fmt: str) -> str:
        """The files/s spreads and the speed ratio, for the notes: medians of a few runs
        hide how far apart the runs were."""
        return (
            f"files/s spread ingestd {spread(self.speed['ingestd'])}, {sdk} "
            f"{spread(self.speed['sdk'])}; speed ratio {self.ratio():{ratio_fmt}}×"
        )


def alternate(
    ws: Workspace,
    files: int,
    runs: int,
    side: SideRun,
    *,
    writeback: bool = False,
    label: str = "",
    speed_fmt: str = ",.1f",
    per_file_fmt: str = ".3f",
) -> Samples:
    """`runs` runs, each on a new tree both sides send (into datasets `<side>-<run>`),
    the order alternating so neither side always runs on a warmer machine. With
    `writeback` the new tree is synced to disk first, so its writeback does not land
    inside a measurement. Each side's figures go to stderr as they come."""
    samples = Samples()
    for i in range(runs):
        src = ws.fresh("files")
        make_pngs(src, files)
        if writeback:
            os.sync()
        for who in SIDES if i % 2 == 0 else SIDES[::-1]:
            dt, requests = side(who, src, f"{who}-{i}")
            samples.speed[who].append(files / dt)
            samples.per_file[who].append(requests / files)
            print(
                f"{label}run {i + 1}/{runs} {who}: {files / dt:{speed_fmt}} files/s, "
                f"{samples.per_file[who][-1]:{per_file_fmt}} API requests/file",
                file=sys.stderr,
            )
    return samples


# --- transfer: register --------------------------------------------------------------------


async def put_remote_items(
    sink: BatchSink, files: int, requests: Callable[[], int], *, https: bool
) -> int:
    """The sink's batch put of `files` bucket objects as remote FilePayloads (no bytes),
    in groups of the sink's limit as the sync step forms them, into a new dataset; the
    API requests it made by `requests` (the sink's own counter), then the sink closed.
    Measures `transfer: register` where no S3 emulator runs. `https`: the objects
    carry the https URL the bucket source gives, for platforms that fetch only https."""
    from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
    from ingestd.sinks.base import BatchItem

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
            https_url=f"https://bkt.s3.amazonaws.com/{key}" if https else None,
        )
        items.append(
            ItemPayload("/" + key.rsplit("/", 1)[0], f.name, (SlotPayload("0", "image", (f,)),), {})
        )
    dataset = f"register-{time.time_ns()}"
    try:
        await sink.ensure_dataset(dataset)
        before = requests()
        for at in range(0, files, limits.items):
            group = [BatchItem(dataset, it) for it in items[at : at + limits.items]]
            bad = [r for r in await sink.put_items(group) if isinstance(r, Exception)]
            if bad:
                raise RuntimeError(f"register through the sink: {bad[0]}")
        return requests() - before
    finally:
        await sink.close()


def register_row(r: Mapping[str, Any]) -> list[str]:
    """The report's row of API requests per bucket object under `transfer: register`."""
    return ["ingestd, transfer: register", "", f"{r['register_requests_per_file']:.3f}"]


# --- the command line and the report -------------------------------------------------------


def arg(name: str, default: float) -> float:
    """A numeric option `name N` from the command line, else `default`."""
    args = sys.argv[1:]
    return float(args[args.index(name) + 1]) if name in args else default


def runs_and_files() -> tuple[int, int]:
    """`--runs N` (3) and `--files N` (1,000), the options bench/platforms.py passes on
    to every platform's `measure`."""
    return runs_arg(3), int(arg("--files", 1000))


def print_report(
    title: str,
    r: Mapping[str, Any],
    sdk_row: str,
    *,
    per_file_fmt: str = ".3f",
    speed_ratio_fmt: str = ".2f",
    requests_ratio_fmt: str = ".2f",
    extra_rows: Iterable[Sequence[str]] = (),
    command: str | None = None,
    notes_as_list: bool = False,
) -> None:
    """The markdown for bench/RESULTS.md: the title, the command (when given), the
    machine, ingestd beside the SDK with their ratios, then the notes (as a list, one
    item a sentence, with `notes_as_list`)."""
    print(f"### {title}\n")
    if command is not None:
        print(f"`{command}`\n")
    print(machine_md())
    print()
    rows = [
        [
            "ingestd",
            f"{r['ingestd_files_s']:,.1f}",
            f"{r['ingestd_requests_per_file']:{per_file_fmt}}",
        ],
        [sdk_row, f"{r['sdk_files_s']:,.1f}", f"{r['sdk_requests_per_file']:{per_file_fmt}}"],
        [
            "ratio",
            f"{r['ingestd_files_s'] / r['sdk_files_s']:{speed_ratio_fmt}}×",
            f"{r['ingestd_requests_per_file'] / r['sdk_requests_per_file']:{requests_ratio_fmt}}×",
        ],
        *extra_rows,
    ]
    print(table(["", "files/s", "API requests/file"], rows))
    if notes_as_list:
        print()
        for note in r["notes"].split(". "):
            print(f"- {note}")
    else:
        print(f"\n{r['notes']}")
