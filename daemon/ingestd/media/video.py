"""Video files: probe them and sample frames from them by presentation time.

Everything here is synchronous and blocking (decoding is CPU work); the sync step runs
it in a thread or process pool so the event loop never waits on it.

Why the sampler reads the way it does (docs/design.md, "Measured on this kind of machine"):
it reads the file once, front to back, with `cv2.VideoCapture.grab()`, and converts to
pixels (`retrieve()`) only the frames it keeps. That is 1.25x faster than
`ffmpeg -vf fps=1` on 720p30 H.264; seeking to each sampling time instead is 2.7x
slower than ffmpeg when keyframes are far apart, because every seek decodes again from
the previous keyframe. So: no seeking, ever.

Frame selection (`select_by_time`): for each sampling time t_k = k / fps the sampler
keeps the first frame whose presentation timestamp is >= t_k - 1 ms, and never the same
frame twice. It goes by timestamps, not frame indexes, so a variable-frame-rate file is
sampled evenly in time, and a rate at or above the source's keeps every frame.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from ingestd.core.errors import (
    Abandoned,
    MediaError,
    PermanentError,
    RetriableError,
    SourceChangedError,
)
from ingestd.core.rawnames import shown
from ingestd.core.regular import open_regular

__all__ = [
    "TIME_TOLERANCE",
    "FrameSelector",
    "SampledFrames",
    "SamplingAbandoned",
    "VideoInfo",
    "probe_video",
    "sample_frames",
    "sampling_rate",
    "select_by_time",
]

# Container time bases round timestamps (1/1000 s in Matroska, 1/90000 in MPEG-TS, a
# 1/30 s grid read back as 33.333... ms): a frame "at 0.5 s" may read back as 0.49999.
# 1 ms absorbs that without ever reaching for the previous frame (even 240 fps frames
# are 4.2 ms apart).
TIME_TOLERANCE = 0.001

# A requested rate this close (relative) to the source's nominal rate is taken to mean
# that rate exactly: "29.97" means 30000/1001, and 1 ppm of difference would otherwise
# drift past TIME_TOLERANCE after ~17 minutes and start dropping frames.
_RATE_SNAP = 1e-4

# The declared frame count and duration are estimates for some containers (Matroska
# and AVI without nb_frames report duration x a guessed rate), so a short read is only
# called truncation when both the frame count and the time reached fall clearly short.
_SHORT_FRACTION = 0.02

_FRAME_NAME = re.compile(r"^\.?frame_\d{6,}\.(?:jpg|png)(?:\.part)?$")


class SamplingAbandoned(Abandoned):
    """`stop` was set while sampling: the daemon is stopping. Not a fact about the file
    (so deliberately not a MediaError, which would fail the item permanently): an
    `errors.Abandoned`, which the sync step answers by leaving the item pending. Partial
    output has been removed when this is raised."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path}: frame sampling abandoned (stopping)")
        self.path = path


@dataclass(frozen=True)
class VideoInfo:
    width: int  # of decoded frames (after any rotation the file asks for)
    height: int
    fps: float  # the nominal rate the container declares (an average for VFR files)
    frame_count: int  # declared; an estimate for containers that do not store it
    duration: float  # seconds, frame_count / fps: as good as those two are


@dataclass(frozen=True)
class SampledFrames:
    files: list[str]  # absolute paths, in presentation order
    timestamps: list[float]  # seconds, source presentation timestamp of each file
    source_fps: float  # the container's nominal rate


# --- the selection rule (pure) ----------------------------------------------------------


class FrameSelector:
    """The frame-selection rule, fed one timestamp at a time (the sampler decides while
    the decoder still sits on the frame, so it cannot look ahead).

    For each sampling time t_k = k / fps, keep the first frame whose timestamp is
    >= t_k - tolerance. A kept frame serves every sampling time it reaches, so no frame
    is kept twice, and a gap in a variable-frame-rate file yields one frame, not copies.
    """

    def __init__(self, fps: float, tolerance: float = TIME_TOLERANCE) -> None:
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number, not {fps!r}")
        self.fps = fps
        self.tolerance = tolerance
        self._k = 0  # index of the next sampling time still to serve

    def due(self) -> float:
        """The next sampling time still waiting for a frame."""
        return self._k / self.fps

    def take(self, ts: float) -> bool:
        """Whether the frame at `ts` seconds is kept. Timestamps must not decrease."""
        # k / fps rather than a running sum: a sum accumulates rounding over hours.
        if ts < self._k / self.fps - self.tolerance:
            return False
        # The next sampling time is the first one this frame does not reach.
        fps, tol = self.fps, self.tolerance
        k = max(self._k + 1, math.floor((ts + tol) * fps) + 1)
        while k - 1 > self._k and (k - 1) / fps - tol > ts:  # float rounding, one way
            k -= 1
        while k / fps - tol <= ts:  # and the other
            k += 1
        self._k = k
        return True


