"""The slot type a file becomes, judged from its name alone.

Content checks (magic bytes, DICOM preambles for extension-less files) belong to the
prepare step, which reads the file anyway; the planner must stay free of I/O.
"""

from __future__ import annotations

from daemon.model import SlotType

__all__ = ["DICOM_EXTENSIONS", "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "extension", "slot_type_for"]

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
