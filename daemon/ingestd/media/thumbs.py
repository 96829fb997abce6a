"""Dashboard thumbnails: a small JPEG for an image, a frame of a video, the middle slice
of a DICOM series. Made once per content and cached on disk.

The render functions block and decode media (tens of milliseconds to a second), so
`ThumbCache` runs them on its own small thread pool, never on the event loop, and
never more than one job per content key at a time. Cache entries are named by a key
derived from content digests, so a changed item gets a new thumbnail and a `touch`
does not; a file that cannot be rendered leaves a `.none` marker so that it is not
decoded again on every dashboard refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog
from PIL import Image, ImageOps

log = structlog.get_logger("ingestd.thumbs")

ThumbKind = Literal["image", "video", "dicom"]
THUMB_KINDS: frozenset[str] = frozenset({"image", "video", "dicom"})

MAX_SIDE = 256
QUALITY = 80
# JPEG decodes at 1/2..1/8 scale (draft mode), so any JPEG is cheap; other formats
# decode whole, and a 1-gigapixel PNG would take gigabytes for a 256 px picture.
MAX_FULL_DECODE_PIXELS = 64_000_000
VIDEO_AT_S = 1.0  # a frame from about here, or the middle of shorter videos
VIDEO_MAX_GRABS = 600  # never read further than this many frames into a video


class NoThumbnail(Exception):
    """The file cannot be rendered (corrupt, unsupported, too large to decode cheaply)."""


# --- rendering (blocking) ------------------------------------------------------------------


def _fit(im: Image.Image) -> Image.Image:
    if im.mode not in ("RGB", "L"):
        im = im.convert("RGBA") if "A" in im.getbands() or im.mode == "P" else im.convert("RGB")
    if im.mode == "RGBA":
        # Transparent pixels over white, as a browser would show them on the dashboard.
        back = Image.new("RGB", im.size, (255, 255, 255))
        back.paste(im, mask=im.getchannel("A"))
        im = back
    im.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return im


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    _fit(im).save(buf, "JPEG", quality=QUALITY, optimize=True)
    return buf.getvalue()


def _to_8bit(a: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Scale to 0..255: between lo and hi when given (a window), else between robust
    percentiles, so one hot pixel does not turn the picture black."""
    a = a.astype(np.float32, copy=False)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros(a.shape, np.uint8)
    if lo is None or hi is None:
        lo, hi = (float(v) for v in np.percentile(finite, (0.5, 99.5)))
        if hi <= lo:
            lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.full(a.shape, 128 if hi > 0 else 0, np.uint8)
    out = (np.nan_to_num(a, nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(out, 0, 255).astype(np.uint8)


def render_image(path: str) -> bytes:
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                # Decode at the smallest DCT scale that still covers twice the thumbnail.
                im.draft("RGB", (MAX_SIDE * 2, MAX_SIDE * 2))
            elif im.width * im.height > MAX_FULL_DECODE_PIXELS:
                raise NoThumbnail(f"{im.width}x{im.height} {im.format} is too large to preview")
            im.seek(0)  # the first frame of a GIF, TIFF or MPO
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                # 16-bit and float greyscale (scans, depth maps): Pillow cannot make
                # those 8-bit without clipping, so scale them like a DICOM slice.
                im = Image.fromarray(_to_8bit(np.asarray(im)))
            upright = ImageOps.exif_transpose(im)
            return _jpeg(upright if upright is not None else im)
    except NoThumbnail:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise NoThumbnail(f"{os.path.basename(path)}: {e}") from None


def render_video(path: str) -> bytes:
    import cv2

    if not os.path.isfile(path):
        raise NoThumbnail(f"{path} is missing")
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    try:
        if not cap.isOpened():
            raise NoThumbnail(f"{os.path.basename(path)}: cannot be opened as a video")
        fps = cap.get(cv2.CAP_PROP_FPS)
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        fps = fps if math.isfinite(fps) and fps > 0 else 0.0
        count = count if math.isfinite(count) and count > 0 else 0.0
        duration = count / fps if fps and count else 0.0
        at = min(VIDEO_AT_S, duration / 2) if duration else VIDEO_AT_S
        # Sequential grabs (retrieve only the one kept): cheaper than a seek when
        # keyframes are far apart, and at most about a second of video is read.
        ok = cap.grab()
        grabs = 1
        while ok and grabs < VIDEO_MAX_GRABS and cap.get(cv2.CAP_PROP_POS_MSEC) < at * 1000:
            ok = cap.grab()
            grabs += 1
        frame = None
        if ok:
            ok, frame = cap.retrieve()
        if not ok or frame is None or frame.size == 0:
            # Ran off the end (a shorter video than declared): the first frame then.
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = cap.read()
        if not ok or frame is None or frame.size == 0:
            raise NoThumbnail(f"{os.path.basename(path)}: no frame could be decoded")
    finally:
        cap.release()
    if frame.ndim == 2:
        return _jpeg(Image.fromarray(frame))
    return _jpeg(Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))


def _first(value: Any) -> float | None:
    if value is None:
        return None
    try:
        v = value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value
        f = float(v)
    except (TypeError, ValueError, IndexError):
        return None
    return f if math.isfinite(f) else None


def render_dicom(path: str) -> bytes:
    """The middle frame of the file (multi-frame) or its only one, windowed to 8 bits."""
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

    name = os.path.basename(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        if "Rows" not in ds or "Columns" not in ds:
            raise NoThumbnail(f"{name}: holds no image")
        frames = int(ds.get("NumberOfFrames") or 1)
        index = frames // 2 if frames > 1 else None
        # Only the wanted frame is decoded, not the whole multi-frame object.
        arr = pixel_array(path, index=index)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if photometric == "PALETTE COLOR":
            full = pydicom.dcmread(path, force=True)  # the LUTs sit in the header
            arr = apply_color_lut(arr, full)
            if arr.dtype != np.uint8:
                arr = _to_8bit(arr, 0, float(np.iinfo(arr.dtype).max))
            return _jpeg(Image.fromarray(arr.astype(np.uint8), "RGB"))
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):
            # Colour (RGB; YBR is converted by pydicom on decode).
            if arr.dtype != np.uint8:
                arr = _to_8bit(arr)
            return _jpeg(Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB"))
        if arr.ndim != 2:
            raise NoThumbnail(f"{name}: unexpected pixel array shape {arr.shape}")
        values = (
            apply_modality_lut(arr, ds)
            if "RescaleSlope" in ds or "ModalityLUTSequence" in ds
            else arr
        )
        center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
        if center is not None and width is not None and width > 1:
            out = _to_8bit(values, center - width / 2, center + width / 2)
        else:
            out = _to_8bit(values)
        if photometric == "MONOCHROME1":  # low values are white
            out = 255 - out
        return _jpeg(Image.fromarray(out, "L"))
    except NoThumbnail:
        raise
    except Exception as e:  # pydicom and its decoders raise many kinds on bad input
        raise NoThumbnail(f"{name}: {type(e).__name__}: {e}") from None


def render(kind: str, path: str) -> bytes:
    """JPEG bytes of a thumbnail of `path`, read as `kind`. Raises NoThumbnail."""
    if kind == "image":
        return render_image(path)
    if kind == "video":
        return render_video(path)
    if kind == "dicom":
        return render_dicom(path)
    raise NoThumbnail(f"no thumbnails for {kind}")


def pick(slot_type: str, paths: Sequence[str]) -> tuple[ThumbKind, str] | None:
    """Which file of a slot to show, and as what: the image, the video, the middle
    slice of a DICOM series, the middle frame of sampled frames. None: nothing to show."""
    if not paths:
        return None
    middle = paths[len(paths) // 2]
    if slot_type == "image":
        return "image", paths[0]
    if slot_type == "video":
        return "video", paths[0]
    if slot_type == "frames":
        return "image", middle
    if slot_type == "dicom":
        return "dicom", middle
    return None


def cache_key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:40]


# --- the cache (async front) ---------------------------------------------------------------


# The dashboard shows recent items only; a daemon that runs for months must not keep a
# thumbnail of every item it ever synced. ~15 kB each: 5,000 is under 100 MB.
MAX_CACHED = 5000


class ThumbCache:
    """Thumbnails under `root`, made on a thread pool at most once per key, the least
    recently used dropped once more than `max_files` are kept."""

    def __init__(self, root: Path, threads: int = 2, max_files: int = MAX_CACHED) -> None:
        self.root = Path(root)
        self.max_files = max_files
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="thumbs")
        self._jobs: dict[str, asyncio.Future[Path | None]] = {}
        self._lock = threading.Lock()
        self.generated = 0  # renders attempted (tests check that a cached one is not redone)
        # Prune at the first render (the cache may be left from an earlier run), then
        # after every tenth of the cap, so a prune's listing is paid rarely.
        self._until_prune = 0

    def _paths(self, key: str) -> tuple[Path, Path]:
        d = self.root / key[:2]
        return d / f"{key}.jpg", d / f"{key}.none"

    def cached(self, key: str) -> Path | bool | None:
        """The file if made, None if known unrenderable, False if not tried yet."""
        jpg, none = self._paths(key)
        now = time.time_ns()
        for p in (jpg, none):
            try:
                # Recently used, so the last to be pruned: the access time says so (set
                # here, as mounts with noatime or relatime would not), mtime stays the
                # time it was made.
                os.utime(p, ns=(now, os.stat(p).st_mtime_ns))
            except OSError:
                continue
            return jpg if p is jpg else None
        return False

    async def get(
        self, key: str, kind: str, path: str, check: Callable[[], bool] | None = None
    ) -> Path | None:
        """The thumbnail for content `key`, rendering `path` as `kind` if not cached.
        `check` runs on the pool before rendering: False (the file is no longer the
        content the key names) gives None and caches nothing."""
        loop = asyncio.get_running_loop()
        hit = await loop.run_in_executor(self._pool, self.cached, key)
        if hit is not False:
            return hit  # type: ignore[return-value]
        job = self._jobs.get(key)
        if job is None:
            job = asyncio.ensure_future(
                loop.run_in_executor(self._pool, self._make, key, kind, path, check)
            )
            self._jobs[key] = job
            job.add_done_callback(lambda _: self._jobs.pop(key, None))
        return await asyncio.shield(job)

    def _make(
        self, key: str, kind: str, path: str, check: Callable[[], bool] | None
    ) -> Path | None:
        jpg, none = self._paths(key)
        if jpg.is_file():
            return jpg
        if check is not None and not check():
            return None
        with self._lock:
            self.generated += 1
            self._until_prune -= 1
            prune = self._until_prune <= 0
            if prune:
                self._until_prune = max(self.max_files // 10, 1)
        if prune:
            self.prune()
        jpg.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = render(kind, path)
        except NoThumbnail as e:
            log.info("no thumbnail", path=path, reason=str(e))
            with contextlib.suppress(OSError):
                none.touch()
            return None
        fd, tmp = tempfile.mkstemp(dir=jpg.parent, prefix=".thumb-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, jpg)  # readers never see half a file
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return jpg

    def prune(self) -> int:
        """Drop the least recently used entries beyond `max_files` (blocking); returns
        how many went. Run before a render, so the new entry is never the one dropped."""
        entries: list[tuple[float, str]] = []
        try:
            shards = list(os.scandir(self.root))
        except FileNotFoundError:
            return 0
        for shard in shards:
            if not shard.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError), os.scandir(shard.path) as it:
                for e in it:
                    if e.name.endswith((".jpg", ".none")):
                        with contextlib.suppress(OSError):
                            entries.append((e.stat(follow_symlinks=False).st_atime, e.path))
        # Keep room for the entry about to be made.
        excess = len(entries) - (self.max_files - 1)
        if excess <= 0:
            return 0
        entries.sort()
        for _, path in entries[:excess]:
            with contextlib.suppress(OSError):
                os.unlink(path)
        log.debug("thumbnails pruned", removed=excess, kept=len(entries) - excess)
        return excess

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
