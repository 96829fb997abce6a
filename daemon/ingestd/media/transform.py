"""What a slot's files become before they are sent: oversize images downscaled, videos
sampled into frames, DICOM de-identified. Originals are never modified; derived files
go to a spool folder that the caller removes once the sink has answered.

Blocking and CPU-heavy: the sync step runs it in its media thread pool (OpenCV, PIL
and pydicom's writers release the GIL for the heavy parts)."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ingestd.config import DicomConfig, ImagesConfig, VideoConfig
from ingestd.core.errors import Abandoned, MediaError
from ingestd.core.model import SlotType
from ingestd.media.detect import sniff


@dataclass(frozen=True, slots=True)
class MediaSettings:
    images: ImagesConfig
    video: VideoConfig
    dicom: DicomConfig
    deid_key: bytes | None = None  # set when dicom.deidentify is on

    def identity(self, slots: Sequence[tuple[SlotType, Sequence[str] | None]]) -> list[Any]:
        """The settings that change what is sent for an item with these slots (type, and
        the local paths of its files, or None for remote objects): part of the 'nothing
        changed' check, so a settings edit re-sends only the items it changes. A local
        image that fits the limit goes as it is whatever the limit, so only its being
        over it counts (read from the header)."""
        out: list[Any] = []
        for slot_type, paths in slots:
            if slot_type == "image":
                limits = self.images.model_dump()
                if paths is None:
                    out.append(limits)
                    continue
                out.append([_image_identity(p, limits) for p in paths])
            elif slot_type in ("video", "frames"):
                out.append(self.video.model_dump())
            elif slot_type in ("dicom", "file"):
                out.append(self.dicom.deidentify)
        return out


def _image_identity(path: str, limits: dict[str, Any]) -> Any:
    from ingestd.media.images import image_size

    try:
        w, h = image_size(path)
    except Exception:  # unreadable: the send reports it; any change of settings may matter
        return limits
    return "as is" if max(w, h) <= int(limits["max_dimension"]) else limits


@dataclass(slots=True)
class PreparedSlot:
    type: SlotType
    files: list[tuple[str, str]]  # (name shown in the dataset, path to read)
    extra: dict[str, Any] = field(default_factory=dict)


def transform_slot(
    slot_type: SlotType,
    files: list[tuple[str, str]],
    settings: MediaSettings,
    spool: str,
    stop: threading.Event | None = None,
) -> PreparedSlot:
    """Turn one planned slot's (name, source path) files into what is sent."""
    if slot_type == "image":
        from ingestd.media.images import prepare_image

        # prepare_image makes the spool only for a downscaled copy: most images go as
        # they are, and a folder made and removed per image was a tenth of a group's time.
        out = []
        for name, path in files:
            derived = prepare_image(
                path, spool, settings.images.max_dimension, settings.images.oversize
            )
            out.append((name, derived or path))
        return PreparedSlot("image", out)
    if slot_type == "video":
        video = settings.video
        if video.mode == "native":
            return PreparedSlot("video", files, {"fps": video.fps})
        from ingestd.media.video import SamplingAbandoned, sample_frames

        if len(files) != 1:
            raise ValueError("a video slot holds one file")
        name, path = files[0]
        try:
            frames = sample_frames(
                path, os.path.join(spool, "frames"), video.fps, video.format, video.quality, stop
            )
        except SamplingAbandoned as e:
            raise Abandoned(path) from e
        return PreparedSlot(
            "frames",
            [(os.path.basename(f), f) for f in frames.files],
            {"timestamps": frames.timestamps, "fps": video.fps, "source": name},
        )
    if (
        slot_type == "file"
        and settings.dicom.deidentify
        and all(sniff(path) == "dicom" for _, path in files)
    ):
        # A safety net: whatever the planner decided, DICOM bytes never leave un-stripped.
        slot_type = "dicom"
    if slot_type == "dicom" and not settings.dicom.deidentify:
        for name, path in files:
            check_dicom(name, path)
        return PreparedSlot("dicom", files)
    if slot_type == "dicom" and settings.dicom.deidentify:
        from ingestd.media.dicom import deidentify

        assert settings.deid_key is not None
        os.makedirs(spool, exist_ok=True)
        out = []
        for i, (name, path) in enumerate(files):
            dst = os.path.join(spool, f"deid-{i:06d}.dcm")
            deidentify(path, dst, settings.deid_key)
            out.append((name, dst))
        return PreparedSlot("dicom", out)
    return PreparedSlot(slot_type, files)


def transforms(slot_type: SlotType, settings: MediaSettings) -> bool:
    """Whether transform_slot may read or derive anything for this slot type (if not,
    the files go as they are and no media work needs scheduling)."""
    if slot_type in ("image", "dicom"):
        return True  # checked (header only for DICOM), and maybe derived, every time
    if slot_type == "video":
        return settings.video.mode == "frames"
    return slot_type == "file" and settings.dicom.deidentify


# Attributes that say how many bytes a native (not encapsulated) pixel data holds.
_SIZE_KEYWORDS = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames")
_CHECK_KEYWORDS = (*_SIZE_KEYWORDS, "SOPClassUID")


def check_dicom(name: str, path: str) -> None:
    """A file sent as a `dicom` slot is DICOM: its header parses (not its pixels), it
    names its instance, and it is long enough for the pixel data the header announces
    (for uncompressed data). A viewer would fail on it later, unexplained."""
    from ingestd.media.dicom import read_header

    try:
        header = read_header(path, _CHECK_KEYWORDS)
        _check_length(path, header.tags)
    except MediaError as e:
        why = e.reason.removeprefix(f"{os.path.basename(path)}: ")
        if why.startswith("not a DICOM file ("):
            why = why.removeprefix("not a DICOM file (").removesuffix(")")
        raise MediaError(
            f"{name} is not a DICOM file: {why}; export it again or exclude it"
        ) from None


def _check_length(path: str, tags: dict[str, str | int | float]) -> None:
    from pydicom.filereader import read_file_meta_info
    from pydicom.uid import UID

    sizes = [tags.get(k) for k in _SIZE_KEYWORDS[:4]]
    if not all(isinstance(v, int) and v > 0 for v in sizes):
        # pydicom returns what it parsed of a header cut short, silently: an image
        # object (by its SOP class, near the start) without its image size was cut.
        if "Image Storage" in UID(str(tags.get("SOPClassUID", ""))).name:
            raise MediaError(
                "truncated: the header ends before the image's size (Rows, Columns, ...)"
            )
        return  # not an image (a report, a plan): no pixel data to compare with
    try:
        ts = read_file_meta_info(path).get("TransferSyntaxUID")
    except Exception:
        ts = None  # a bare data set: implicit little endian, native
    if ts is not None and UID(str(ts)).is_encapsulated:
        return  # compressed: its length says nothing
    rows, cols, bits, samples = (int(v) for v in sizes)  # type: ignore[arg-type]
    frames = tags.get("NumberOfFrames")
    n = int(frames) if isinstance(frames, int) and frames > 0 else 1
    expected = rows * cols * samples * ((bits + 7) // 8) * n
    size = os.path.getsize(path)
    if size < expected:
        raise MediaError(
            f"truncated: {size:,} bytes in all, less than the {expected:,} bytes of pixel "
            "data its header announces"
        )
