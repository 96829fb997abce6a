"""Image checks and the oversize transform: displayed size, full-decode verification,
and an upright downscaled copy for images over a backend's size limit.

Everything here blocks (decoding a 20 MP JPEG takes a fair fraction of a second), so
the daemon runs these functions in its worker pool, never on the event loop. They hold
one image at a time, and never write to the source file.

Orientation: cameras store pixels as the sensor saw them and record the rotation in the
EXIF Orientation tag. Sizes here are the size *as displayed* (orientations 5–8 swap
width and height), because that is what a labeler sees and what a backend's
"same size" or "max dimension" rule is about.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image, ImageFile, UnidentifiedImageError
from PIL.JpegImagePlugin import get_sampling

from ingestd.core.errors import MediaError, SourceChangedError
from ingestd.core.rawnames import shown
from ingestd.core.regular import open_regular_file

__all__ = [
    "MAX_PIXELS",
    "ImageInfo",
    "image_info",
    "image_size",
    "prepare_image",
    "same_size",
    "verify_image",
]

# Pillow's default bomb limit (~179 MP, error at twice that) rejects real scans and
# stitched panoramas. 1 gigapixel still stops a 40-byte PNG that claims 100k x 100k from
# taking the host's memory; Pillow errors at 2x its limit, so we check our own limit
# against the header first and give Pillow the same number as a backstop.
MAX_PIXELS = 1_000_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Pillow warns between 1x and 2x its limit; _info() turns that range into a MediaError
# with the file named, so the warning would only be noise in the daemon's log.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# A truncated file must fail, not decode into a grey bottom half that gets uploaded.
# Set here as well as checked at use: the flag is process-global and another library
# could flip it.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that makes the pixels upright. Same table as
# ImageOps.exif_transpose, applied here to the already-downscaled image (cheaper than
# rotating 20 MP first) and from an orientation read once from the header.
_UPRIGHT: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Source format -> (format to write, file extension). Formats we can write back keep
# their format; GIF goes to PNG because re-quantising a resampled image to 256 colours
# would visibly damage it. Anything else (e.g. ICO, PPM) also becomes PNG.
_OUTPUT: dict[str, tuple[str, str]] = {
    "JPEG": ("JPEG", ".jpg"),
    "MPO": ("JPEG", ".jpg"),  # multi-picture JPEG (many cameras): the primary image
    "PNG": ("PNG", ".png"),
    "WEBP": ("WEBP", ".webp"),
    "TIFF": ("TIFF", ".tif"),
    "BMP": ("BMP", ".bmp"),
}
_JPEG_QUALITY = 95
_EXIF_MAX = 65533  # one JPEG APP1 segment; Pillow refuses bigger EXIF blocks


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the header says: stored size, EXIF orientation, format, frame count."""

    width: int  # as stored, before orientation
    height: int
    orientation: int  # EXIF 1..8 (1 when absent or unreadable)
    format: str  # Pillow's format name: JPEG, MPO, PNG, WEBP, TIFF, BMP, GIF, ...
    frames: int

    @property
    def displayed(self) -> tuple[int, int]:
        if self.orientation in (5, 6, 7, 8):
            return self.height, self.width
        return self.width, self.height


def _name(path: str) -> str:
    return shown(os.path.basename(path) or path)  # reasons reach the ledger: no surrogates


@contextlib.contextmanager
def _open(path: str) -> Iterator[Image.Image]:
    """Lazy open (reads the header only), with every failure turned into a reason. The
    file is opened regular-only (core.regular): a FIFO swapped in for an image after it
    was hashed fails the item instead of blocking the media pool."""
    try:
        fh = open_regular_file(path)
    except FileNotFoundError:
        raise SourceChangedError(f"{path} vanished before it could be read") from None
    except IsADirectoryError:
        raise SourceChangedError(f"{path} is now a folder") from None
    except OSError as e:
        raise MediaError(f"{_name(path)}: cannot read the image: {e.strerror}") from None
    # Pillow leaves a file object it was handed open; `with fh` closes it.
    with fh, _open_image(path, fh) as im:
        yield im


