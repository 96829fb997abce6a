"""Dashboard thumbnails (daemon/ingestd/media/thumbs.py) on real media: PIL-encoded images,
videos written by OpenCV's VideoWriter, pydicom's bundled DICOM test files; and the
on-disk cache that makes each thumbnail once."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from ingestd.media import thumbs
from ingestd.media.thumbs import MAX_SIDE, NoThumbnail, ThumbCache, pick, render
from PIL import Image

# Bundled with pydicom (get_testdata_file would try to download the ones that are not).
DICOM = Path(pydicom.__file__).parent / "data" / "test_files"
MR700 = DICOM / "dicomdirtests" / "98892003" / "MR700"


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG"
    im.load()
    return im


def write_video(
    path: Path, frames: int, fps: float = 30.0, size: tuple[int, int] = (320, 240)
) -> None:
    """Frame i is a flat grey of level 4*i: the thumbnail tells which frame it shows."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert w.isOpened()
    for i in range(frames):
        w.write(np.full((size[1], size[0], 3), min(255, 4 * i), np.uint8))
    w.release()


# --- images ------------------------------------------------------------------------------------


def test_jpeg_is_downscaled_to_256_and_keeps_its_look(tmp_path: Path) -> None:
    src = tmp_path / "a.jpg"
    im = Image.new("RGB", (3000, 2000), (200, 30, 30))
    im.paste((30, 30, 200), (1500, 0, 3000, 2000))  # right half blue
    im.save(src, quality=92)
    out = decode(render("image", str(src)))
    assert out.size == (MAX_SIDE, round(MAX_SIDE * 2000 / 3000))
    a = np.asarray(out).astype(int)
    assert a[:, :100].mean(axis=(0, 1))[0] > 150  # left red
    assert a[:, -100:].mean(axis=(0, 1))[2] > 150  # right blue


def test_png_with_alpha_and_16_bit_grey(tmp_path: Path) -> None:
    rgba = tmp_path / "t.png"
    Image.new("RGBA", (400, 100), (0, 0, 0, 0)).save(rgba)
    out = decode(render("image", str(rgba)))
    assert out.size == (256, 64)
    assert np.asarray(out).min() > 240  # transparent shows as white

    grey16 = tmp_path / "g16.png"
    ramp = np.tile(np.linspace(0, 65535, 300, dtype=np.uint16), (50, 1))
    Image.fromarray(ramp).save(grey16)
    a = np.asarray(decode(render("image", str(grey16)))).astype(int)
    if a.ndim == 3:
        a = a[..., 0]
    assert a[:, :10].mean() < 30 and a[:, -10:].mean() > 225  # a full ramp, not clipped


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    src = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait
    Image.new("RGB", (400, 200), (90, 90, 90)).save(src, exif=exif)
    assert decode(render("image", str(src))).size == (128, 256)


def test_corrupt_and_unsupported_files_give_no_thumbnail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(NoThumbnail, match=r"bad\.jpg"):
        render("image", str(bad))
    with pytest.raises(NoThumbnail):
        render("video", str(bad))
    with pytest.raises(NoThumbnail):
        render("dicom", str(bad))
    with pytest.raises(NoThumbnail):
        render("file", str(bad))


# --- video -------------------------------------------------------------------------------------


def test_video_frame_from_about_one_second(tmp_path: Path) -> None:
    src = tmp_path / "clip.mp4"
    write_video(src, frames=60, fps=30)  # 2 s: the frame at 1 s is frame 30, grey 120
    out = decode(render("video", str(src)))
    assert out.size == (256, 192)
    assert abs(float(np.asarray(out).mean()) - 120) < 12


def test_short_video_gives_its_middle_frame(tmp_path: Path) -> None:
    src = tmp_path / "short.mp4"
    write_video(src, frames=20, fps=20)  # 1 s: the middle (0.5 s) is frame 10, grey 40
    out = decode(render("video", str(src)))
    assert abs(float(np.asarray(out).mean()) - 40) < 12


# --- DICOM -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm"]
)
def test_dicom_slices_render_with_contrast(name: str) -> None:
    ds = pydicom.dcmread(DICOM / name)
    out = decode(render("dicom", str(DICOM / name)))
    assert out.mode == "L"
    scale = min(1.0, MAX_SIDE / max(ds.Columns, ds.Rows))
    assert out.size == (round(ds.Columns * scale), round(ds.Rows * scale))
    a = np.asarray(out)
    assert a.std() > 20, "windowed to 8 bits, not a flat picture"


def test_multi_frame_dicom_shows_the_middle_frame() -> None:
    path = DICOM / "rtdose.dcm"  # 15 frames
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array
    assert frames.shape[0] == 15
    middle = frames[7].astype(float)
    out = np.asarray(decode(render("dicom", str(path)))).astype(float)
    assert out.shape == middle.shape
    # The thumbnail is frame 7 scaled: it correlates with it far better than with frame 0.
    corr_mid = np.corrcoef(out.ravel(), middle.ravel())[0, 1]
    corr_first = np.corrcoef(out.ravel(), frames[0].astype(float).ravel())[0, 1]
    assert corr_mid > 0.95
    assert corr_mid > corr_first


