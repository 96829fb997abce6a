"""Media preparation costs: DICOM header reading + series grouping of 1,000 files, and
downscaling 20 MP JPEGs to the 5000 px limit against a plain full decode of the same
files.

    .venv/bin/python bench/media_images_dicom.py [--runs N]

Each run writes its inputs into fresh folders (docs/design.md: file creation right after
mass deletion is slow for a while) and the figures are medians over runs. Everything
runs in this process, one file at a time: these are per-core costs, the daemon spreads
them over its worker pool.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from common import Workspace, drop_caches, machine_md, median, runs_arg, spread, table
from ingestd.media.dicom import read_header, slice_order_key
from ingestd.media.images import prepare_image
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

DICOM_FILES = 1_000
SERIES = 10  # 100 slices each
TAGS = ["Modality", "StudyInstanceUID", "SeriesInstanceUID", "SeriesDescription"]
JPEG_SIZE = (5472, 3648)  # 20 MP, a common DSLR/mirrorless sensor
JPEGS = 4  # per run
MAX_DIMENSION = 5000
SMALL_DIMENSION = 2048  # a >2x reduction: the libjpeg scaled-decode path


# --- DICOM ---------------------------------------------------------------------------


def dicom_sources() -> list[pydicom.Dataset]:
    """Real headers of different shapes and sizes: CT_small, MR_small and a CT series."""
    base = Path(get_testdata_file("CT_small.dcm")).parent
    paths = [base / "CT_small.dcm", base / "MR_small.dcm"]
    paths += sorted((base / "dicomdirtests" / "98892001" / "CT5N").iterdir())
    return [pydicom.dcmread(p) for p in paths]


def make_dicom_tree(root: Path, sources: list[pydicom.Dataset], seed: int) -> dict[str, list]:
    """SERIES series of equal size, one flat folder (a PACS export), shuffled random file
    names; InstanceNumber a shuffled 1..n per series. Returns the expected order."""
    rng = random.Random(seed)
    per = DICOM_FILES // SERIES
    expected: dict[str, list[str]] = {}
    for s in range(SERIES):
        src = sources[s % len(sources)]
        series_uid = generate_uid()
        numbers = list(range(1, per + 1))
        rng.shuffle(numbers)
        names = {}
        for n in numbers:
            src.SeriesInstanceUID = series_uid
            src.SOPInstanceUID = generate_uid()
            src.InstanceNumber = n
            name = f"{rng.getrandbits(64):016x}.dcm"
            src.save_as(root / name)
            names[n] = name
        expected[series_uid] = [names[n] for n in sorted(names)]
    return expected


def group_series(root: Path) -> dict[str, list[str]]:
    """What `series_by: uid` does: read every header, group by SeriesInstanceUID, order."""
    groups: dict[str, list] = defaultdict(list)
    with os.scandir(root) as it:
        for e in it:
            h = read_header(e.path, TAGS)
            groups[h.series_instance_uid].append((slice_order_key(h, e.name), e.name))
    return {uid: [name for _, name in sorted(items)] for uid, items in groups.items()}


def dicom_run(ws: Workspace, sources: list[pydicom.Dataset], i: int) -> dict[str, float]:
    root = ws.fresh("dicom")
    expected = make_dicom_tree(root, sources, seed=i)
    os.sync()
    group_series(root)  # warm: page cache, pydicom's lazy imports and dictionaries
    t = time.perf_counter()
    got = group_series(root)
    warm = time.perf_counter() - t
    if got != expected:
        raise RuntimeError("series grouping/ordering came out wrong")
    out = {"warm": DICOM_FILES / warm}
    if drop_caches():
        t = time.perf_counter()
        group_series(root)
        out["cold"] = DICOM_FILES / (time.perf_counter() - t)
    return out


# --- JPEG ----------------------------------------------------------------------------


def make_photo(path: Path, seed: int) -> None:
    """A 20 MP JPEG that compresses like a photo (~7 MB at quality 92): smooth regions,
    edges, and sensor-like noise. A flat or purely smooth image would decode and encode
    several times faster than a real one and flatter both sides of the comparison."""
    rng = np.random.default_rng(seed)
    w, h = JPEG_SIZE
    small = rng.integers(0, 256, size=(h // 64 + 1, w // 64 + 1, 3), dtype=np.uint8)
    base = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)  # smooth blobs
    a = np.asarray(base).astype(np.int16)
    blocks = rng.integers(0, 2, size=(h // 16 + 1, w // 16 + 1, 1), dtype=np.int16)
    a += np.repeat(np.repeat(blocks, 16, 0), 16, 1)[:h, :w] * 40 - 20  # hard edges
    a += rng.normal(0, 6, size=(h, w, 1)).astype(np.int16)  # luminance noise
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=92)


def decode(path: Path) -> None:
    with Image.open(path) as im:
        im.load()


def jpeg_run(ws: Workspace, i: int) -> dict[str, float]:
    src = ws.fresh("jpeg-src")
    make_photo(src / "master.jpg", seed=i)
    files = []
    for k in range(JPEGS):  # distinct files, so no run reads another's cached output
        p = src / f"IMG_{k:04d}.JPG"
        shutil.copyfile(src / "master.jpg", p)
        files.append(p)
    os.sync()
    for p in files:
        decode(p)  # page cache warm for every contender alike
    steps = {
        "decode": lambda: [decode(p) for p in files],
        f"downscale to {MAX_DIMENSION}": lambda: [
            prepare_image(str(p), str(ws.fresh("out")), MAX_DIMENSION, "downscale") for p in files
        ],
        f"downscale to {SMALL_DIMENSION}": lambda: [
            prepare_image(str(p), str(ws.fresh("out")), SMALL_DIMENSION, "downscale") for p in files
        ],
    }
    names = list(steps)
    order = names[i % len(names) :] + names[: i % len(names)]  # rotate: no order bias
    out = {"bytes": float((src / "master.jpg").stat().st_size)}
    for name in order:
        t = time.perf_counter()
        steps[name]()
        out[name] = (time.perf_counter() - t) / len(files)  # seconds per image
    return out


# --- report --------------------------------------------------------------------------


def main(runs: int | None = None) -> str:
    runs = runs or runs_arg(5)
    dicom: dict[str, list[float]] = defaultdict(list)
    jpeg: dict[str, list[float]] = defaultdict(list)
    sources = dicom_sources()
    with Workspace("media") as ws:
        for i in range(runs):
            d = dicom_run(ws, sources, i)
            j = jpeg_run(ws, i)
            for k, v in d.items():
                dicom[k].append(v)
            for k, v in j.items():
                jpeg[k].append(v)
            print(
                f"run {i + 1}/{runs}: dicom "
                + ", ".join(f"{k} {v:,.0f} files/s" for k, v in d.items())
                + "; jpeg "
                + ", ".join(f"{k} {v:.3f}s" for k, v in j.items() if k != "bytes"),
                file=sys.stderr,
            )

    mp = JPEG_SIZE[0] * JPEG_SIZE[1] / 1e6
    lines = [
        "### Media: DICOM headers and 20 MP JPEG downscaling",
        "",
        f"`.venv/bin/python bench/media_images_dicom.py --runs {runs}`; one process, one "
        "file at a time (per-core cost); fresh folders per run; medians, spread = min–max.",
        "",
        f"DICOM: {DICOM_FILES:,} files in one flat folder ({SERIES} series of "
        f"{DICOM_FILES // SERIES}, copies of pydicom's CT_small, MR_small and a CT series "
        "with new UIDs, shuffled InstanceNumbers and random names): header read "
        f"(stop before pixels, {len(TAGS)} metadata tags) + group by SeriesInstanceUID + "
        "order by slice_order_key, checked against the expected order.",
        "",
    ]
    rows = [
        [f"{k} cache", f"{median(v):,.0f}", spread(v), f"{DICOM_FILES / median(v):.2f}"]
        for k, v in dicom.items()
    ]
    lines.append(table(["DICOM", "files/s", "spread", f"s per {DICOM_FILES:,}"], rows))
    if "cold" not in dicom:
        lines.append("\n(cold-cache figure skipped: dropping caches needs root)")
    lines += [
        "",
        f"JPEG: {JPEG_SIZE[0]}×{JPEG_SIZE[1]} ({mp:.1f} MP, "
        f"{median(jpeg['bytes']) / 1e6:.1f} MB, quality 92, photo-like noise and edges), "
        f"{JPEGS} files per run, warm cache. `prepare_image` = full decode (scaled "
        "decode when ≥2× smaller) + LANCZOS + EXIF handling + JPEG q95 encode + rename.",
        "",
    ]
    base = median(jpeg["decode"])
    rows = []
    for name in ("decode", f"downscale to {MAX_DIMENSION}", f"downscale to {SMALL_DIMENSION}"):
        secs = jpeg[name]
        label = "PIL open + full decode (baseline)" if name == "decode" else name
        rows.append(
            [
                label,
                f"{median(secs) * 1000:,.0f}",
                f"{1 / median(secs):.2f}",
                f"{mp / median(secs):.0f}",
                f"{median(secs) / base:.2f}×",
            ]
        )
    lines.append(table(["20 MP JPEG", "ms/image", "images/s", "MP/s", "time vs decode"], rows))
    return "\n".join(lines)


if __name__ == "__main__":
    print(machine_md())
    print()
    print(main())
