"""Config parsing and validation: durations, shares, paths, field-named problems."""

from __future__ import annotations

from pathlib import Path

import pytest
from ingestd.config import (
    ConfigError,
    MaxDelete,
    json_schema,
    load_config,
    parse_config,
    parse_duration,
    parse_max_delete,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2s", 2.0),
        ("500ms", 0.5),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("0.5s", 0.5),
        (3, 3.0),
        (0, 0.0),
        (1.5, 1.5),
        ("7", 7.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["-2s", -1, "2 parsecs", "", "s", True, None, [1]])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_max_delete() -> None:
    assert parse_max_delete("50%") == MaxDelete(share=0.5)
    assert parse_max_delete(100) == MaxDelete(count=100)
    half = MaxDelete(share=0.5)
    assert half.allows(5, 10) and not half.allows(6, 10)
    assert half.allows(0, 0)
    assert not half.allows(1, 0)
    assert MaxDelete(count=3).allows(3, 4) and not MaxDelete(count=3).allows(4, 100)
    for bad in ("150%", "x%", -1, 0.5, True):
        with pytest.raises(ValueError):
            parse_max_delete(bad)


def _problems(data: dict, base: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base)
    return [str(p) for p in info.value.problems]


def test_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "drop").mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "state_dir: st\nbackend: {kind: local, path: store}\n"
        "watches: [{name: w, source: drop, dataset: d, path: a//b/}]\n"
    )
    config = load_config(cfg)
    assert config.state_dir == tmp_path / "st"
    assert config.backend.path == tmp_path / "store"
    assert config.watches[0].folder == tmp_path / "drop"
    assert config.watches[0].path == "/a/b"
    assert config.watches[0].settle == 2.0 and config.watches[0].rescan == 600.0


def test_every_problem_is_named_by_field(tmp_path: Path) -> None:
    (tmp_path / "drop").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    problems = _problems(
        {
            "wokers": 3,
            "backend": {"kind": "nope"},
            "watches": [
                {"name": "a", "source": "drop", "dataset": "d", "settle": "-1s", "colour": 1},
                {"name": "a", "source": "a-file", "dataset": "d"},
                {"name": "b", "source": "drop", "dataset": "d/e", "path": "/x/../y"},
            ],
        },
        tmp_path,
    )
    text = "\n".join(problems)
    for field in (
        "wokers: unknown key",
        "backend: kind 'nope'",
        "watches[0].settle: must not be negative",
        "watches[0].colour: unknown key",
        "watches[1].name: 'a' is already used by watches[0]",
        "watches[1].source: " + str(tmp_path / "a-file") + " is not a folder",
        "watches[2].dataset:",
        "watches[2].path:",
    ):
        assert field in text, f"{field!r} missing from:\n{text}"


def test_bad_bucket_urls_are_refused_clearly(tmp_path: Path) -> None:
    (problem,) = _problems(
        {"watches": [{"name": "a", "source": "s3://b/p", "dataset": "d"}]}, tmp_path
    )
    assert problem.startswith("watches[0].source:") and "bucket" in problem
    (problem,) = _problems(
        {"watches": [{"name": "a", "source": "ftp://host/p", "dataset": "d"}]}, tmp_path
    )
    assert problem.startswith("watches[0].source:") and "s3://bucket/prefix" in problem


def test_bucket_sources_parse_and_folder_only_keys_are_checked(tmp_path: Path) -> None:
    config = parse_config(
        {
            "watches": [
                {
                    "name": "a",
                    "source": "s3://my-bucket//raw/cams/",
                    "dataset": "d",
                    "transfer": "copy",
                    "poll_interval": "5s",
                    "source_options": {"endpoint": "http://127.0.0.1:9000", "allow_http": True},
                }
            ]
        },
        tmp_path,
    )
    w = config.watches[0]
    assert w.bucket is not None and (w.bucket.bucket, w.bucket.prefix) == ("my-bucket", "raw/cams/")
    assert w.poll_interval == 5.0 and w.transfer == "copy"
    (problem,) = _problems(
        {"watches": [{"name": "a", "source": ".", "dataset": "d", "transfer": "copy"}]}, tmp_path
    )
    assert problem.startswith("watches[0]:") and "bucket sources only" in problem


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("watches:\n  - name: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert f"{cfg}:" in str(info.value) and "YAML syntax error" in str(info.value)


def test_schema_lists_the_keys() -> None:
    schema = json_schema()
    assert {"state_dir", "workers", "backend", "watches"} <= set(schema["properties"])
    watch = schema["$defs"]["Watch"]
    assert watch["additionalProperties"] is False
    assert {"settle", "include", "metadata", "max_delete"} <= set(watch["properties"])


def test_poll_interval_defaults_by_kind_and_is_taken_for_folders(tmp_path: Path) -> None:
    watches = [
        {"name": "f", "source": ".", "dataset": "d"},
        {"name": "b", "source": "s3://my-bucket/p", "dataset": "d"},
        {"name": "g", "source": ".", "dataset": "d", "poll_interval": "2s"},
        {"name": "n", "source": ".", "dataset": "d", "poll_interval": None},
    ]
    config = parse_config({"watches": watches}, tmp_path)
    intervals = {w.name: w.poll_interval for w in config.watches}
    assert intervals == {"f": 5.0, "b": 60.0, "g": 2.0, "n": 5.0}
    assert {w.watch_mode for w in config.watches} == {"auto"}
    (problem,) = _problems(
        {"watches": [{"name": "a", "source": ".", "dataset": "d", "poll_interval": "0.5s"}]},
        tmp_path,
    )
    assert problem.startswith("watches[0].poll_interval:") and "at least 1s" in problem


def test_watch_mode(tmp_path: Path) -> None:
    config = parse_config(
        {
            "watches": [
                {"name": "p", "source": ".", "dataset": "d", "watch_mode": "poll"},
                {"name": "e", "source": ".", "dataset": "d", "watch_mode": "events"},
                {"name": "b", "source": "s3://my-bucket/p", "dataset": "d", "watch_mode": "poll"},
            ]
        },
        tmp_path,
    )
    assert [w.watch_mode for w in config.watches] == ["poll", "events", "poll"]
    (problem,) = _problems(
        {"watches": [{"name": "a", "source": ".", "dataset": "d", "watch_mode": "inotify"}]},
        tmp_path,
    )
    assert problem.startswith("watches[0].watch_mode:"), problem
    (problem,) = _problems(
        {
            "watches": [
                {"name": "a", "source": "s3://my-bucket/p", "dataset": "d", "watch_mode": "events"}
            ]
        },
        tmp_path,
    )
    assert "watch_mode: events applies to folders only" in problem
    # Not an item setting: editing it restarts the watch without planning items again.
    a = config.watches[0]
    assert a.model_copy(update={"watch_mode": "events"}).plan_identity() == a.plan_identity()
