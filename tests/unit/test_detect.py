"""slot_type_for: the slot type from the file name alone."""

from __future__ import annotations

import pytest

from daemon.media.detect import (
    DICOM_EXTENSIONS,
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    extension,
    slot_type_for,
)


@pytest.mark.parametrize("ext", sorted(IMAGE_EXTENSIONS))
def test_images(ext: str) -> None:
    assert slot_type_for(f"a.{ext}") == "image"
    assert slot_type_for(f"a.{ext.upper()}") == "image"


@pytest.mark.parametrize("ext", sorted(VIDEO_EXTENSIONS))
def test_videos(ext: str) -> None:
    assert slot_type_for(f"clip.{ext}") == "video"
    assert slot_type_for(f"clip.{ext.upper()}") == "video"


@pytest.mark.parametrize("ext", sorted(DICOM_EXTENSIONS))
def test_dicom(ext: str) -> None:
    assert slot_type_for(f"IM0001.{ext}") == "dicom"
    assert slot_type_for(f"IM0001.{ext.upper()}") == "dicom"


def test_the_extension_lists_are_the_agreed_ones() -> None:
    assert sorted(IMAGE_EXTENSIONS) == ["bmp", "gif", "jpeg", "jpg", "png", "tif", "tiff", "webp"]
    assert sorted(VIDEO_EXTENSIONS) == ["avi", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "webm"]
    assert sorted(DICOM_EXTENSIONS) == ["dcm", "dicom"]


@pytest.mark.parametrize(
    ("name", "slot_type"),
    [
        ("a.Jpg", "image"),
        ("a.b.c.png", "image"),
        ("archive.png.zip", "file"),  # only the last extension counts
        ("photo.jpg.txt", "file"),
        ("notes.txt", "file"),
        ("README", "file"),
        ("IM000001", "file"),  # extension-less DICOM is a content check, later
        (".jpg", "file"),  # a hidden name, not an extension
        ("a.", "file"),
        ("jpg", "file"),
        ("a.jpgx", "file"),
        ("a.jp", "file"),
        ("a. jpg", "file"),
        ("a.jpg ", "file"),
        ("a.jpg\n", "file"),
        ("line\nbreak.mp4", "video"),
        ("猫.JPEG", "image"),
        ("scan.DiCoM", "dicom"),
        ("", "file"),
    ],
)
def test_slot_type_for(name: str, slot_type: str) -> None:
    assert slot_type_for(name) == slot_type


@pytest.mark.parametrize(
    ("name", "ext"),
    [("a.JPG", "jpg"), ("a.tar.gz", "gz"), ("a", ""), (".env", ""), ("..x", "x"), ("a.", "")],
)
def test_extension(name: str, ext: str) -> None:
    assert extension(name) == ext
