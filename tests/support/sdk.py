"""The platforms' official SDKs, each in its own venv (`.cache/sdk/<name>`, made by
`.ci/run` from `.ci/sdk/<name>.txt`), for the tests that drive an SDK against our fake
of its platform: the fake is only worth its tests if the real client agrees with it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.support.need import need

REPO = Path(__file__).resolve().parents[2]
SDKS = {"darwin": "darwin-py", "labelbox": "labelbox", "nucleus": "scale-nucleus"}


def sdk_python(name: str) -> Path:
    """The interpreter of the venv holding SDK `name` (skips, or fails under CI, when
    `.ci/run` has not made it)."""
    python = REPO / ".cache" / "sdk" / name / "bin" / "python"
    need(python.exists(), f"no {SDKS[name]} venv at {python.parent.parent}: run `bash .ci/run`")
    return python


def run_sdk(
    name: str, script: str, *, env: dict[str, str] | None = None, timeout: float = 300
) -> dict:
    """Run `script` with SDK `name`'s interpreter; it prints one JSON document last,
    which is returned. A failing script fails the test with its output."""
    proc = subprocess.run(
        [str(sdk_python(name)), "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{SDKS[name]} script failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-4000:]}"
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines:
        raise AssertionError(f"{SDKS[name]} script printed nothing; stderr:\n{proc.stderr}")
    return json.loads(lines[-1])


__all__ = ["REPO", "SDKS", "run_sdk", "sdk_python"]
