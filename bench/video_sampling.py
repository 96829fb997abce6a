"""(e) Frame sampling: `sample_frames(..., fps=1)` against `ffmpeg -vf fps=1` on the same
60 s 1280x720 30 fps H.264 file, in the same run.

The file is made by the ffmpeg CLI (this OpenCV build cannot write H.264):
`ffmpeg -f lavfi -i testsrc2=size=1280x720:rate=30 -t 60 -c:v libx264 -g 250 in.mp4`
(libx264 defaults: B-frames, keyframes 250 frames apart — seeking would hurt here,
the sequential reader does not care). Needs `ffmpeg` on PATH (Debian: apt-get install
ffmpeg).

Each run writes into a fresh folder (docs/design.md: creating files right after deleting many
is slow for a while) and the two tools alternate which goes first, so neither always
gets the warmer cache. Wall time is the median over runs; CPU time (user + system, of
the child process for ffmpeg) shows how much of the 2 cores each one used.

    .venv/bin/python bench/video_sampling.py [--runs N]
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
from common import Workspace, machine_md, median, runs_arg, spread, table
from ingestd.media.video import probe_video, sample_frames

SECONDS, SIZE, RATE = 60, "1280x720", 30
GENERATE = (
    f"ffmpeg -f lavfi -i testsrc2=size={SIZE}:rate={RATE} -t {SECONDS} -c:v libx264 -g 250 in.mp4"
)
FFMPEG_SAMPLE = "ffmpeg -i in.mp4 -vf fps=1 out%05d.jpg"
# The same, at a JPEG quality like our default 90 (ffmpeg's default is far lower).
FFMPEG_SAMPLE_Q2 = "ffmpeg -i in.mp4 -vf fps=1 -q:v 2 out%05d.jpg"


def ffmpeg(cmdline: str, cwd: Path) -> None:
    # The documented command, run quietly and without touching stdin.
    argv = cmdline.split()
    argv[1:1] = ["-hide_banner", "-loglevel", "error", "-nostdin", "-y"]
    subprocess.run(argv, cwd=cwd, check=True)


def timed(fn: Callable[[], object], child: bool) -> tuple[float, float]:
    """Wall and CPU seconds of fn(); CPU of the finished children when `child`."""
    who = resource.RUSAGE_CHILDREN if child else resource.RUSAGE_SELF
    r0, t0 = resource.getrusage(who), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(who)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def out_stats(d: Path) -> tuple[int, int]:
    files = [p for p in d.iterdir() if p.suffix == ".jpg"]
    return len(files), sum(p.stat().st_size for p in files)


def main(runs: int | None = None) -> str:
    runs = runs or runs_arg(5)
    if shutil.which("ffmpeg") is None:
        sys.exit("video_sampling: needs the ffmpeg CLI on PATH (Debian: apt-get install ffmpeg)")
    with Workspace("video") as ws:
        src_dir = ws.fresh("src")
        t = time.perf_counter()
        ffmpeg(GENERATE, src_dir)
        src = src_dir / "in.mp4"
        info = probe_video(str(src))
        src_mb = src.stat().st_size / 1e6
        print(
            f"made {src_mb:.1f} MB, {info.width}x{info.height}, "
            f"{info.frame_count} frames at {info.fps:g} fps in {time.perf_counter() - t:.0f}s",
            file=sys.stderr,
        )

        contenders: dict[str, Callable[[Path], object]] = {
            "ingestd `sample_frames(fps=1)` (OpenCV grab/retrieve, JPEG q90)": lambda out: (
                sample_frames(str(src), str(out), 1.0, "jpeg", 90)
            ),
            f"`{FFMPEG_SAMPLE}`": lambda out: ffmpeg(
                FFMPEG_SAMPLE.replace("in.mp4", str(src)), out
            ),
            f"`{FFMPEG_SAMPLE_Q2}`": lambda out: ffmpeg(
                FFMPEG_SAMPLE_Q2.replace("in.mp4", str(src)), out
            ),
        }
        names = list(contenders)
        wall: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        outs: dict[str, tuple[int, int]] = {}
        for i in range(runs):
            order = names if i % 2 == 0 else names[::-1]
            for n in order:
                out = ws.fresh(f"out{i}")
                w, c = timed(lambda n=n, out=out: contenders[n](out), child=n.startswith("`"))
                wall[n].append(w)
                cpu[n].append(c)
                outs[n] = out_stats(out)
            print(
                f"run {i + 1}/{runs}: " + ", ".join(f"{wall[n][-1]:.2f}s" for n in names),
                file=sys.stderr,
            )
        last_ours = sample_frames(str(src), str(ws.fresh("check")), 1.0)
        ts_ok = all(abs(t - k) < 0.001 for k, t in enumerate(last_ours.timestamps))

    ours = names[0]
    ref = names[1]
    rows = []
    for n in names:
        frames, size = outs[n]
        rows.append(
            [
                n,
                f"{median(wall[n]):.2f}",
                spread(wall[n]),
                f"{median(cpu[n]):.2f}",
                f"{SECONDS / median(wall[n]):.1f}×",
                frames,
                f"{size / frames / 1024:.0f}",
                f"{median(wall[ref]) / median(wall[n]):.2f}×",
            ]
        )
    ratio = median(wall[ref]) / median(wall[ours])
    return "\n".join(
        [
            f"### (e) frame sampling: {SECONDS} s {SIZE} {RATE} fps H.264 at 1 fps",
            "",
            f"`.venv/bin/python bench/video_sampling.py --runs {runs}`; input made with `{GENERATE}`"
            f" ({src_mb:.1f} MB, {info.frame_count} frames); ffmpeg {ffmpeg_version()},"
            f" OpenCV {cv2.__version__}.",
            "",
            table(
                [
                    "what",
                    "wall s (median)",
                    "wall s (spread)",
                    "CPU s (median)",
                    "× real time",
                    "frames",
                    "KiB/frame",
                    "speed vs ffmpeg",
                ],
                rows,
            ),
            "",
            f"- ingestd runs at **{ratio:.2f}×** ffmpeg's speed (target ≥ 1.0×);"
            f" {runs} runs each, alternating order, fresh output folder per run.",
            f"- ingestd's timestamps are 0, 1, …, {len(last_ours.timestamps) - 1} s within 1 ms:"
            f" {'yes' if ts_ok else 'NO'}. ffmpeg's `fps` filter rounds to the nearest frame and"
            " may emit one frame more at the end.",
        ]
    )


def ffmpeg_version() -> str:
    out = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout
    return out.split()[2] if out else "?"


if __name__ == "__main__":
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    md = main()
    print(machine_md())
    print()
    print(md)
