"""Bucket prefixes as watch sources, end to end: the daemon as a subprocess polling real
storage emulators on loopback (moto S3, Azurite, fake-gcs-server; tests/support/emulators.py),
with every object written by the cloud's official client.

The daemon gets its credentials from each cloud's standard environment variables
(`monkeypatch.setenv`, inherited by the daemon and the CLI), never from the config."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from tests.support.daemon import Env, log_lines, sha256_digest, synced_lines
from tests.support.emulators import Emulator, unique_name
from tests.support.wait import wait_for

FIXTURES = {"s3": "s3_emulator", "az": "azure_emulator", "gs": "gcs_emulator"}
DEADLINE = 60.0  # generous: three emulators and other test sessions share two cores


@pytest.fixture(params=list(FIXTURES))
def cloud(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    emu: Emulator = request.getfixturevalue(FIXTURES[request.param])
    for k, v in emu.env.items():
        monkeypatch.setenv(k, v)
    yield emu


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 8), color).save(buf, "PNG")
    return buf.getvalue()


def bucket_watch(emu: Emulator, bucket: str, prefix: str = "in", **kw: Any) -> dict[str, Any]:
    return {
        "name": "b",
        "source": emu.url(bucket, prefix),
        "source_options": emu.source_options,
        "dataset": "ds",
        "poll_interval": "1s",
        "settle": "0.5s",
        **kw,
    }


def listings(env: Env) -> int:
    return len(log_lines(env, "scan done", watch="b"))


def file_of(item: dict[str, Any], slot: int = 0) -> dict[str, Any]:
    return item["slots"][slot]["files"][0]


@pytest.mark.parametrize(
    "transfer,on_delete", [("register", "keep"), ("copy", "delete")], ids=["register", "copy"]
)
def test_objects_become_items_follow_changes_and_survive_a_restart(
    env: Env, cloud: Emulator, transfer: str, on_delete: str
) -> None:
    bucket = cloud.create_bucket()
    objects = {
        "in/cam1/a.png": png((255, 0, 0)),
        "in/cam1/day2/b.bin": b"b" * 3000,
        "in/top.bin": b"top v1",
        "elsewhere/c.bin": b"not under the prefix",
    }
    for key, data in objects.items():
        cloud.put(bucket, key, data)
    env.write_config([bucket_watch(cloud, bucket, transfer=transfer, on_delete=on_delete)])

    dry = env.cli("sync", "--dry-run", check=True).stdout.splitlines()
    assert sorted(dry) == [
        "create  ds /cam1/a.png",
        "create  ds /cam1/day2/b.bin",
        "create  ds /top.bin",
    ], dry

    env.start()
    keys = {"/cam1/a.png", "/cam1/day2/b.bin", "/top.bin"}
    items = wait_for(
        lambda: (i := env.items_by_key()) and set(i) == keys and i,
        DEADLINE,
        what="the three objects under the prefix as items",
    )
    assert items["/cam1/day2/b.bin"]["path"] == "/cam1/day2"  # key prefixes are folders
    a = file_of(items["/cam1/a.png"])
    if transfer == "register":
        assert a["url"] == f"{cloud.scheme}://{bucket}/in/cam1/a.png"
        assert a["size"] == len(objects["in/cam1/a.png"]) and a["etag"]
        assert "digest" not in a
    else:
        assert a == {
            "name": "a.png",
            "digest": sha256_digest(objects["in/cam1/a.png"]),
            "size": len(objects["in/cam1/a.png"]),
        }
        top = file_of(items["/top.bin"])
        assert top["digest"] == sha256_digest(b"top v1")

    # An overwritten object updates its item.
    cloud.put(bucket, "in/top.bin", b"top version 2")
    top = wait_for(
        lambda: (i := env.items_by_key().get("/top.bin")) and i["version"] == 2 and i,
        DEADLINE,
        what="the overwritten object's item at version 2",
    )
    before = file_of(items["/top.bin"])
    if transfer == "register":
        assert file_of(top)["etag"] != before["etag"]
        assert file_of(top)["size"] == len(b"top version 2")
    else:
        assert file_of(top)["digest"] == sha256_digest(b"top version 2")

    # A deleted object follows on_delete.
    cloud.delete(bucket, "in/cam1/day2/b.bin")
    wait_for(
        lambda: env.watch_status("b")["synced"] == 2,
        DEADLINE,
        what="the deleted object's item to leave the watch",
    )
    if on_delete == "delete":
        wait_for(lambda: "/cam1/day2/b.bin" not in env.items_by_key(), DEADLINE)
    else:
        assert "/cam1/day2/b.bin" in env.items_by_key()  # kept in the dataset

    # A restart re-transfers nothing: the ETags say nothing changed.
    puts = {k: len(synced_lines(env, k)) for k in keys}
    assert env.stop() == 0
    before_restart = listings(env)
    env.restart()
    wait_for(lambda: listings(env) >= before_restart + 2, DEADLINE, what="two listings")
    assert {k: len(synced_lines(env, k)) for k in keys} == puts
    assert env.watch_status("b")["pending"] == 0
    assert env.watch_status("b")["problem"] is None
    env.stop()


def test_a_grouped_watch_over_key_prefixes(env: Env, cloud: Emulator) -> None:
    bucket = cloud.create_bucket()
    for key in ("scans/s1/0.bin", "scans/s1/1.bin", "scans/s1/deep/x.bin", "scans/s2/0.bin"):
        cloud.put(bucket, key, key.encode())
    env.write_config(
        [bucket_watch(cloud, bucket, "scans", transfer="copy", group={"mode": "slots", "depth": 1})]
    )
    env.start()
    items = wait_for(
        lambda: (i := env.items_by_key()) and set(i) == {"/s1", "/s2"} and i,
        DEADLINE,
        what="one item per group folder",
    )
    s1 = items["/s1"]
    assert [s["name"] for s in s1["slots"]] == ["0", "1"]  # deeper files are not members
    assert [file_of(s1, i)["digest"] for i in (0, 1)] == [
        sha256_digest(b"scans/s1/0.bin"),
        sha256_digest(b"scans/s1/1.bin"),
    ]
    cloud.put(bucket, "scans/s1/2.bin", b"third")
    s1 = wait_for(
        lambda: (i := env.items_by_key().get("/s1")) and len(i["slots"]) == 3 and i,
        DEADLINE,
        what="the new member in the group's item",
    )
    assert s1["version"] == 2 and file_of(s1, 2)["digest"] == sha256_digest(b"third")
    env.stop()


def local_watch(env: Env) -> dict[str, Any]:
    return {"name": "local", "source": str(env.drop("local")), "dataset": "ds-local"}


def wait_problem(env: Env, name: str, kind: str) -> str:
    problem = wait_for(
        lambda: env.watch_status(name)["problem"],
        DEADLINE,
        what=f"watch {name}'s problem",
    )
    assert problem.startswith(f"{kind}: "), problem
    return str(problem)


def local_keeps_syncing(env: Env) -> None:
    (env.root / "local" / "new.bin").write_bytes(b"still syncing")
    wait_for(
        lambda: "/new.bin" in env.items_by_key("ds-local"),
        DEADLINE,
        what="the local watch to sync while the bucket watches fail",
    )


def test_missing_bucket_and_unreachable_endpoint_are_named_in_status(
    env: Env, cloud: Emulator
) -> None:
    # Only the watch's endpoint points nowhere (source_options win over the environment).
    options, _ = cloud.unreachable_options()
    missing = {**bucket_watch(cloud, "no-such-bucket-4f1c"), "name": "missing"}
    unreachable = {
        **bucket_watch(cloud, cloud.create_bucket()),
        "name": "unreachable",
        "source_options": options,
    }
    env.write_config([missing, unreachable, local_watch(env)])
    env.start()
    problem = wait_problem(env, "missing", "missing_bucket")
    assert "no-such-bucket-4f1c" in problem and "does not exist" in problem
    problem = wait_problem(env, "unreachable", "unreachable")
    assert options["endpoint"].split("//")[1] in problem or "reach" in problem
    local_keeps_syncing(env)
    status = env.status()
    assert status["daemon"]["running"]
    assert env.stop() == 0  # failing watches never crash the daemon


@pytest.mark.parametrize("kind", ["credentials", "denied"])
def test_wrong_credentials_and_denied_access_are_named_in_status(
    env: Env, cloud: Emulator, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    bad = cloud.wrong_credentials_env() if kind == "credentials" else cloud.denied_env()
    if bad is None:
        pytest.skip(f"the {cloud.scheme} emulator checks no credentials or permissions")
    bucket = cloud.create_bucket()
    cloud.put(bucket, "in/a.bin", b"a")
    for k, v in bad.items():
        monkeypatch.setenv(k, v)
    env.write_config([bucket_watch(cloud, bucket), local_watch(env)])
    env.start()
    problem = wait_problem(env, "b", kind)
    assert f"{cloud.scheme}://{bucket}/in/" in problem
    local_keeps_syncing(env)
    assert env.watch_status("b")["synced"] == 0
    assert env.stop() == 0


def test_status_json_problem_is_cleared_when_the_bucket_appears(
    env: Env, s3_emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in s3_emulator.env.items():
        monkeypatch.setenv(k, v)
    name = unique_name("late")
    env.write_config([bucket_watch(s3_emulator, name)])
    env.start()
    wait_problem(env, "b", "missing_bucket")
    s3_emulator.client().create_bucket(Bucket=name)
    s3_emulator.put(name, "in/a.bin", b"a")
    wait_for(lambda: "/a.bin" in env.items_by_key(), 120, what="the item once the bucket exists")
    assert env.watch_status("b")["problem"] is None
    assert (
        json.loads(env.cli("status", "--json", check=True).stdout)["watches"][0]["problem"] is None
    )
    env.stop()


def test_one_pass_sync_of_a_bucket_watch(
    env: Env, s3_emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in s3_emulator.env.items():
        monkeypatch.setenv(k, v)
    bucket = s3_emulator.create_bucket()
    s3_emulator.put(bucket, "in/a.bin", b"a")
    s3_emulator.put(bucket, "in/sub/b.bin", b"b")
    env.write_config([bucket_watch(s3_emulator, bucket, transfer="copy")])
    out = env.cli("sync", check=True)
    assert "b: 2 synced, 0 pending, 0 failed" in out.stderr
    items = env.items_by_key()
    assert file_of(items["/sub/b.bin"])["digest"] == sha256_digest(b"b")
    # A deleted object shows in the dry run (on_delete: keep forgets it), and the dry
    # run changes nothing.
    s3_emulator.delete(bucket, "in/a.bin")
    dry = env.cli("sync", "--dry-run", check=True).stdout.splitlines()
    assert dry == ["forget  ds /a.bin"]
    assert env.cli("sync", "--dry-run", check=True).stdout.splitlines() == dry
    assert set(env.items_by_key()) == {"/a.bin", "/sub/b.bin"}


def test_one_pass_sync_exits_1_naming_a_bucket_it_cannot_list(
    env: Env, s3_emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in s3_emulator.env.items():
        monkeypatch.setenv(k, v)
    env.write_config([bucket_watch(s3_emulator, "no-such-bucket-9d2e"), local_watch(env)])
    write_local = env.drop("local") / "a.dat"
    write_local.write_bytes(b"local files still sync")
    out = env.cli("sync", timeout=120)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    problem_lines = [line for line in out.stderr.splitlines() if line.startswith("b: ")]
    assert any("missing_bucket" in line and "no-such-bucket-9d2e" in line for line in problem_lines)
    assert "local: 1 synced, 0 pending, 0 failed" in out.stderr
    assert env.watch_status("b")["problem"] is not None


@pytest.mark.parametrize("transfer", ["register", "copy"])
def test_bucket_items_through_ingestd_serve(
    env: Env,
    s3_emulator: Emulator,
    make_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    transfer: str,
) -> None:
    for k, v in s3_emulator.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("BUCKET_TEST_TOKEN", "tok-buckets-0123456789")
    server = make_server(token="tok-buckets-0123456789")
    bucket = s3_emulator.create_bucket()
    big = bytes(range(256)) * 4096  # 1 MiB: streamed in several chunks
    s3_emulator.put(bucket, "in/d/big.bin", big)
    env.write_config(
        [bucket_watch(s3_emulator, bucket, transfer=transfer)],
        backend={"kind": "http", "url": server.url, "token_env": "BUCKET_TEST_TOKEN"},
    )
    env.start()
    item = wait_for(
        lambda: env.items_by_key().get("/d/big.bin"), DEADLINE, what="the item on the server"
    )
    f = file_of(item)
    if transfer == "register":
        assert f["url"] == f"s3://{bucket}/in/d/big.bin" and f["size"] == len(big)
        assert server.blob_digests() == set()
    else:
        assert f["digest"] == sha256_digest(big)
        assert server.blob_digests() == {sha256_digest(big)}
    env.stop()
