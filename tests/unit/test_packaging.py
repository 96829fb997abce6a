"""The distribution as a user installs it: the import name `ingestd` lives beside
python-daemon's top-level `daemon` package in one environment, and the console script
runs. (Before, the package itself was called `daemon` and one overwrote the other.)"""

from __future__ import annotations

import site
import subprocess
import venv
from pathlib import Path

from tests.support.need import need

REPO = Path(__file__).resolve().parents[2]


def test_ingestd_installs_beside_python_daemon(tmp_path: Path) -> None:
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    py = env / "bin" / "python"
    # ingestd's own dependencies come from the test environment (a .pth file), so only
    # the two distributions under test are installed here.
    purelib = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "test-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    got = subprocess.run([*pip, "python-daemon"], capture_output=True, text=True)
    need(got.returncode == 0, f"python-daemon cannot be installed here: {got.stderr[-500:]}")
    subprocess.run([*pip, "--no-deps", "-e", str(REPO)], check=True, capture_output=True)

    probe = subprocess.run(
        [
            py,
            "-c",
            "import daemon, ingestd; from ingestd import Sink, Source, load_config;"
            " assert daemon.DaemonContext;"
            " print(daemon.__file__); print(ingestd.__file__); print(ingestd.__version__)",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,  # not the repo: nothing may be imported from the work tree by accident
    )
    daemon_file, ingestd_file, version = probe.stdout.split()
    assert Path(daemon_file).is_relative_to(env) and "site-packages" in daemon_file
    assert Path(ingestd_file).is_relative_to(REPO / "daemon" / "ingestd")
    assert version[0].isdigit()

    help_out = subprocess.run(
        [env / "bin" / "ingestd", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("run", "sync", "check", "status", "serve"):
        assert command in help_out