def test_colour_multi_frame_dicom() -> None:
    out = decode(render("dicom", str(DICOM / "examples_ybr_color.dcm")))  # 30 frames, JPEG YBR
    assert out.mode == "RGB"
    a = np.asarray(out).astype(int)
    assert a.std() > 10


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    src = DICOM / "MR_small.dcm"
    ds = pydicom.dcmread(src)
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = tmp_path / "mono1.dcm"
    ds.save_as(inverted)
    normal = np.asarray(decode(render("dicom", str(src)))).astype(int)
    flipped = np.asarray(decode(render("dicom", str(inverted)))).astype(int)
    # JPEG rounding aside, MONOCHROME1 shows low values white.
    assert np.abs((255 - normal) - flipped).mean() < 3


def test_series_shows_its_middle_slice() -> None:
    files = sorted(MR700.iterdir(), key=lambda p: int(pydicom.dcmread(p).InstanceNumber))
    kind, chosen = pick("dicom", [str(p) for p in files])  # type: ignore[misc]
    assert kind == "dicom"
    assert chosen == str(files[len(files) // 2])
    assert decode(render(kind, chosen)).size[0] > 0
    assert pick("frames", ["f0.jpg", "f1.jpg", "f2.jpg"]) == ("image", "f1.jpg")
    assert pick("video", ["v.mp4"]) == ("video", "v.mp4")
    assert pick("file", ["x.bin"]) is None
    assert pick("image", []) is None


# --- the cache ---------------------------------------------------------------------------------


async def test_cache_renders_once_per_key(tmp_path: Path) -> None:
    src = tmp_path / "a.png"
    Image.new("RGB", (600, 300), (10, 120, 200)).save(src)
    cache = ThumbCache(tmp_path / "thumbs")
    try:
        first = await cache.get("k1", "image", str(src))
        assert first is not None and first.is_file()
        mtime = first.stat().st_mtime_ns
        again = await cache.get("k1", "image", str(src))
        assert again == first
        assert cache.generated == 1
        assert first.stat().st_mtime_ns == mtime
        # Another cache over the same folder (a daemon restart) finds it on disk.
        other = ThumbCache(tmp_path / "thumbs")
        assert await other.get("k1", "image", str(src)) == first
        assert other.generated == 0
        other.close()
        # Concurrent requests for one new key share one render.
        results = await asyncio.gather(*(cache.get("k2", "image", str(src)) for _ in range(5)))
        assert len({str(r) for r in results}) == 1
        assert cache.generated == 2
    finally:
        cache.close()


async def test_unrenderable_is_remembered_and_a_failed_check_is_not(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    cache = ThumbCache(tmp_path / "thumbs")
    try:
        assert await cache.get("bad", "image", str(bad)) is None
        assert await cache.get("bad", "image", str(bad)) is None
        assert cache.generated == 1  # the .none marker stops a second decode
        good = tmp_path / "good.png"
        Image.new("RGB", (10, 10)).save(good)
        # The file is not (yet) the content the key names: nothing rendered, nothing kept.
        assert await cache.get("later", "image", str(good), check=lambda: False) is None
        assert cache.generated == 1
        assert await cache.get("later", "image", str(good), check=lambda: True) is not None
        assert cache.generated == 2
        assert not any(p.name.startswith(".thumb-") for p in (tmp_path / "thumbs").rglob("*"))
    finally:
        cache.close()


def test_render_runs_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache hands rendering to its own threads, never the loop's thread."""
    import threading

    seen: list[str] = []
    real = thumbs.render

    def spy(kind: str, path: str) -> bytes:
        seen.append(threading.current_thread().name)
        return real(kind, path)

    monkeypatch.setattr(thumbs, "render", spy)
    src = tmp_path / "a.png"
    Image.new("RGB", (20, 20)).save(src)

    async def go() -> None:
        cache = ThumbCache(tmp_path / "thumbs")
        try:
            assert await cache.get("k", "image", str(src)) is not None
        finally:
            cache.close()

    asyncio.run(go())
    assert seen and all(name.startswith("thumbs") for name in seen)


def test_dicom_copy_with_odd_name_still_renders(tmp_path: Path) -> None:
    # The store keeps blobs without extensions; content decides, not the name.
    blob = tmp_path / "0123abcd"
    shutil.copy(DICOM / "CT_small.dcm", blob)
    assert decode(render("dicom", str(blob))).size == (128, 128)
    video = tmp_path / "clip.mp4"
    write_video(video, frames=10, fps=10)
    renamed = tmp_path / "fedcba98"
    os.replace(video, renamed)
    assert decode(render("video", str(renamed))).size == (256, 192)


async def test_the_cache_keeps_the_most_recently_used_within_its_cap(tmp_path: Path) -> None:
    src = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(src)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    root = tmp_path / "thumbs"
    cache = ThumbCache(root, max_files=3)

    def kept() -> set[str]:
        return {p.stem for p in root.rglob("*") if p.suffix in (".jpg", ".none")}

    try:
        for key in ("k1", "k2", "k3"):
            assert await cache.get(key, "image", str(src)) is not None
        assert await cache.get("bad", "image", str(bad)) is None  # a .none marker counts too
        assert kept() == {"k2", "k3", "bad"}  # the oldest went to make room
        # Using k2 makes it recent; the next new key pushes out k3, the least recently used.
        for p in root.rglob("*"):
            if p.is_file():
                os.utime(p, (1_000_000, p.stat().st_mtime))  # all long unused
        assert await cache.get("k2", "image", str(src)) is not None
        cache.max_files, cache._until_prune = 3, 0  # prune at this render
        assert await cache.get("k4", "image", str(src)) is not None
        assert "k2" in kept() and "k4" in kept() and len(kept()) == 3
        assert cache.generated == 5  # k2 came from the cache
    finally:
        cache.close()