def select_by_time(
    timestamps: Iterable[float], fps: float, tolerance: float = TIME_TOLERANCE
) -> Iterator[int]:
    """The indexes of the frames `sample_frames` keeps from frames with these
    presentation timestamps (seconds, non-decreasing), sampled at `fps`."""
    selector = FrameSelector(fps, tolerance)
    for i, ts in enumerate(timestamps):
        if selector.take(ts):
            yield i


def sampling_rate(requested: float, native: float) -> float:
    """The rate to sample at: `requested`, unless it is the source's nominal rate as
    typed by a person (within 0.01 %), then exactly the source's rate. A user asking for
    29.97 from a 30000/1001 file wants every frame, over hours too."""
    if math.isfinite(native) and native > 0 and abs(requested - native) <= native * _RATE_SNAP:
        return native
    return requested


# --- probing ----------------------------------------------------------------------------


def _check_readable(path: str) -> None:
    # OpenCV says only "could not open"; say why when the reason is not the content.
    # The classes mirror sync.prepare: a vanished file is still moving, not broken.
    # Regular files only (core.regular): OpenCV would block on a FIFO swapped in after
    # hashing; a NotRegularFile fails the item instead.
    where = shown(path)
    try:
        os.close(open_regular(path))
    except FileNotFoundError:
        raise SourceChangedError(f"{where} vanished before it could be read") from None
    except IsADirectoryError:
        raise SourceChangedError(f"{where} is now a folder") from None
    except PermissionError:
        raise PermanentError(f"cannot read {where}: permission denied") from None
    except OSError as e:
        raise RetriableError(f"cannot read {where}: {e.strerror}") from None


def _open(path: str) -> cv2.VideoCapture:
    _check_readable(path)
    # FFmpeg explicitly: OpenCV's own MJPEG reader could otherwise take .avi files, and
    # it does not report presentation timestamps.
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        raise MediaError(
            f"{path}: cannot be opened as a video (corrupt, truncated, or not a video "
            "format this build of OpenCV/FFmpeg reads)"
        )
    return cap


def _nominal(cap: cv2.VideoCapture) -> tuple[float, int]:
    fps = cap.get(cv2.CAP_PROP_FPS)
    count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    fps = fps if math.isfinite(fps) and fps > 0 else 0.0
    return fps, int(count) if math.isfinite(count) and count > 0 else 0


def probe_video(path: str) -> VideoInfo:
    """Size, nominal rate, frame count and duration of a video. Decodes the first frame,
    so a file that opens but cannot be decoded fails here too (MediaError)."""
    cap = _open(path)
    try:
        fps, count = _nominal(cap)
        ok, frame = cap.read()
        if not ok or frame is None or frame.size == 0:
            raise MediaError(f"{path}: opens as a video but no frame could be decoded")
        # The decoded frame's shape, not CAP_PROP_FRAME_WIDTH/HEIGHT: those report the
        # stored size, before the rotation a phone video asks for (which OpenCV applies).
        height, width = frame.shape[:2]
    finally:
        cap.release()
    duration = count / fps if fps > 0 else 0.0
    return VideoInfo(int(width), int(height), fps, count, duration)


# --- sampling ---------------------------------------------------------------------------


def sample_frames(
    src: str,
    out_dir: str,
    fps: float,
    fmt: Literal["jpeg", "png"] = "jpeg",
    quality: int = 90,
    stop: threading.Event | None = None,
) -> SampledFrames:
    """Sample `src` at `fps` frames per second of presentation time into
    `out_dir/frame_000000.jpg` (or .png), ... in order, and return the files with the
    source timestamp of each (see `FrameSelector` for the rule).

    `out_dir` is created if needed; files in it named like our frames (left by an
    earlier, interrupted run) are removed first. Each frame is written under a hidden
    `.part` name and renamed, so a crash never leaves a half frame under a final name.
    At most one decoded frame is held in memory, whatever the length of the video.
    `quality` (1-100) applies to JPEG; PNG is lossless.

    Raises MediaError (naming the file and what happened) when the video cannot be
    opened, yields no frame, or stops decoding well short of its declared length;
    SamplingAbandoned when `stop` is set (checked between frames); RetriableError when
    out_dir cannot be written (disk full, ...). On any failure the frames written so far
    are removed, and out_dir too if this call created it.
    """
    if fmt not in ("jpeg", "png"):
        raise ValueError(f"fmt must be 'jpeg' or 'png', not {fmt!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be 1..100, not {quality!r}")
    FrameSelector(fps)  # validates fps before any file is touched

    cap = _open(src)
    out_dir = os.path.abspath(out_dir)
    created = not os.path.isdir(out_dir)
    written: list[str] = []
    try:
        _prepare_out_dir(out_dir)
        result = _sample(cap, src, out_dir, fps, fmt, quality, stop, written)
    except BaseException:
        _remove_partial(out_dir, written, created)
        raise
    finally:
        cap.release()
    return result


