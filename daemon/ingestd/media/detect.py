"""The slot type a file becomes: from its name, and, for names that say nothing, from
its first bytes (`sniff`, which the impure planning layer calls; the planner itself
stays free of I/O).
"""

from __future__ import annotations

from ingestd.core.model import SlotType
from ingestd.core.regular import NotRegularFile, open_regular_file

__all__ = [
    "DICOM_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "extension",
    "is_dicom_prefix",
    "slot_type_for",
    "sniff",
    "type_of_prefix",
]

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp"})
VIDEO_EXTENSIONS = frozenset({"mp4", "mov", "avi", "mkv", "webm", "m4v", "mpg", "mpeg"})
DICOM_EXTENSIONS = frozenset({"dcm", "dicom"})

_BY_EXTENSION: dict[str, SlotType] = {
    **dict.fromkeys(IMAGE_EXTENSIONS, "image"),
    **dict.fromkeys(VIDEO_EXTENSIONS, "video"),
    **dict.fromkeys(DICOM_EXTENSIONS, "dicom"),
}


def extension(name: str) -> str:
    """The lower-cased text after the last `.`, or "" when there is none. A leading dot
    starts a hidden name, not an extension (`.jpg` has none), as in pathlib."""
    dot = name.rfind(".")
    return name[dot + 1 :].lower() if dot > 0 else ""


def slot_type_for(name: str) -> SlotType:
    """`image`, `video` or `dicom` by extension (case-insensitive), else `file`."""
    return _BY_EXTENSION.get(extension(name), "file")


def is_dicom_prefix(head: bytes) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then `DICM`."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def sniff(path: str) -> SlotType | None:
    """The type the content shows, for files whose name says `file`: DICOM files from
    PACS exports and scanners often have no extension at all, and cameras or pipelines
    write images and videos under generic names. None when unknown or unreadable (the
    sync step reports unreadable files)."""
    try:
        # Regular files only, never blocking (core.regular): a FIFO is unknown.
        with open_regular_file(path) as fh:
            head = fh.read(132)
    except (OSError, NotRegularFile):
        return None
    return type_of_prefix(head)


def type_of_prefix(head: bytes) -> SlotType | None:
    """The slot type magic bytes at the start of a file announce, if any."""
    if is_dicom_prefix(head):
        return "dicom"
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if head[:2] == b"BM" and head[6:10] == b"\x00\x00\x00\x00":  # BMP: reserved bytes are 0
        return "image"
    if head[4:8] == b"ftyp" or head.startswith(b"\x1aE\xdf\xa3"):  # MP4/MOV, Matroska/WebM
        return "video"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video"
    return None


_IMAGE_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
)
