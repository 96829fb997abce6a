"""Session-wide fixtures: the storage emulators (see tests/emulators.py).

Each starts on first use, once per test session, and is stopped at the end of the
session (and at interpreter exit, should the session die). A tool that cannot be
installed here skips the tests that need it, except under CI=true where it fails.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.emulators import (
    AzureEmulator,
    Emulator,
    GcsEmulator,
    S3Emulator,
    ToolMissing,
    need_tool,
    start_azure,
    start_gcs,
    start_s3,
)


def _run(start: object) -> Iterator[Emulator]:
    try:
        emu = start()  # type: ignore[operator]
    except ToolMissing as e:
        need_tool(str(e))
        raise  # unreachable: need_tool skips or fails
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture(scope="session")
def s3_emulator() -> Iterator[S3Emulator]:
    yield from _run(start_s3)  # type: ignore[misc]


@pytest.fixture(scope="session")
def azure_emulator() -> Iterator[AzureEmulator]:
    yield from _run(start_azure)  # type: ignore[misc]


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
    yield from _run(start_gcs)  # type: ignore[misc]