def _prepare_out_dir(out_dir: str) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(out_dir):
            if _FRAME_NAME.match(name):
                os.unlink(os.path.join(out_dir, name))
    except OSError as e:
        raise RetriableError(f"cannot prepare frame folder {out_dir}: {e.strerror}") from None


def _sample(
    cap: cv2.VideoCapture,
    src: str,
    out_dir: str,
    fps: float,
    fmt: Literal["jpeg", "png"],
    quality: int,
    stop: threading.Event | None,
    written: list[str],
) -> SampledFrames:
    native, declared = _nominal(cap)
    selector = FrameSelector(sampling_rate(fps, native))
    ext = "jpg" if fmt == "jpeg" else "png"
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == "jpeg" else []
    timestamps: list[float] = []
    frame: np.ndarray | None = None  # reused by retrieve(): one decoded frame at a time
    grabbed = 0
    prev_ts = -math.inf
    while True:
        if stop is not None and stop.is_set():
            raise SamplingAbandoned(src)
        if not cap.grab():
            break
        grabbed += 1
        ts = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
        if not math.isfinite(ts) or ts <= prev_ts:
            # No usable PTS (OpenCV reports 0 when the stream has none) or a repeat:
            # place it one nominal frame on, so the time rule still moves forward.
            ts = 0.0 if grabbed == 1 else prev_ts + (1.0 / native if native > 0 else 0.0)
        prev_ts = ts
        if not selector.take(ts):
            continue
        ok, frame = cap.retrieve(frame)
        if not ok or frame is None:
            raise MediaError(f"{src}: frame {grabbed} was read but could not be decoded")
        ok, buf = cv2.imencode(f".{ext}", frame, params)
        if not ok:
            raise MediaError(f"{src}: frame {grabbed} could not be encoded as {fmt}")
        written.append(_write_atomic(out_dir, f"frame_{len(timestamps):06d}.{ext}", buf))
        # Microseconds are plenty, and keep the JSON the item carries readable.
        timestamps.append(round(max(ts, 0.0), 6))

    if grabbed == 0:
        raise MediaError(f"{src}: opens as a video but no frame could be decoded")
    if _looks_truncated(grabbed, prev_ts, native, declared):
        raise MediaError(
            f"{src}: decoding failed after frame {grabbed} of ~{declared} "
            f"({prev_ts:.1f} s of ~{declared / native:.1f} s); the file may be truncated or damaged"
        )
    if not written:  # cannot happen (t_0 = 0 takes the first frame); never return none
        raise MediaError(f"{src}: no frame was sampled at {fps} fps")
    return SampledFrames(written, timestamps, native)


def _looks_truncated(grabbed: int, last_ts: float, native: float, declared: int) -> bool:
    """Decoding stopped well before the end the container declares. OpenCV's grab()
    says False alike at the end and at an unrecoverable error, so compare with the
    declared length; both the count and the time must fall short, because for some
    containers one of them is only an estimate (a VFR Matroska or AVI file declares
    duration x a guessed rate as its frame count)."""
    if declared <= 0 or native <= 0:
        return False  # nothing declared to compare with
    missing_frames = declared - grabbed
    missing_time = declared / native - (last_ts + 1.0 / native)
    return missing_frames > max(2, _SHORT_FRACTION * declared) and missing_time > max(
        2.0 / native, _SHORT_FRACTION * declared / native
    )


def _write_atomic(out_dir: str, name: str, data: np.ndarray) -> str:
    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".{name}.part")
    try:
        # No fsync: the spool is rebuilt from the source after a crash, and a frame is
        # only uploaded after sampling has returned. The rename is what keeps a half
        # frame from ever carrying a final name.
        with open(tmp, "wb") as fh:
            fh.write(data)  # the encoded bytes, without a copy
        os.replace(tmp, final)
    except OSError as e:
        _unlink_quiet(tmp)
        raise RetriableError(f"cannot write frames to {out_dir}: {e.strerror}") from None
    return final


def _remove_partial(out_dir: str, written: list[str], created: bool) -> None:
    for path in written:
        _unlink_quiet(path)
    try:
        for name in os.listdir(out_dir):
            if _FRAME_NAME.match(name):  # e.g. the .part of the frame being written
                _unlink_quiet(os.path.join(out_dir, name))
        if created:
            os.rmdir(out_dir)
    except OSError:
        pass  # not ours to fight over: the folder is gone, or holds other files


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
