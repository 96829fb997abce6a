"""Video probing and frame sampling on real videos written by the tests themselves.

Constant-rate files come from cv2.VideoWriter (mp4v in .mp4 or MJPG in .avi, whichever
this OpenCV build writes; MJPG .avi when a test needs a file that still opens after
truncation). Variable-rate files come from PyAV with explicit, irregular presentation
timestamps: OpenCV's writer can only write a constant rate.

Every frame carries its own index drawn as ten black/white blocks, so a test can tell
from the written image which source frame was kept, not only how many.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ingestd.core.errors import Abandoned, MediaError, SourceChangedError
from ingestd.media.video import (
    TIME_TOLERANCE,
    FrameSelector,
    SamplingAbandoned,
    probe_video,
    sample_frames,
    sampling_rate,
    select_by_time,
)

# --- generation helpers -------------------------------------------------------------------

W, H = 160, 120
BITS = 10  # frame indexes up to 1023
BLOCK = W // BITS


def index_frame(i: int) -> np.ndarray:
    """A BGR frame whose top band spells `i` in binary (block b white = bit b set), with
    a gradient below so consecutive frames differ everywhere, as real video does."""
    img = np.zeros((H, W, 3), np.uint8)
    for b in range(BITS):
        if i >> b & 1:
            img[:48, b * BLOCK : (b + 1) * BLOCK] = 255
    img[48:] = (np.arange(W, dtype=np.uint16)[None, :, None] * 2 + i * 5) % 256
    return img


def read_index(img: np.ndarray) -> int:
    """The index `index_frame` drew, read back from block centres (survives JPEG)."""
    assert img.shape[:2] == (H, W), img.shape
    gray = img if img.ndim == 2 else img.mean(axis=2)
    return sum(1 << b for b in range(BITS) if gray[24, b * BLOCK + BLOCK // 2] > 128)


# (fourcc, extension) this build can write, best first; found once per session.
_CFR_FORMATS = [("mp4v", ".mp4"), ("MJPG", ".avi"), ("XVID", ".avi")]


def _writer(path: Path, fourcc: str, fps: float) -> cv2.VideoWriter:
    return cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (W, H))


@pytest.fixture(scope="session")
def cfr_format(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("formats")
    for fourcc, ext in _CFR_FORMATS:
        w = _writer(d / f"probe{ext}", fourcc, 30)
        if w.isOpened():
            w.release()
            return fourcc, ext
        w.release()
    pytest.fail(f"this OpenCV build writes none of {_CFR_FORMATS}")


def write_cfr(path: Path, fps: float, frames: int, fourcc: str) -> Path:
    w = _writer(path, fourcc, fps)
    assert w.isOpened(), f"cannot write {fourcc} to {path}"
    for i in range(frames):
        w.write(index_frame(i))
    w.release()
    return path


def write_vfr(path: Path, pts: Sequence[float]) -> Path:
    """A real variable-frame-rate H.264 file: frame i is presented at pts[i] seconds
    (millisecond time base), whatever the gaps between them. Needs PyAV (the `test`
    extra): a missing module fails the test rather than skipping it silently."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        # Near-lossless, so the index blocks read back exactly.
        stream.codec_context.options = {"crf": "10"}
        for i, t in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(index_frame(i), format="bgr24")
            frame.pts = round(t * 1000)
            frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def clip_30fps(tmp_path_factory: pytest.TempPathFactory, cfr_format: tuple[str, str]) -> Path:
    """10 s at 30 fps."""
    fourcc, ext = cfr_format
    return write_cfr(tmp_path_factory.mktemp("v") / f"clip30{ext}", 30, 300, fourcc)


