"""Containers written on the fly from files as they are: a stored (uncompressed) ZIP of
a DICOM series and an AVI of sampled frames. Both are streamed with their whole length
known before the first byte (a pre-signed upload needs Content-Length), and neither
re-encodes anything: the ZIP holds each slice's bytes, the AVI each JPEG or PNG frame.

A part is read through `Part.open` (a fresh stream per call, so a retry starts over);
the caller checks its bytes (e.g. a sink's verified stream). The container only
insists on each part's length, since a wrong length would break the offsets it has
already promised."""

from __future__ import annotations

import struct
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

Opener = Callable[[], AsyncIterator[bytes]]

LIMIT = 0xFFFFFFFF  # both formats keep sizes and offsets in 32 bits: 4 GiB


class TooBig(ValueError):
    """The parts do not fit the container's 32-bit sizes or counts."""


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    size: int
    open: Opener  # exactly `size` bytes, from the start, on every call


@dataclass(frozen=True, slots=True)
class Stream:
    size: int  # the container's length, known up front
    open: Opener  # the container's bytes, from the start, on every call


async def _exactly(part: Part) -> AsyncIterator[bytes]:
    seen = 0
    async for block in part.open():
        seen += len(block)
        if seen > part.size:
            raise ValueError(f"{part.name} gave more than its {part.size} bytes")
        yield block
    if seen != part.size:
        raise ValueError(f"{part.name} gave {seen} bytes, not {part.size}")


# --- ZIP (PKWARE APPNOTE 4.3) -----------------------------------------------------------
# Stored entries with a data descriptor after each, so the CRC is computed while
# streaming; the same slices always make the same bytes (a fixed date).
_ZIP_FLAGS = 0x0008 | 0x0800  # data descriptor follows; names are UTF-8
_ZIP_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01
_LOCAL, _DESCRIPTOR, _CENTRAL, _END = 0x04034B50, 0x08074B50, 0x02014B50, 0x06054B50


def stored_zip(parts: Sequence[Part]) -> Stream:
    """The parts, in order, as one stored ZIP (what darwin-py uploads for a series)."""
    names = [p.name.encode("utf-8") for p in parts]
    data_size = sum(30 + len(n) + p.size + 16 for n, p in zip(names, parts, strict=True))
    size = data_size + sum(46 + len(n) for n in names) + 22
    if size > LIMIT or len(parts) > 0xFFFF:
        raise TooBig(
            f"{size} bytes in {len(parts)} files; a ZIP without ZIP64 holds at most 4 GiB "
            "and 65,535 files"
        )

    async def chunks() -> AsyncIterator[bytes]:
        offsets: list[int] = []
        crcs: list[int] = []
        at = 0
        for n, p in zip(names, parts, strict=True):
            offsets.append(at)
            yield (
                struct.pack(
                    "<IHHHHHIIIHH", _LOCAL, 20, _ZIP_FLAGS, 0, 0, _ZIP_DATE, 0, 0, 0, len(n), 0
                )
                + n
            )
            crc = 0
            async for block in _exactly(p):
                crc = zlib.crc32(block, crc)
                yield block
            crcs.append(crc)
            yield struct.pack("<IIII", _DESCRIPTOR, crc, p.size, p.size)
            at += 30 + len(n) + p.size + 16
        directory = bytearray()
        for n, p, crc, offset in zip(names, parts, crcs, offsets, strict=True):
            directory += struct.pack(
                "<IHHHHHHIIIHHHHHII",
                *(_CENTRAL, 20, 20, _ZIP_FLAGS, 0, 0, _ZIP_DATE, crc, p.size, p.size),
                *(len(n), 0, 0, 0, 0, 0, offset),
            )
            directory += n
        count = len(parts)
        directory += struct.pack("<IHHHHIIH", _END, 0, 0, count, count, len(directory), at, 0)
        yield bytes(directory)

    return Stream(size, chunks)


# --- AVI (RIFF, OpenDML's plain AVI 1.0 subset) -----------------------------------------
_AVIF_HASINDEX = 0x10
_AVIIF_KEYFRAME = 0x10
_HDRL = 192  # 'hdrl' + avih chunk + strl list, as written below


def frame_codec(name: str) -> bytes:
    """The FOURCC of a frame file: PNG frames as MPNG, anything else as MJPG."""
    return b"MPNG" if name.lower().endswith(".png") else b"MJPG"


def frame_size(path: str) -> tuple[int, int]:
    """Width and height of an image file (reads its header; blocking)."""
    from PIL import Image

    with Image.open(path) as im:
        return int(im.width), int(im.height)


def _avi_header(n: int, biggest: int, width: int, height: int, fps: float, codec: bytes) -> bytes:
    avih = struct.pack(
        "<IIIIIIIIII4I",
        *(round(1_000_000 / fps), 0, 0, _AVIF_HASINDEX, n, 0, 1, biggest, width, height),
        *(0, 0, 0, 0),
    )
    rate, scale = round(fps * 1000), 1000
    strh = struct.pack(
        "<4s4sIHHIIIIIIIIhhhh",
        *(b"vids", codec, 0, 0, 0, 0, scale, rate, 0, n, biggest, 0xFFFFFFFF, 0),
        *(0, 0, width, height),
    )
    strf = struct.pack(
        "<IiiHH4sIiiII", 40, width, height, 1, 24, codec, width * height * 3, 0, 0, 0, 0
    )
    strl = b"strl" + b"strh" + struct.pack("<I", 56) + strh + b"strf" + struct.pack("<I", 40) + strf
    hdrl = b"hdrl" + b"avih" + struct.pack("<I", 56) + avih
    hdrl += b"LIST" + struct.pack("<I", len(strl)) + strl
    assert len(hdrl) == _HDRL
    return hdrl


def frames_avi(
    frames: Sequence[Part], *, width: int, height: int, fps: float, codec: bytes
) -> Stream:
    """The frames, in order, as an AVI at `fps`: each frame one `00dc` chunk holding
    the file unchanged, then an `idx1` index, so players seek and count frames."""
    if not frames:
        raise ValueError("an AVI needs at least one frame")
    if fps <= 0:
        raise ValueError(f"fps must be positive, not {fps}")
    n = len(frames)
    movi = 4 + sum(8 + f.size + (f.size & 1) for f in frames)
    riff = 4 + 8 + _HDRL + 8 + movi + 8 + 16 * n  # 'AVI ', hdrl, movi, idx1
    if riff + 8 > LIMIT:
        raise TooBig(f"{riff + 8} bytes of frames; an AVI holds at most 4 GiB")
    hdrl = _avi_header(n, max(f.size for f in frames), width, height, fps, codec)

    async def chunks() -> AsyncIterator[bytes]:
        yield (
            b"RIFF"
            + struct.pack("<I", riff)
            + b"AVI "
            + b"LIST"
            + struct.pack("<I", len(hdrl))
            + hdrl
            + b"LIST"
            + struct.pack("<I", movi)
            + b"movi"
        )
        index = bytearray()
        at = 4  # chunk offsets count from the `movi` FOURCC
        for f in frames:
            yield b"00dc" + struct.pack("<I", f.size)
            async for block in _exactly(f):
                yield block
            if f.size & 1:
                yield b"\0"
            index += b"00dc" + struct.pack("<III", _AVIIF_KEYFRAME, at, f.size)
            at += 8 + f.size + (f.size & 1)
        yield b"idx1" + struct.pack("<I", len(index)) + bytes(index)

    return Stream(riff + 8, chunks)
