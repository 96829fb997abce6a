"""A bad config is refused with the field named, by `check` and by `run` alike: exit 2,
one line per problem on stderr, never a traceback (docs/design.md, "Commands")."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Env


def _watch(env: Env, **extra: Any) -> dict[str, Any]:
    return {"name": "w", "source": str(env.drop()), "dataset": "ds", **extra}


def _file(env: Env) -> Path:
    path = env.root / "a-file"
    path.write_text("not a folder")
    return path


# Each case: (id, writes the config into env, the field the error must name).
CASES: list[tuple[str, Callable[[Env], object], str]] = [
    (
        "unknown top-level key",
        lambda env: env.write_config([_watch(env)], wokers=4),
        "wokers",
    ),
    (
        "unknown key in a watch",
        lambda env: env.write_config([_watch(env, setle="2s")]),
        "watches[0].setle",
    ),
    (
        "unknown key in a nested section",
        lambda env: env.write_config([_watch(env, metadata={"sidecars": "{name}.json"})]),
        "watches[0].metadata.sidecars",
    ),
    (
        "negative settle (string)",
        lambda env: env.write_config([_watch(env, settle="-1s")]),
        "watches[0].settle",
    ),
    (
        "negative settle (number)",
        lambda env: env.write_config([_watch(env, settle=-0.5)]),
        "watches[0].settle",
    ),
    (
        "duplicate watch names",
        lambda env: env.write_config(
            [_watch(env), {"name": "w", "source": str(env.drop("other")), "dataset": "ds2"}]
        ),
        "watches[1].name",
    ),
    (
        # A missing folder is not an error (the watch waits for it: test_missing_folder.py).
        "source is a file",
        lambda env: env.write_config([{"name": "w", "source": str(_file(env)), "dataset": "ds"}]),
        "watches[0].source",
    ),
    (
        "second watch is the bad one",
        lambda env: env.write_config(
            [
                _watch(env),
                {"name": "v", "source": str(env.drop("v")), "dataset": "v", "settle": "soon"},
            ]
        ),
        "watches[1].settle",
    ),
]


def _run_daemon(env: Env) -> subprocess.CompletedProcess[str]:
    # `run` must refuse at once; a daemon that started would hit the timeout instead.
    return env.cli("run", timeout=30)


def _assert_refused(proc: subprocess.CompletedProcess[str], field: str, what: str) -> None:
    assert proc.returncode == 2, f"{what} exited {proc.returncode}:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if field in line]
    assert lines, f"{what}: no stderr line names {field}:\n{proc.stderr}"
    # The field is named as a field ("watches[0].settle: ..."), not merely mentioned.
    assert any(re.search(re.escape(field) + r"\s*:", line) for line in lines), proc.stderr


@pytest.mark.parametrize(("write", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_config_is_refused_by_check_and_run(
    env: Env, write: Callable[[Env], object], field: str
) -> None:
    write(env)
    _assert_refused(env.cli("check"), field, "check")
    _assert_refused(_run_daemon(env), field, "run")
    # Nothing was started: not even the state folder (pid file, ledger) was created.
    assert not env.state.exists()


def test_several_problems_are_all_reported(env: Env) -> None:
    env.write_config([_watch(env, settle="-1s", setle="2s")], wokers=4)
    proc = env.cli("check")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    for field in ("wokers", "watches[0].settle", "watches[0].setle"):
        assert field in proc.stderr, (field, proc.stderr)


def test_valid_config_passes_check(env: Env) -> None:
    env.write_config(
        [
            _watch(
                env,
                include=["*.jpg", "a/**/*.png"],
                exclude=["cache"],
                metadata={
                    "static": {"site": "lab"},
                    "path_pattern": "{camera}/*",
                    "sidecar": "{name}.json",
                },
                on_delete="delete",
                max_delete="25%",
            )
        ]
    )
    proc = env.cli("check")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "ok" in proc.stdout, proc.stdout


def test_schema_is_json_schema_with_watches() -> None:
    env = Env(Path("/nonexistent"))  # `schema` needs no config
    proc = env.cli("schema")
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    assert "json-schema.org" in schema["$schema"]
    assert schema["type"] == "object"
    assert "watches" in schema["properties"]
    assert schema["properties"]["watches"]["type"] == "array"
    # Every key the example config shape documents at the top level is described.
    for key in ("state_dir", "log", "workers", "backend"):
        assert key in schema["properties"], key


def test_yaml_syntax_error_names_the_line(env: Env) -> None:
    env.drop()
    env.config_path.write_text(
        "state_dir: state\n"
        "watches:\n"
        "  - name: w\n"
        "    source: drop\n"
        "    dataset: [ds\n"  # line 5: an unclosed flow sequence
        "    settle: 1s\n"
    )
    for cmd in ("check", "run"):
        proc = env.cli(cmd, timeout=30)
        assert proc.returncode == 2, (cmd, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert "YAML" in proc.stderr, proc.stderr
        # PyYAML reports where it noticed the problem: on or just after line 5.
        found = re.search(r":(\d+):\d+:|line (\d+)", proc.stderr)
        assert found, f"{cmd}: no line number in:\n{proc.stderr}"
        line = int(found.group(1) or found.group(2))
        assert 5 <= line <= 6, (cmd, proc.stderr)


def test_missing_config_file_is_a_clear_error(env: Env) -> None:
    proc = env.cli("check")  # env.config_path was never written
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(env.config_path) in proc.stderr and "no such file" in proc.stderr, proc.stderr