@pytest.fixture(scope="module")
def clip_mjpg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 s at 30 fps of MJPG in AVI: a container FFmpeg still reads when cut short."""
    return write_cfr(tmp_path_factory.mktemp("v") / "clip30.avi", 30, 300, "MJPG")


def decoded_indexes(files: Sequence[str]) -> list[int]:
    out = []
    for f in files:
        img = cv2.imread(f)
        assert img is not None, f"{f} does not decode"
        out.append(read_index(img))
    return out


def frame_files(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d)) if d.exists() else []


# --- sampling real files ------------------------------------------------------------------


def test_30fps_sampled_at_2fps_gives_20_frames_on_the_half_seconds(
    clip_30fps: Path, tmp_path: Path
) -> None:
    out = tmp_path / "frames"
    r = sample_frames(str(clip_30fps), str(out), 2)
    assert len(r.files) == 20
    assert r.timestamps == pytest.approx([k * 0.5 for k in range(20)], abs=0.001)
    assert r.source_fps == pytest.approx(30)
    assert r.files == [str(out / f"frame_{k:06d}.jpg") for k in range(20)]
    assert all(os.path.isabs(f) for f in r.files)
    # the frames shown at 0.0, 0.5, ... s are source frames 0, 15, 30, ...
    assert decoded_indexes(r.files) == [15 * k for k in range(20)]
    assert frame_files(out) == [f"frame_{k:06d}.jpg" for k in range(20)]  # no .part left


def test_2997_source_sampled_at_2997_keeps_every_frame(
    tmp_path: Path, cfr_format: tuple[str, str]
) -> None:
    fourcc, ext = cfr_format
    src = write_cfr(tmp_path / f"ntsc{ext}", 29.97, 150, fourcc)
    info = probe_video(str(src))
    assert info.frame_count == 150
    r = sample_frames(str(src), str(tmp_path / "f"), 29.97)
    assert len(r.files) == info.frame_count
    assert decoded_indexes(r.files) == list(range(150))
    # the writer stores 29.97 as 30000/1001: the timestamps are the source's, not k/29.97
    assert r.timestamps == pytest.approx([i * 1001 / 30000 for i in range(150)], abs=0.001)


@pytest.mark.parametrize("fps", [30, 30.5, 60, 1000])
def test_a_rate_at_or_above_the_source_keeps_every_frame_once(
    clip_30fps: Path, tmp_path: Path, fps: float
) -> None:
    r = sample_frames(str(clip_30fps), str(tmp_path / "f"), fps)
    assert decoded_indexes(r.files) == list(range(300))
    assert r.timestamps == pytest.approx([i / 30 for i in range(300)], abs=0.001)


def test_fractional_rate_half_a_frame_per_second(clip_30fps: Path, tmp_path: Path) -> None:
    r = sample_frames(str(clip_30fps), str(tmp_path / "f"), 0.5)
    assert r.timestamps == pytest.approx([0, 2, 4, 6, 8], abs=0.001)
    assert decoded_indexes(r.files) == [0, 60, 120, 180, 240]


# presentation times of a variable-rate clip: a burst, a long gap, a slow stretch, a
# burst again, and timestamps that do not sit on any regular grid.
VFR_PTS = [
    0.0, 0.04, 0.05, 0.3, 0.31, 0.333, 1.0, 1.7, 1.72, 2.5, 2.6, 2.61, 2.62, 2.63,
    4.9, 5.0, 5.5, 6.001, 6.2, 7.77,
]  # fmt: skip


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
@pytest.mark.parametrize(
    ("fps", "expected"),
    [
        # t=0 → 0.0; 1 → 1.0; 2 → 2.5 (serves 2.0 and 2.5); 3,4 → 4.9 (once);
        # 5 → 5.0; 6 → 6.001; 7 → 7.77
        (1, [0.0, 1.0, 2.5, 4.9, 5.0, 6.001, 7.77]),
        # every 0.25 s: the bursts are thinned (0.04, 0.05, 0.31, 0.333, 2.6 … 2.63
        # skipped), 0.3 serves 0.25, 1.0 serves 0.5-1.0, 4.9 serves 2.75-4.75, ...
        (4, [0.0, 0.3, 1.0, 1.7, 2.5, 4.9, 5.0, 5.5, 6.001, 7.77]),
        (1000, VFR_PTS),  # faster than any gap: every frame once
    ],
)
def test_variable_frame_rate_is_sampled_by_time(
    tmp_path: Path, ext: str, fps: float, expected: list[float]
) -> None:
    src = write_vfr(tmp_path / f"vfr{ext}", VFR_PTS)
    r = sample_frames(str(src), str(tmp_path / "f"), fps)
    assert r.timestamps == pytest.approx(expected, abs=0.001)
    assert decoded_indexes(r.files) == [VFR_PTS.index(t) for t in expected]
    # the same answer as the pure rule on the true timestamps
    assert [VFR_PTS[i] for i in select_by_time(VFR_PTS, fps)] == expected


# --- failures -----------------------------------------------------------------------------


def test_random_bytes_named_mp4_fail_naming_the_file(tmp_path: Path) -> None:
    src = tmp_path / "junk.mp4"
    src.write_bytes(np.random.default_rng(1).integers(0, 256, 200_000, np.uint8).tobytes())
    out = tmp_path / "f"
    with pytest.raises(MediaError, match=r"junk\.mp4.*cannot be opened as a video"):
        sample_frames(str(src), str(out), 1)
    assert not out.exists()
    with pytest.raises(MediaError, match=r"junk\.mp4"):
        probe_video(str(src))


def test_truncated_avi_fails_saying_where_and_leaves_nothing(
    clip_mjpg: Path, tmp_path: Path
) -> None:
    src = tmp_path / "cut.avi"
    data = clip_mjpg.read_bytes()
    src.write_bytes(data[: len(data) * 2 // 5])
    out = tmp_path / "f"
    with pytest.raises(MediaError) as e:
        sample_frames(str(src), str(out), 2)
    reason = e.value.reason
    assert str(src) in reason
    assert "decoding failed after frame" in reason and "of ~300" in reason
    assert "truncated" in reason
    assert not out.exists()  # created by the call, removed with what it held


def test_truncated_mp4_fails_naming_the_file(clip_30fps: Path, tmp_path: Path) -> None:
    src = tmp_path / f"cut{clip_30fps.suffix}"
    data = clip_30fps.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match=re.escape(src.name)):
        sample_frames(str(src), str(tmp_path / "f"), 2)


def test_failure_keeps_a_pre_existing_out_dir_and_its_other_files(
    clip_mjpg: Path, tmp_path: Path
) -> None:
    src = tmp_path / "cut.avi"
    src.write_bytes(clip_mjpg.read_bytes()[:100_000])
    out = tmp_path / "f"
    out.mkdir()
    (out / "notes.txt").write_text("not ours")
    with pytest.raises(MediaError):
        sample_frames(str(src), str(out), 30)
    assert frame_files(out) == ["notes.txt"]


def test_a_video_with_no_frames_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "empty.avi"
    cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"MJPG"), 30, (W, H)).release()
    with pytest.raises(MediaError, match=r"empty\.avi.*no frame"):
        sample_frames(str(src), str(tmp_path / "f"), 1)


def test_a_missing_file_is_a_moving_source_not_a_bad_video(tmp_path: Path) -> None:
    with pytest.raises(SourceChangedError, match=r"gone\.mp4"):
        sample_frames(str(tmp_path / "gone.mp4"), str(tmp_path / "f"), 1)
    with pytest.raises(SourceChangedError):
        probe_video(str(tmp_path / "gone.mp4"))


@pytest.mark.parametrize(
    "kwargs",
    [{"fps": 0}, {"fps": -1}, {"fps": float("nan")}, {"fmt": "gif"}, {"quality": 0}],
)
def test_bad_arguments_are_programming_errors(
    clip_30fps: Path, tmp_path: Path, kwargs: dict[str, object]
) -> None:
    args: dict[str, object] = {"fps": 1, **kwargs}
    with pytest.raises(ValueError):
        sample_frames(str(clip_30fps), str(tmp_path / "f"), **args)  # type: ignore[arg-type]
    assert not (tmp_path / "f").exists()


# --- output -------------------------------------------------------------------------------


def test_png_is_lossless_and_jpeg_quality_sets_size(clip_30fps: Path, tmp_path: Path) -> None:
    png = sample_frames(str(clip_30fps), str(tmp_path / "png"), 1, fmt="png")
    assert [os.path.basename(f) for f in png.files] == [f"frame_{k:06d}.png" for k in range(10)]
    cap = cv2.VideoCapture(str(clip_30fps))
    ok, first = cap.read()
    cap.release()
    assert ok
    assert np.array_equal(cv2.imread(png.files[0]), first)  # exactly the decoded frame

    low = sample_frames(str(clip_30fps), str(tmp_path / "q30"), 1, quality=30)
    high = sample_frames(str(clip_30fps), str(tmp_path / "q95"), 1, quality=95)
    size = lambda r: sum(os.path.getsize(f) for f in r.files)  # noqa: E731
    assert size(low) < size(high) < size(png)
    assert decoded_indexes(low.files) == decoded_indexes(high.files) == [30 * k for k in range(10)]


def test_stale_frames_from_an_interrupted_run_are_replaced(
    clip_30fps: Path, tmp_path: Path
) -> None:
    out = tmp_path / "f"
    out.mkdir()
    for name in ("frame_000099.jpg", ".frame_000100.jpg.part", "frame_000003.png"):
        (out / name).write_bytes(b"stale")
    (out / "keep.me").write_text("x")
    r = sample_frames(str(clip_30fps), str(out), 0.5)
    assert frame_files(out) == sorted([*(os.path.basename(f) for f in r.files), "keep.me"])


# --- probe --------------------------------------------------------------------------------


def test_probe_reports_size_rate_count_and_duration(clip_30fps: Path) -> None:
    info = probe_video(str(clip_30fps))
    assert (info.width, info.height, info.frame_count) == (W, H, 300)
    assert info.fps == pytest.approx(30)
    assert info.duration == pytest.approx(10)


# --- stop ---------------------------------------------------------------------------------


class StopAfter(threading.Event):
    """An Event that reports set from its n-th check on: a stop arriving mid-video."""

    def __init__(self, checks: int) -> None:
        super().__init__()
        self.left = checks

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0 or super().is_set()


def test_stop_abandons_between_frames_and_removes_partial_output(
    clip_30fps: Path, tmp_path: Path
) -> None:
    out = tmp_path / "f"
    stop = StopAfter(100)  # 100 frames read: 4 frames already written at 1 fps
    with pytest.raises(SamplingAbandoned) as e:
        sample_frames(str(clip_30fps), str(out), 1, stop=stop)
    assert not isinstance(e.value, MediaError)  # not the file's fault: no permanent failure
    assert isinstance(e.value, Abandoned)  # what the sync step leaves pending
    assert str(clip_30fps) in str(e.value)
    assert stop.left == -1  # it stopped at the first check that said so
    assert not out.exists()


def test_a_stop_already_set_reads_nothing(clip_30fps: Path, tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(SamplingAbandoned):
        sample_frames(str(clip_30fps), str(tmp_path / "f"), 1, stop=stop)
    assert not (tmp_path / "f").exists()


# --- the selection rule (pure) ------------------------------------------------------------


def reference(ts: Sequence[float], fps: float, tol: float = TIME_TOLERANCE) -> list[int]:
    """The rule as written, by brute force: for every sampling time k/fps up to the last
    frame, the first frame at or after it (within tol); each frame once."""
    picked: list[int] = []
    k = first = 0
    while ts and k / fps - tol <= ts[-1]:
        while ts[first] < k / fps - tol:  # times only grow, so the search never goes back
            first += 1
        if not picked or picked[-1] != first:
            picked.append(first)
        k += 1
    return picked


@pytest.mark.parametrize(
    ("ts", "fps", "expected"),
    [
        ([], 1, []),
        ([0.0], 1, [0]),
        ([0.5], 1, [0]),  # a stream starting late: its first frame serves t=0
        ([0, 0.998, 1.0, 1.001], 1, [0, 2]),
        ([0, 0.9995], 1, [0, 1]),  # within the 1 ms tolerance of t=1
        ([0, 0.998], 1, [0]),  # outside it, and there is no frame at or after 1 s
        ([0, 5.0, 5.1, 6.0], 1, [0, 1, 3]),  # a 5 s gap gives one frame, not five
        ([0, 0.1, 0.2, 0.3], 1000, [0, 1, 2, 3]),
        ([-0.04, 0.0, 0.5], 2, [1, 2]),  # pre-roll before 0 is never a sample
        ([i / 30 for i in range(61)], 2, [0, 15, 30, 45, 60]),
        ([i / 30 + (0.0004 if i % 2 else -0.0004) for i in range(61)], 2, [0, 15, 30, 45, 60]),
        ([i / 25 for i in range(26)], 30, list(range(26))),
    ],
)
def test_select_by_time_cases(ts: list[float], fps: float, expected: list[int]) -> None:
    assert list(select_by_time(ts, fps)) == expected
    assert reference(ts, fps) == expected


@settings(deadline=None)  # a loaded CI machine must not turn slowness into failure
@given(
    gaps=st.lists(st.floats(min_value=0.0001, max_value=2.0), max_size=100),
    start=st.floats(min_value=0.0, max_value=2.0),
    fps=st.one_of(
        st.sampled_from([0.1, 0.5, 1, 2, 10, 23.976, 29.97, 30, 59.94, 1000]),
        st.floats(min_value=0.01, max_value=120),
    ),
)
def test_select_by_time_matches_the_rule_on_irregular_timestamps(
    gaps: list[float], start: float, fps: float
) -> None:
    ts = list(np.cumsum([start, *gaps]))
    picked = list(select_by_time(ts, fps))
    assert picked == reference(ts, fps)
    assert picked == sorted(set(picked))  # in order, never twice
    assert not ts or picked[0] == 0
    # every sampling time up to the last frame is served by a kept frame at or after it
    kept = [ts[i] for i in picked]
    k = 0
    while k / fps - TIME_TOLERANCE <= ts[-1]:
        assert any(t >= k / fps - TIME_TOLERANCE for t in kept)
        k += max(1, int(fps))  # a sample of the sampling times is enough here


def test_selector_reports_the_next_due_time() -> None:
    s = FrameSelector(2)
    assert s.due() == 0
    assert s.take(0.0)
    assert s.due() == 0.5
    assert not s.take(0.3)
    assert s.take(1.7)  # serves 0.5 … 1.5
    assert s.due() == 2.0


def test_the_nominal_rate_typed_by_a_person_means_that_rate_exactly() -> None:
    ntsc = 30000 / 1001
    assert sampling_rate(29.97, ntsc) == ntsc
    assert sampling_rate(30, ntsc) == 30  # a different rate: sample at it
    assert sampling_rate(2, ntsc) == 2
    assert sampling_rate(29.97, 0.0) == 29.97  # no nominal rate known
    # two hours of NTSC: 29.97 taken literally drifts 1 ppm and starts dropping frames
    # after ~17 minutes; snapped to the source's rate it keeps all 215,784
    ts = [i * 1001 / 30000 for i in range(int(7200 * ntsc))]
    assert sum(1 for _ in select_by_time(ts, sampling_rate(29.97, ntsc))) == len(ts)
    assert sum(1 for _ in select_by_time(ts, 29.97)) < len(ts)
