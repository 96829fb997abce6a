"""media/containers.py: the streamed ZIP opens with zipfile and holds each part's exact
bytes; the streamed AVI is read by PyAV (FFmpeg's demuxer) frame by frame, and its
RIFF structure is what the header promised. Real files throughout."""

from __future__ import annotations

import io
import os
import struct
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from ingestd.media.containers import (
    Part,
    Stream,
    TooBig,
    frame_codec,
    frame_size,
    frames_avi,
    stored_zip,
)
from PIL import Image


def part_of(path: Path, block: int = 4096) -> Part:
    def open_() -> AsyncIterator[bytes]:
        async def gen() -> AsyncIterator[bytes]:
            with open(path, "rb") as fh:
                while data := fh.read(block):
                    yield data

        return gen()

    return Part(path.name, path.stat().st_size, open_)


async def read(stream: Stream) -> bytes:
    data = b"".join([b async for b in stream.open()])
    assert len(data) == stream.size  # the length promised up front is the length sent
    return data


async def test_zip_holds_the_exact_bytes_of_each_part(tmp_path: Path) -> None:
    files = []
    for i, size in enumerate([0, 1, 4095, 4096, 70_001]):
        p = tmp_path / f"IM{i:04d}.dcm"
        p.write_bytes(os.urandom(size))
        files.append(p)
    odd = tmp_path / "schnitt-ü.dcm"  # a UTF-8 name
    odd.write_bytes(b"x" * 33)
    files.append(odd)
    stream = stored_zip([part_of(p) for p in files])
    data = await read(stream)
    zf = zipfile.ZipFile(io.BytesIO(data))
    assert zf.testzip() is None  # every CRC checks out
    assert zf.namelist() == [p.name for p in files]
    for p in files:
        assert zf.read(p.name) == p.read_bytes()
        assert zf.getinfo(p.name).compress_type == zipfile.ZIP_STORED
    # Streamed again (a retry): the same bytes.
    assert await read(stream) == data


async def test_a_part_of_the_wrong_length_breaks_the_stream(tmp_path: Path) -> None:
    p = tmp_path / "a.dcm"
    p.write_bytes(b"12345")
    short = Part("a.dcm", 6, part_of(p).open)
    with pytest.raises(ValueError, match="gave 5 bytes, not 6"):
        await read(stored_zip([short]))
    long = Part("a.dcm", 4, part_of(p).open)
    with pytest.raises(ValueError, match="more than its 4 bytes"):
        await read(frames_avi([long], width=1, height=1, fps=1.0, codec=b"MJPG"))


def test_containers_refuse_what_32_bits_cannot_hold() -> None:
    async def never() -> AsyncIterator[bytes]:
        yield b""

    with pytest.raises(TooBig, match="4 GiB"):
        stored_zip([Part("big.dcm", 1 << 32, never)])
    with pytest.raises(TooBig, match="4 GiB"):
        frames_avi([Part("f.jpg", 1 << 32, never)], width=1, height=1, fps=1.0, codec=b"MJPG")


def _frames(tmp_path: Path, kind: str, n: int) -> list[Path]:
    out = []
    for i in range(n):
        p = tmp_path / f"frame_{i:06d}.{kind}"
        img = Image.new("RGB", (32, 24), (40 * i, 255 - 40 * i, 7 * i))
        img.save(p, quality=92) if kind == "jpg" else img.save(p)
        out.append(p)
    return out


@pytest.mark.parametrize("kind", ["jpg", "png"])
async def test_avi_is_read_frame_by_frame_by_ffmpeg(tmp_path: Path, kind: str) -> None:
    av = pytest.importorskip("av")
    frames = _frames(tmp_path, kind, 5)
    width, height = frame_size(str(frames[0]))
    stream = frames_avi(
        [part_of(p) for p in frames],
        width=width,
        height=height,
        fps=2.5,
        codec=frame_codec(frames[0].name),
    )
    data = await read(stream)
    with av.open(io.BytesIO(data), format="avi") as container:
        video = container.streams.video[0]
        assert float(video.average_rate) == pytest.approx(2.5)
        assert (video.codec_context.width, video.codec_context.height) == (32, 24)
        packets = [bytes(p) for p in container.demux(video) if p.size]
    # Each packet is a frame file exactly as it was: nothing re-encoded.
    assert packets == [p.read_bytes() for p in frames]
    with av.open(io.BytesIO(data), format="avi") as container:
        decoded = [f.to_image() for f in container.decode(video=0)]
    assert len(decoded) == 5
    for got, p in zip(decoded, frames, strict=True):
        want = Image.open(p).convert("RGB")
        diff = max(abs(a - b) for a, b in zip(got.tobytes(), want.tobytes(), strict=True))
        assert diff <= 3


async def test_avi_riff_structure(tmp_path: Path) -> None:
    """The RIFF tree, parsed by hand: sizes nest, the index points at every frame."""
    frames = _frames(tmp_path, "jpg", 3)
    (tmp_path / "odd.jpg").write_bytes(frames[0].read_bytes() + b"\xff")  # odd length: padded
    frames.append(tmp_path / "odd.jpg")
    data = await read(
        frames_avi([part_of(p) for p in frames], width=32, height=24, fps=10.0, codec=b"MJPG")
    )
    assert data[:4] == b"RIFF" and data[8:12] == b"AVI "
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
    chunks: dict[bytes, tuple[int, int]] = {}
    at = 12
    while at < len(data):
        fourcc, size = data[at : at + 4], struct.unpack("<I", data[at + 4 : at + 8])[0]
        kind = data[at + 8 : at + 12] if fourcc == b"LIST" else fourcc
        chunks[kind] = (at + 8, size)
        at += 8 + size + (size & 1)
    assert at == len(data) and set(chunks) == {b"hdrl", b"movi", b"idx1"}
    hdrl, _ = chunks[b"hdrl"]
    micro, *_rest = struct.unpack("<I", data[hdrl + 12 : hdrl + 16])
    assert micro == 100_000  # 10 fps
    n_frames = struct.unpack("<I", data[hdrl + 12 + 16 : hdrl + 12 + 20])[0]
    assert n_frames == 4
    movi, _ = chunks[b"movi"]
    idx, idx_size = chunks[b"idx1"]
    assert idx_size == 16 * 4
    for i, p in enumerate(frames):
        tag, flags, offset, size = struct.unpack("<4sIII", data[idx + 16 * i : idx + 16 * i + 16])
        assert (tag, flags, size) == (b"00dc", 0x10, p.stat().st_size)
        start = movi + offset  # offsets count from the 'movi' FOURCC
        assert data[start : start + 4] == b"00dc"
        assert data[start + 8 : start + 8 + size] == p.read_bytes()
