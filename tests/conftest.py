"""Session-wide fixtures: the storage emulators (tests/support/emulators.py).

`.ci/run` starts them before pytest and passes their endpoints in INGESTD_TEST_*
variables; these fixtures only connect (each test makes its own buckets). Without the
variables a test that needs an emulator skips, or fails under CI=true (`need`). To run
such tests by hand: `. .ci/services.sh && start_services`, then pytest.
"""

from __future__ import annotations

import pytest

from tests.support.emulators import (
    ENDPOINT_VARS,
    NAMES,
    AzureEmulator,
    Emulator,
    GcsEmulator,
    S3Emulator,
    answers,
    from_env,
)
from tests.support.need import need


def _connect(scheme: str) -> Emulator:
    var = ENDPOINT_VARS[scheme]
    emu = from_env(scheme)
    need(
        emu is not None,
        f"the {NAMES[scheme]} emulator is not running ({var} is not set): "
        "run `bash .ci/run`, or `. .ci/services.sh && start_services` before pytest",
    )
    assert emu is not None
    if not answers(emu.endpoint):
        pytest.fail(f"nothing answers at {var}={emu.endpoint} (stopped emulators?)", pytrace=False)
    return emu


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `longest` first: with one pytest worker per core (.ci/run), the
    first worker starts on them while the other takes the rest, instead of one of them
    starting minutes before the end."""
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)


@pytest.fixture(scope="session")
def s3_emulator() -> S3Emulator:
    emu = _connect("s3")
    assert isinstance(emu, S3Emulator)
    return emu


@pytest.fixture(scope="session")
def azure_emulator() -> AzureEmulator:
    emu = _connect("az")
    assert isinstance(emu, AzureEmulator)
    return emu


@pytest.fixture(scope="session")
def gcs_emulator() -> GcsEmulator:
    emu = _connect("gs")
    assert isinstance(emu, GcsEmulator)
    return emu
