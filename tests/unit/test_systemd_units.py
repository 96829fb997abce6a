"""The systemd units: `systemd-analyze verify` is clean, `systemd-analyze security
--offline=true` rates each 2.0 or lower, and they say what the daemon relies on.

systemd-analyze comes with Debian's `systemd` package, which `.ci/run` installs; without
it these tests skip, and fail under CI=true (`need`). `verify` checks that
ExecStart's binary exists, so it runs on a copy of each unit whose ExecStart names this
venv's `ingestd` script instead of /usr/local/bin/ingestd; nothing else is changed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.need import need
from tests.support.syscall_sandbox import find_systemd_analyze, read_unit, systemd_version

REPO = Path(__file__).resolve().parents[2]
UNITS = {
    "ingestd.service": REPO / "systemd" / "ingestd.service",
    "ingestd@.service": REPO / "systemd" / "ingestd@.service",
}
INSTALLED_BINARY = "/usr/local/bin/ingestd"
MAX_EXPOSURE = 2.0


@pytest.fixture(scope="session")
def analyze() -> str:
    path, why = find_systemd_analyze()
    need(path is not None, why)
    assert path is not None
    return path


def venv_ingestd() -> str:
    script = Path(sys.executable).parent / "ingestd"
    if script.exists():
        return str(script)
    found = shutil.which("ingestd")
    need(found is not None, "no `ingestd` console script (pip install -e . first)")
    assert found is not None
    return found


def copy_for_verify(unit: Path, dest_dir: Path) -> Path:
    text = unit.read_text()
    exec_start = f"ExecStart={INSTALLED_BINARY} "
    assert text.count(exec_start) == 1, f"{unit.name}: expected one {exec_start!r} line"
    dest = dest_dir / unit.name
    dest.write_text(text.replace(exec_start, f"ExecStart={venv_ingestd()} "))
    return dest


@pytest.mark.parametrize("name", [*UNITS, "ingestd@photos.service"])
def test_verify_is_clean(analyze: str, tmp_path: Path, name: str) -> None:
    for unit in UNITS.values():
        copy_for_verify(unit, tmp_path)
    # An instance name loads the template from the same folder with %i filled in.
    proc = subprocess.run(
        [analyze, "verify", str(tmp_path / name)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = (proc.stdout + proc.stderr).strip()
    # verify reports unknown keys and bad values only as warnings (exit 0): any line
    # about our unit is a failure. Lines about the host's own units are not ours to fix.
    ours = [line for line in output.splitlines() if "ingestd" in line]
    assert proc.returncode == 0 and not ours, output


def test_verify_catches_mistakes(analyze: str, tmp_path: Path) -> None:
    """The check above can fail: a typo'd key and a missing binary are reported."""
    unit = copy_for_verify(UNITS["ingestd.service"], tmp_path)
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=stritc"))
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120
    )
    assert "stritc" in proc.stdout + proc.stderr
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "ingestd.service").write_text(UNITS["ingestd.service"].read_text())
    proc = subprocess.run(
        [analyze, "verify", str(missing / "ingestd.service")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if Path(INSTALLED_BINARY).exists():
        pytest.skip(f"{INSTALLED_BINARY} is installed here")
    assert proc.returncode != 0 and INSTALLED_BINARY in proc.stdout + proc.stderr


def exposure(analyze: str, unit: Path) -> tuple[float, str]:
    proc = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out)
    assert m is not None, f"no exposure line (exit {proc.returncode}):\n{out}"
    return float(m.group(1)), out


@pytest.mark.parametrize("name", list(UNITS))
def test_security_exposure_at_most_2(analyze: str, name: str) -> None:
    need(systemd_version(analyze) >= 250, "systemd-analyze security --offline needs systemd 250+")
    level, out = exposure(analyze, UNITS[name])
    assert level <= MAX_EXPOSURE, out


def test_security_rating_reacts_to_the_unit(analyze: str, tmp_path: Path) -> None:
    """Guard against a parse that always passes: without the sandbox the rating is bad."""
    need(systemd_version(analyze) >= 250, "systemd-analyze security --offline needs systemd 250+")
    bare = tmp_path / "bare.service"
    bare.write_text(f"[Service]\nType=notify\nExecStart={INSTALLED_BINARY} run\n")
    level, out = exposure(analyze, bare)
    assert level > 9.0, out


# -- what the daemon relies on ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(UNITS))
def test_the_unit_matches_the_daemon(name: str) -> None:
    unit = read_unit(UNITS[name])
    assert unit["Type"] == ["notify"]  # the daemon sends READY=1 after its first scans
    assert unit["NotifyAccess"] == ["main"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # SIGHUP = reload
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartPreventExitStatus"] == ["2"]  # EXIT_CONFIG: a restart cannot help
    # The daemon pings every WatchdogSec/2 and stops within 10 s of SIGTERM.
    assert unit["WatchdogSec"] == ["30s"]
    assert _seconds(unit["TimeoutStopSec"][0]) > 10
    assert unit["User"] == ["ingestd"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["CapabilityBoundingSet"] == [""]
    assert unit["MemoryDenyWriteExecute"] == ["yes"]
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert unit["ConfigurationDirectory"] == ["ingestd"]
    assert not any(k.startswith("IPAddress") for k in unit)  # backends are remote


def test_the_template_runs_one_config_per_instance() -> None:
    unit = read_unit(UNITS["ingestd@.service"])
    assert unit["ExecStart"] == [f"{INSTALLED_BINARY} run -c /etc/ingestd/%i.yaml"]
    assert unit["StateDirectory"] == ["ingestd/%i"]  # one pid lock and ledger per instance
    single = read_unit(UNITS["ingestd.service"])
    assert single["ExecStart"] == [f"{INSTALLED_BINARY} run -c /etc/ingestd/config.yaml"]
    assert single["StateDirectory"] == ["ingestd"]
    # Otherwise the two say the same: the sandbox cannot drift apart between them.
    differ = {"Description", "ExecStart", "StateDirectory"}
    assert {k: v for k, v in unit.items() if k not in differ} == {
        k: v for k, v in single.items() if k not in differ
    }


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m is not None, value
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)