def _open_image(path: str, fh: Any) -> Image.Image:
    try:
        return Image.open(fh)
    except FileNotFoundError:
        raise SourceChangedError(f"{path} vanished before it could be read") from None
    except IsADirectoryError:
        raise SourceChangedError(f"{path} is now a folder") from None
    except UnidentifiedImageError:
        raise MediaError(
            f"{_name(path)}: not a readable image (unknown format or damaged header)"
        ) from None
    except Image.DecompressionBombError as e:
        raise MediaError(f"{_name(path)}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if "truncated" in str(e).lower() or isinstance(e, EOFError):
            raise MediaError(
                f"{_name(path)}: truncated image: the file ends inside its header"
            ) from None
        raise MediaError(f"{_name(path)}: cannot read the image header: {e}") from None


def _orientation(im: Image.Image) -> int:
    """EXIF orientation (1–8) from data already read with the header.

    PNG keeps EXIF in an eXIf chunk that may follow the pixel data, and Pillow's
    PngImageFile.getexif() decodes the whole image to look for it; a header-only size
    read must not do that, so for PNG only an eXIf chunk before the pixels counts.
    """
    try:
        if im.format == "PNG":
            raw = im.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = im.getexif()
        value = int(exif.get(_ORIENTATION_TAG, 1))
    except Exception:
        # A damaged EXIF block should not make a decodable image unusable; showing it
        # unrotated is what most viewers do too.
        return 1
    return value if 1 <= value <= 8 else 1


def _info(path: str, im: Image.Image) -> ImageInfo:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise MediaError(f"{_name(path)}: image header says {w}×{h} px")
    if w * h > MAX_PIXELS:
        raise MediaError(
            f"{_name(path)}: {w}×{h} px ({w * h / 1e6:,.0f} MP) is over the "
            f"{MAX_PIXELS / 1e6:,.0f} MP safety limit for decoding"
        )
    return ImageInfo(w, h, _orientation(im), im.format or "?", int(getattr(im, "n_frames", 1) or 1))


def image_info(path: str) -> ImageInfo:
    """Header-only facts about an image (no pixel decoding)."""
    with _open(path) as im:
        return _info(path, im)


def image_size(path: str) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF orientation, from the header only."""
    return image_info(path).displayed


def _decode_failure(path: str, fmt: str, e: BaseException) -> MediaError:
    """A precise reason for an exception raised while decoding pixels."""
    name = _name(path)
    msg = str(e)
    if isinstance(e, Image.DecompressionBombError):
        return MediaError(f"{name}: {msg}")
    if "truncated" in msg.lower() or isinstance(e, EOFError):
        return MediaError(f"{name}: truncated {fmt}: image data ends early ({msg})")
    return MediaError(f"{name}: corrupt {fmt}: {msg or type(e).__name__}")


_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _check_strict() -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone in the process turned on lenient decoding; we would upload garbage.
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def verify_image(path: str) -> None:
    """Decode every pixel (of every frame) so truncated or corrupt files fail here, with
    a reason, instead of reaching a dataset as a half-grey picture."""
    _check_strict()
    with _open(path) as im:
        info = _info(path, im)
        fmt = info.format
        try:
            if fmt == "PNG":
                # verify() checks every chunk CRC (load() does not), catching flipped
                # bytes that still inflate; it leaves the object unusable, so reopen.
                im.verify()
        except _DECODE_ERRORS as e:
            raise _decode_failure(path, fmt, e) from None
    with _open(path) as im:
        try:
            frames = 1 if fmt == "MPO" else info.frames  # MPO extras are previews
            for i in range(frames):
                if i:
                    im.seek(i)
                im.load()
        except _DECODE_ERRORS as e:
            raise _decode_failure(path, fmt, e) from None


def same_size(paths: Sequence[str]) -> str | None:
    """The first file whose displayed size differs from the first file's, or None."""
    if not paths:
        return None
    first = image_size(paths[0])
    for p in paths[1:]:
        if image_size(p) != first:
            return p
    return None


def _target(displayed: tuple[int, int], max_dimension: int) -> tuple[int, int]:
    """Displayed size scaled so the long side is exactly max_dimension."""
    w, h = displayed
    if w >= h:
        return max_dimension, max(1, round(h * max_dimension / w))
    return max(1, round(w * max_dimension / h)), max_dimension


def _resizable(im: Image.Image) -> Image.Image:
    """A mode LANCZOS can work in (Pillow silently uses NEAREST for 1 and P)."""
    if im.mode == "1":
        return im.convert("L")
    if im.mode in ("P", "PA"):
        has_alpha = im.mode == "PA" or "transparency" in im.info
        return im.convert("RGBA" if has_alpha else "RGB")
    return im


def _save_params(src: Image.Image, out_format: str) -> dict[str, Any]:
    """Encoder settings: keep colour profile, resolution and (orientation-free) EXIF;
    everything else, notably XMP that may repeat the orientation, is left behind."""
    params: dict[str, Any] = {}
    icc = src.info.get("icc_profile")
    if icc:
        params["icc_profile"] = icc
    dpi = src.info.get("dpi")
    if dpi and out_format in ("JPEG", "PNG", "TIFF", "BMP"):
        params["dpi"] = dpi
    if out_format in ("JPEG", "WEBP") and src.format in ("JPEG", "MPO", "WEBP"):
        # Camera EXIF (exposure, GPS, ...) stays with the picture, minus the orientation
        # we have applied. TIFF sources are left out: their "EXIF" is the IFD itself,
        # strip offsets included, and must not be copied into another file.
        try:
            exif = src.getexif()
            exif.pop(_ORIENTATION_TAG, None)
            blob = exif.tobytes() if len(exif) else b""
        except Exception:
            blob = b""
        if blob and len(blob) <= _EXIF_MAX:
            params["exif"] = blob
    if out_format == "JPEG":
        params["quality"] = _JPEG_QUALITY
        sampling = get_sampling(src)
        if sampling >= 0:
            params["subsampling"] = sampling  # keep the camera's chroma resolution
    elif out_format == "WEBP":
        params["quality"] = _JPEG_QUALITY
    elif out_format == "TIFF":
        params["compression"] = "tiff_deflate"
    return params


def _output_name(src: str, max_dimension: int, ext: str) -> str:
    """A name unique per source path, so two workers preparing `a/x.jpg` and `b/x.jpg`
    into one spool folder never overwrite each other, yet stable across attempts."""
    stem = os.path.splitext(os.path.basename(src))[0][:80] or "image"
    tag = hashlib.sha256(os.path.abspath(src).encode("utf-8", "surrogateescape")).hexdigest()
    return f"{stem}.{tag[:12]}.{max_dimension}px{ext}"


def prepare_image(
    src: str,
    out_dir: str,
    max_dimension: int,
    oversize: Literal["downscale", "reject"],
) -> str | None:
    """None when the original can be sent as is (fits and fully decodes); otherwise
    reject it with the size in the reason, or write an upright copy whose long side is
    exactly max_dimension into out_dir and return its path. The source is only read."""
    info = image_info(src)
    dw, dh = info.displayed
    if max(dw, dh) <= max_dimension:
        verify_image(src)
        return None
    name = _name(src)
    if oversize == "reject":
        raise MediaError(
            f"{name}: {dw}×{dh} px is over max_dimension {max_dimension}; resize it to "
            f"at most {max_dimension} px on its long side, or set images.oversize: "
            f"downscale (or a larger images.max_dimension if the backend allows it)"
        )
    if info.frames > 1 and info.format not in ("MPO",):
        raise MediaError(
            f"{name}: {dw}×{dh} px {info.format} with {info.frames} frames/pages is over "
            f"max_dimension {max_dimension}, and only single-frame images are downscaled"
        )
    out_format, ext = _OUTPUT.get(info.format, ("PNG", ".png"))
    tw, th = _target((dw, dh), max_dimension)
    # Resize in stored orientation, then rotate the small result.
    swap = info.orientation in (5, 6, 7, 8)
    stored_target = (th, tw) if swap else (tw, th)

    _check_strict()
    with _open(src) as im:
        fmt = info.format
        try:
            if fmt in ("JPEG", "MPO"):
                # libjpeg can decode at 1/2, 1/4 or 1/8 scale straight from the DCT
                # coefficients; draft() picks the largest factor that still leaves the
                # image at least as big as the target, so LANCZOS finishes the job from
                # a much smaller buffer (or does nothing here when under 2x).
                im.draft(None, stored_target)
            im.load()
            params = _save_params(im, out_format)
            work = _resizable(im)
            if work.size != stored_target:
                # reducing_gap: a cheap box reduction first when the factor is large
                # (non-JPEG sources); beyond 3x the result is indistinguishable.
                work = work.resize(stored_target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        except _DECODE_ERRORS as e:
            raise _decode_failure(src, fmt, e) from None
    method = _UPRIGHT.get(info.orientation)
    if method is not None:
        work = work.transpose(method)
    work.info = {}  # nothing from the source's info leaks into the encoder implicitly
    if out_format == "JPEG" and work.mode not in ("L", "RGB", "CMYK"):
        work = work.convert("RGB")  # JPEG sources decode to these; be safe anyway

    os.makedirs(out_dir, exist_ok=True)
    try:
        return _write(work, out_dir, _output_name(src, max_dimension, ext), out_format, params)
    except (OSError, ValueError, KeyError) as e:
        if out_format == "PNG":
            raise MediaError(f"{name}: cannot write the downscaled copy: {e}") from None
    # The source format cannot hold this mode (e.g. a 16-bit or float TIFF variant that
    # WebP or BMP cannot store): PNG holds nearly every mode losslessly.
    if work.mode not in ("1", "L", "LA", "I", "I;16", "RGB", "RGBA"):
        work = work.convert("RGBA" if "A" in work.mode else "RGB")
    png = {k: v for k, v in params.items() if k in ("icc_profile", "dpi")}
    try:
        return _write(work, out_dir, _output_name(src, max_dimension, ".png"), "PNG", png)
    except (OSError, ValueError, KeyError) as e:
        raise MediaError(f"{name}: cannot write the downscaled copy: {e}") from None


def _write(im: Image.Image, out_dir: str, filename: str, fmt: str, params: dict[str, Any]) -> str:
    """Encode to a temp name and rename, so nobody ever sees (or uploads) half a file.
    No fsync: the spool is re-creatable from the source, a crash just means the item
    is prepared again."""
    final = os.path.join(out_dir, filename)
    fd, tmp = tempfile.mkstemp(prefix=".prep-", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            im.save(fh, format=fmt, **params)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return final
