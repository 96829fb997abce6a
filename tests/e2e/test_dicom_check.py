"""A file sent as a `dicom` slot is checked to be DICOM whatever `deidentify` says
(issue 14, point 4): its header is parsed (not its pixels) in the media pool before the
item goes. Real files: pydicom's bundled CT_small.dcm, and broken copies of it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pydicom

from tests.support.daemon import Env
from tests.support.wait import wait_for

CT = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


def watch_where(env: Env, **want: int) -> dict[str, Any] | None:
    st = env.watch_status("w")
    return st if all(st[k] == v for k, v in want.items()) else None


def test_non_dicom_dcm_files_fail_with_a_reason_and_real_dicom_syncs(env: Env) -> None:
    drop = env.drop()
    env.write_config([{"name": "w", "source": str(drop), "dataset": "ds"}])
    env.start()
    real = CT.read_bytes()
    # Staged under hidden names, then renamed: each file is complete when first seen.
    broken = {
        "text.dcm": b"this is a text file, exported under the wrong name\n" * 20,
        "garbage.dcm": b"\0" * 128 + b"DICM" + os.urandom(4000),
        "cut.dcm": real[:1000],  # the header cut short
    }
    for name, data in {**broken, "good.dcm": real}.items():
        (drop / f".{name}").write_bytes(data)
        (drop / f".{name}").rename(drop / name)

    st = wait_for(
        lambda: watch_where(env, synced=1, failed=3, pending=0),
        60,
        0.3,
        "the real DICOM synced and the 3 others failed",
    )
    errors = {e["item"]: e["error"] for e in st["last_errors"]}
    assert set(errors) == {f"/{n}" for n in broken}, errors
    for name in broken:
        reason = errors[f"/{name}"]
        assert reason.startswith(f"{name} is not a DICOM file: "), reason
        assert reason.endswith("export it again or exclude it"), reason
    assert "truncated" in errors["/cut.dcm"], errors["/cut.dcm"]
    item = env.items_by_key()["/good.dcm"]
    [slot] = item["slots"]
    assert slot["type"] == "dicom"
    assert slot["files"][0]["digest"] == "sha256:" + hashlib.sha256(real).hexdigest()
    assert set(env.items_by_key()) == {"/good.dcm"}
    assert env.stop() == 0
