"""Slot types: from the file name, and from the first bytes when the name says nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from ingestd.media.detect import (
    DICOM_EXTENSIONS,
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    extension,
    slot_type_for,
    sniff,
    type_of_prefix,
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


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x00" * 128 + b"DICM" + b"\x02\x00", "dicom"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "image"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "image"),
        (b"GIF89a\x01\x00", "image"),
        (b"BM\x36\x00\x0c\x00\x00\x00\x00\x00\x36\x00", "image"),
        (b"BMW,Audi,Opel\n", None),  # text that happens to start with BM
        (b"II*\x00\x08\x00", "image"),
        (b"MM\x00*\x00\x00", "image"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "image"),
        (b"\x00\x00\x00\x18ftypmp42\x00\x00", "video"),
        (b"\x1aE\xdf\xa3\x01\x00", "video"),
        (b"RIFF\x24\x00\x00\x00AVI LIST", "video"),
        (b"seed:1\nrandom", None),
        (b"", None),
    ],
)
def test_type_of_prefix(head: bytes, expected: str | None) -> None:
    assert type_of_prefix(head) == expected


def test_sniff_reads_the_file(tmp_path: Path) -> None:
    dcm = tmp_path / "IM0001"
    dcm.write_bytes(b"\x00" * 128 + b"DICM" + b"rest")
    assert sniff(str(dcm)) == "dicom"
    assert sniff(str(tmp_path / "missing")) is None
