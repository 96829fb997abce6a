"""One rule for a test that cannot run because a part of its set-up is missing (a Debian
package, an emulator, a console script): outside CI it skips, saying what is missing;
under CI=true it fails, because `.ci/run` provides every part and a skip there would
hide a test that never ran.

Skips that are about the machine rather than a missing part (running as root, live
platform tests without API keys) stay plain `pytest.skip`.
"""

from __future__ import annotations

import os

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def need(condition: object, reason: str) -> None:
    """Carry on when `condition` holds; otherwise skip (fail under CI=true) with `reason`."""
    if condition:
        return
    if under_ci():
        pytest.fail(f"{reason} (CI=true: .ci/run provides every part)", pytrace=False)
    pytest.skip(reason)
