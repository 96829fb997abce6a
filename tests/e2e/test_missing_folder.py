"""A source folder that is not there yet (a mount arriving late) is no config error: the
daemon starts, that watch waits and says so in `status`, the others run, and the watch
begins once the folder appears, which the daemon never creates (issue 14, point 6)."""

from __future__ import annotations

from tests.support.daemon import Env
from tests.support.wait import wait_for


def test_a_missing_folder_waits_while_the_other_watch_syncs(env: Env) -> None:
    here = env.drop("here")
    late = env.root / "mnt" / "late"
    env.write_config(
        [
            {"name": "a", "source": str(here), "dataset": "da"},
            {"name": "w", "source": str(late), "dataset": "dw"},
        ]
    )
    env.start()
    (here / "one.dat").write_bytes(b"one")
    wait_for(lambda: "/one.dat" in env.items_by_key("da"), what="watch a to sync one.dat")

    problem = wait_for(
        lambda: env.watch_status("w")["problem"], 30, what="watch w's problem in status"
    )
    assert problem == (
        f"waiting for folder {late} (not there yet; nothing is created, an unmounted "
        "mount point must stay empty)"
    )
    assert env.watch_status("a")["problem"] is None
    assert not late.exists() and not late.parent.exists(), "the daemon created the folder"
    assert env.daemon is not None and env.daemon.poll() is None

    late.mkdir(parents=True)
    (late / "two.dat").write_bytes(b"two")
    wait_for(lambda: "/two.dat" in env.items_by_key("dw"), 60, what="watch w to sync two.dat")
    wait_for(lambda: env.watch_status("w")["problem"] is None, 30, what="the problem to clear")
    # From now on the folder is watched through events, not only by passes.
    (late / "three.dat").write_bytes(b"three")
    wait_for(lambda: "/three.dat" in env.items_by_key("dw"), 60, what="three.dat")
    assert env.stop() == 0


def test_check_warns_about_a_missing_folder_and_passes(env: Env) -> None:
    late = env.root / "not-yet"
    env.write_config(
        [
            {"name": "a", "source": str(env.drop("here")), "dataset": "da"},
            {"name": "w", "source": str(late), "dataset": "dw"},
        ]
    )
    proc = env.cli("check")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: watch 'w': folder {late} does not exist yet; the watch waits for it"
    ], proc.stderr
    assert "ok" in proc.stdout
    assert not late.exists()


def test_a_source_that_is_a_file_is_still_a_config_error(env: Env) -> None:
    afile = env.root / "a-file"
    afile.write_text("not a folder")
    env.write_config([{"name": "w", "source": str(afile), "dataset": "dw"}])
    for command in ("check", "run"):
        proc = env.cli(command, timeout=30)
        assert proc.returncode == 2, (command, proc.stderr)
        assert f"watches[0].source: {afile} is not a folder" in proc.stderr
