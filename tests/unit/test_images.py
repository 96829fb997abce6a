"""media/images.py on real files written by Pillow: displayed sizes, verification of
truncated and corrupt files, and the oversize transform (downscale upright / reject)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from ingestd.core.errors import MediaError, SourceChangedError
from ingestd.media.images import (
    image_info,
    image_size,
    prepare_image,
    same_size,
    verify_image,
)
from PIL import Image, ImageCms, ImageFile, ImageOps

RED = (255, 0, 0)
MARK = 400  # marker square painted at stored pixel (0, 0)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth gradient with some noise (compresses like a photo, not like a flat fill),
    and a red square in the stored top-left corner so orientation can be checked."""
    rng = np.random.default_rng(seed)
    x = np.arange(w, dtype=np.int32)[None, :]
    y = np.arange(h, dtype=np.int32)[:, None]
    a = np.empty((h, w, 3), np.uint8)
    a[..., 0] = x * 200 // w + 20
    a[..., 1] = y * 200 // h + 20
    a[..., 2] = ((x // 50 + y // 50) % 2) * 60 + 80
    # A small noise tile repeated: photo-like entropy without generating 72 M randoms.
    tile = rng.integers(0, 16, size=(64, 64, 3), dtype=np.uint8)
    a += np.tile(tile, (h // 64 + 1, w // 64 + 1, 1))[:h, :w]
    m = min(MARK, w // 4, h // 4)
    a[:m, :m] = RED
    return Image.fromarray(a, "RGB")


def save_jpeg(path: Path, im: Image.Image, orientation: int | None = None, **kw: object) -> Path:
    exif = Image.Exif()
    exif[0x010F] = "TestCam"  # Make: must survive the transform
    if orientation is not None:
        exif[0x0112] = orientation
    im.save(path, "JPEG", quality=90, exif=exif.tobytes(), **kw)
    return path


def is_red(px: np.ndarray) -> bool:
    r, g, b = (int(v) for v in px[:3])
    return r > 200 and g < 60 and b < 60


@pytest.fixture(scope="module")
def big_rotated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6000 x 4000 stored, EXIF orientation 6 (camera held upright: shown 4000 x 6000)."""
    d = tmp_path_factory.mktemp("big")
    return save_jpeg(d / "IMG_0001.JPG", photo(6000, 4000), orientation=6)


# --- sizes ---------------------------------------------------------------------------


def test_size_is_as_displayed_and_read_from_the_header(big_rotated: Path) -> None:
    assert image_size(str(big_rotated)) == (4000, 6000)
    info = image_info(str(big_rotated))
    assert (info.width, info.height, info.orientation, info.format) == (6000, 4000, 6, "JPEG")


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [(None, (300, 200)), (1, (300, 200)), (3, (300, 200)), (5, (200, 300)), (8, (200, 300))],
)
def test_orientation_swaps_only_for_5_to_8(
    tmp_path: Path, orientation: int | None, expected: tuple[int, int]
) -> None:
    p = save_jpeg(tmp_path / "a.jpg", photo(300, 200), orientation=orientation)
    assert image_size(str(p)) == expected


def test_png_size_does_not_decode_the_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    p = tmp_path / "a.png"
    photo(320, 240).save(p)

    def boom(self: Image.Image) -> None:
        raise AssertionError("decoded pixels for a header-only size read")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    assert image_size(str(p)) == (320, 240)


def test_not_an_image_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a JPEG\n")
    with pytest.raises(MediaError, match=r"notes\.jpg: not a readable image"):
        image_size(str(p))


def test_missing_file_is_a_source_change_not_a_bad_image(tmp_path: Path) -> None:
    with pytest.raises(SourceChangedError):
        image_size(str(tmp_path / "gone.jpg"))


def test_same_size_names_the_odd_file(tmp_path: Path) -> None:
    paths = []
    for name, size in [("r.png", (64, 48)), ("g.png", (64, 48)), ("b.png", (64, 50))]:
        Image.new("L", size).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    assert same_size(paths[:2]) is None
    assert same_size(paths) == paths[2]
    assert same_size([]) is None


def test_same_size_compares_displayed_sizes(tmp_path: Path) -> None:
    a = save_jpeg(tmp_path / "a.jpg", photo(300, 200))
    b = save_jpeg(tmp_path / "b.jpg", photo(200, 300))
    c = save_jpeg(tmp_path / "c.jpg", photo(300, 200), orientation=6)  # shown 200 x 300
    assert same_size([str(b), str(c)]) is None
    assert same_size([str(a), str(c)]) == str(c)


# --- verification --------------------------------------------------------------------


def test_truncated_jpeg_fails_with_a_reason(tmp_path: Path) -> None:
    whole = save_jpeg(tmp_path / "whole.jpg", photo(800, 600))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    verify_image(str(whole))
    with pytest.raises(MediaError, match=r"cut\.jpg: truncated JPEG: image data ends early"):
        verify_image(str(cut))
    # The header is intact, so the size alone does not notice...
    assert image_size(str(cut)) == (800, 600)
    # ...but preparing it does, on both paths (fits as is / needs downscaling).
    with pytest.raises(MediaError, match="truncated JPEG"):
        prepare_image(str(cut), str(tmp_path / "out"), 5000, "downscale")
    with pytest.raises(MediaError, match="truncated JPEG"):
        prepare_image(str(cut), str(tmp_path / "out"), 400, "downscale")


def test_truncated_png_fails(tmp_path: Path) -> None:
    whole = tmp_path / "whole.png"
    photo(400, 300).save(whole)
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    with pytest.raises(MediaError, match=r"cut\.png: truncated PNG"):
        verify_image(str(cut))


def test_corrupt_png_fails_on_its_checksum(tmp_path: Path) -> None:
    whole = tmp_path / "whole.png"
    photo(400, 300).save(whole)
    data = bytearray(whole.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    with pytest.raises(MediaError, match=r"bad\.png: corrupt PNG"):
        verify_image(str(bad))


def test_verification_ignores_a_lenient_global_setting(tmp_path: Path) -> None:
    whole = save_jpeg(tmp_path / "whole.jpg", photo(400, 300))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # as some other library might
    try:
        with pytest.raises(MediaError, match="truncated"):
            verify_image(str(cut))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP", "GIF"])
def test_other_formats_verify(tmp_path: Path, fmt: str) -> None:
    p = tmp_path / f"a.{fmt.lower()}"
    photo(120, 80).save(p, fmt)
    verify_image(str(p))
    assert image_size(str(p)) == (120, 80)


# --- prepare_image -------------------------------------------------------------------


def test_small_image_is_sent_as_is(tmp_path: Path) -> None:
    p = save_jpeg(tmp_path / "small.jpg", photo(640, 480))
    out = tmp_path / "out"
    assert prepare_image(str(p), str(out), 5000, "downscale") is None
    assert prepare_image(str(p), str(out), 640, "reject") is None  # the limit is inclusive
    assert not out.exists() or not any(out.iterdir())


def test_oversize_reject_names_the_size_and_limit(big_rotated: Path, tmp_path: Path) -> None:
    before = sha(big_rotated)
    with pytest.raises(MediaError) as e:
        prepare_image(str(big_rotated), str(tmp_path / "out"), 5000, "reject")
    assert "IMG_0001.JPG: 4000×6000 px is over max_dimension 5000" in e.value.reason
    assert "images.oversize" in e.value.reason  # says how to fix it
    assert sha(big_rotated) == before


def test_oversize_downscale_is_upright_and_leaves_the_original(
    big_rotated: Path, tmp_path: Path
) -> None:
    before = sha(big_rotated)
    before_stat = big_rotated.stat()
    out = prepare_image(str(big_rotated), str(tmp_path / "out"), 5000, "downscale")
    assert out is not None and Path(out).parent == tmp_path / "out"
    assert sha(big_rotated) == before
    assert big_rotated.stat().st_mtime_ns == before_stat.st_mtime_ns

    with Image.open(out) as im:
        assert im.format == "JPEG"
        assert im.size == (3333, 5000)  # upright: taller than wide, long side exactly 5000
        exif = im.getexif()
        assert exif.get(0x0112) in (None, 1)  # orientation applied, so not re-applied
        assert exif.get(0x010F) == "TestCam"  # the rest of the EXIF survives
        a = np.asarray(im.convert("RGB"))
    # Orientation 6 means "rotate 90° clockwise to display": the stored top-left corner
    # is shown top-right. The marker must be there and nowhere else.
    m = MARK * 5000 // 6000
    assert is_red(a[m // 2, -m // 2])
    for y, x in [(m // 2, m // 2), (-m // 2, m // 2), (-m // 2, -m // 2)]:
        assert not is_red(a[y, x])
    # And it matches Pillow's own reading of the orientation, pixel for pixel (roughly).
    with Image.open(big_rotated) as src:
        src.draft("RGB", (1000, 1500))  # compare at a coarse scale: cheap, and enough
        ref = ImageOps.exif_transpose(src).resize((333, 500), Image.Resampling.BOX)
    got = Image.fromarray(a).resize((333, 500), Image.Resampling.BOX)
    assert np.abs(np.asarray(ref).astype(int) - np.asarray(got).astype(int)).mean() < 3


@pytest.mark.parametrize(
    ("orientation", "corner"),
    [(1, "tl"), (2, "tr"), (3, "br"), (4, "bl"), (5, "tl"), (6, "tr"), (7, "br"), (8, "bl")],
)
def test_every_orientation_lands_upright(tmp_path: Path, orientation: int, corner: str) -> None:
    p = save_jpeg(tmp_path / "o.jpg", photo(1200, 800), orientation=orientation)
    out = prepare_image(str(p), str(tmp_path / "out"), 600, "downscale")
    assert out is not None
    with Image.open(out) as im:
        swapped = orientation >= 5
        assert im.size == ((400, 600) if swapped else (600, 400))
        a = np.asarray(im.convert("RGB"))
    k = 40
    where = {"tl": (k, k), "tr": (k, -k), "bl": (-k, k), "br": (-k, -k)}
    for name, (y, x) in where.items():
        assert is_red(a[y, x]) == (name == corner), (orientation, name)


def test_draft_decoding_keeps_quality(tmp_path: Path) -> None:
    """A 4x reduction goes through libjpeg's scaled decode; the result must still look
    like a proper LANCZOS reduction of the full image."""
    p = save_jpeg(tmp_path / "d.jpg", photo(4000, 3000))
    out = prepare_image(str(p), str(tmp_path / "out"), 1000, "downscale")
    assert out is not None
    with Image.open(out) as im, Image.open(p) as src:
        assert im.size == (1000, 750)
        ref = src.convert("RGB").resize((1000, 750), Image.Resampling.LANCZOS)
        diff = np.abs(np.asarray(ref).astype(int) - np.asarray(im).astype(int))
    assert diff.mean() < 3


def test_png_downscale_keeps_format_alpha_and_icc(tmp_path: Path) -> None:
    p = tmp_path / "scan.png"
    im = photo(3000, 1000).convert("RGBA")
    im.putpixel((2999, 999), (0, 0, 0, 0))
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    im.save(p, icc_profile=icc)
    before = sha(p)
    out = prepare_image(str(p), str(tmp_path / "out"), 1500, "downscale")
    assert out is not None and out.endswith(".png")
    with Image.open(out) as r:
        assert r.format == "PNG" and r.mode == "RGBA" and r.size == (1500, 500)
        assert r.info.get("icc_profile") == icc
        assert r.getpixel((1499, 499))[3] < 255  # transparency survived the resample
    assert sha(p) == before


def test_palette_image_is_resampled_in_colour(tmp_path: Path) -> None:
    p = tmp_path / "p.png"
    photo(800, 400).convert("P", palette=Image.Palette.ADAPTIVE).save(p)
    out = prepare_image(str(p), str(tmp_path / "out"), 400, "downscale")
    assert out is not None
    with Image.open(out) as r:
        assert r.mode == "RGB" and r.size == (400, 200)


@pytest.mark.parametrize("fmt", ["TIFF", "WEBP", "BMP"])
def test_other_formats_downscale_in_their_format(tmp_path: Path, fmt: str) -> None:
    p = tmp_path / f"a.{fmt.lower()}"
    photo(1000, 500).save(p, fmt)
    out = prepare_image(str(p), str(tmp_path / "out"), 500, "downscale")
    assert out is not None
    with Image.open(out) as r:
        assert r.format == fmt and r.size == (500, 250)


def test_outputs_for_same_named_sources_do_not_collide(tmp_path: Path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    save_jpeg(a / "x.jpg", photo(1000, 500, seed=1))
    save_jpeg(b / "x.jpg", photo(500, 1000, seed=2))
    out = tmp_path / "out"
    pa = prepare_image(str(a / "x.jpg"), str(out), 400, "downscale")
    pb = prepare_image(str(b / "x.jpg"), str(out), 400, "downscale")
    assert pa != pb
    assert image_size(str(pa)) == (400, 200)
    assert image_size(str(pb)) == (200, 400)
    assert sorted(p.name for p in out.iterdir()) == sorted([Path(pa).name, Path(pb).name])


def test_animated_gif_over_the_limit_is_refused_not_flattened(tmp_path: Path) -> None:
    p = tmp_path / "anim.gif"
    frames = [photo(600, 300, seed=i).convert("P") for i in range(3)]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100)
    with pytest.raises(MediaError, match="3 frames"):
        prepare_image(str(p), str(tmp_path / "out"), 300, "downscale")
    verify_image(str(p))  # decodes every frame


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused_from_the_header(tmp_path: Path) -> None:
    """A tiny PNG claiming 40000 x 40000 px (1.6 GP) is refused before any decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
    p = tmp_path / "bomb.png"
    p.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 100))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(MediaError, match=r"bomb\.png: .*(safety limit|decompression bomb)"):
        prepare_image(str(p), str(tmp_path / "out"), 5000, "downscale")
