"""The labelbox sink against the fake Labelbox GraphQL API (tests/support/fakes/labelbox.py) on
real loopback sockets: what ends up in the fake's rows, files and metadata is what a
Labelbox organisation would hold."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from ingestd.config import LabelboxBackend
from ingestd.core.errors import PermanentError, RetriableError, SourceChangedError
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
from ingestd.sinks import labelbox as lb
from ingestd.sinks.base import MetadataUpdater, Sink
from ingestd.sinks.labelbox import LabelboxSink, global_key, https_url

from tests.support.fakes.labelbox import FakeProcess, LabelboxFake

KEY = "lb-key-5f0e9a27c3d1"
ENV = "INGESTD_TEST_LABELBOX_KEY"


def digest_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def fp(path: Path, name: str | None = None) -> FilePayload:
    return FilePayload(name or path.name, str(path), path.stat().st_size, digest_of(path))


def single(
    path: Path, *, folder: str = "/", name: str | None = None, kind: str = "image", **md: Any
) -> ItemPayload:
    name = name or path.name
    return ItemPayload(folder, name, (SlotPayload("0", kind, (fp(path, name),)),), dict(md))  # type: ignore[arg-type]


def backend(fake_url: str, **kw: Any) -> LabelboxBackend:
    return LabelboxBackend(kind="labelbox", api_key_env=ENV, base_url=fake_url, **kw)


def make_sink(url: str, **kw: Any) -> LabelboxSink:
    sink = LabelboxSink(backend(url, **kw), workers=4)
    # Fast polls and backoff: the shapes are what is tested, not the waits.
    sink.poll_first = sink.poll_max = 0.01
    sink.client.backoff_base = 0.01
    return sink


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, KEY)


@pytest.fixture
async def fake() -> AsyncIterator[LabelboxFake]:
    f = LabelboxFake(KEY)
    await f.start()
    yield f
    await f.stop()


@pytest.fixture
async def sink(fake: LabelboxFake) -> AsyncIterator[LabelboxSink]:
    s = make_sink(fake.url)
    yield s
    await s.close()


def only_row(fake: LabelboxFake, dataset: str = "ds") -> dict[str, Any]:
    rows = fake.rows_of(dataset)
    assert len(rows) == 1, rows
    return next(iter(rows.values()))


# --- identity, URLs ------------------------------------------------------------------


def test_global_key_is_stable_escaped_and_within_the_limit() -> None:
    assert global_key("photos", "/a/b.jpg") == "ingestd:photos:/a/b.jpg"
    # ':' in a dataset name is escaped, so dataset "a:/x" + "/y" differs from "a" + "/x:/y"
    assert global_key("a:/x", "/y") != global_key("a", "/x:/y")
    assert global_key("a:/x", "/y") == "ingestd:a%3A/x:/y"
    long = global_key("ds", "/" + "n" * 300)
    assert long.startswith("ingestd:sha256:") and len(long) <= 200
    assert long == global_key("ds", "/" + "n" * 300)
    assert long != global_key("ds2", "/" + "n" * 300)


def test_registered_objects_become_https_urls() -> None:
    assert https_url("s3://bkt/a/b #1.jpg") == "https://bkt.s3.amazonaws.com/a/b%20%231.jpg"
    assert https_url("s3://my.bkt/k.png") == "https://s3.amazonaws.com/my.bkt/k.png"
    assert https_url("gs://bkt/dir/x?.png") == "https://storage.googleapis.com/bkt/dir/x%3F.png"
    assert https_url("https://cdn.example/x.png") == "https://cdn.example/x.png"
    with pytest.raises(PermanentError, match="storage account"):
        https_url("az://container/x.png")
    with pytest.raises(PermanentError, match="https"):
        https_url("http://insecure.example/x.png")


async def test_implements_the_sink_interface(sink: LabelboxSink) -> None:
    assert isinstance(sink, Sink) and isinstance(sink, MetadataUpdater)
    caps = sink.capabilities
    assert caps.remote_urls and caps.metadata_update and caps.delete
    assert KEY not in repr(sink)
    assert sink.endpoint.endswith("/graphql")


def test_endpoint_from_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    assert LabelboxSink(LabelboxBackend(kind="labelbox", api_key_env=ENV)).endpoint == (
        "https://api.labelbox.com/graphql"
    )
    assert make_sink("https://lb.example/graphql").endpoint == "https://lb.example/graphql"
    assert make_sink("https://lb.example/api").endpoint == "https://lb.example/api/graphql"


# --- items ---------------------------------------------------------------------------


async def test_single_image(sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path) -> None:
    f = write(tmp_path / "cat.jpg", os.urandom(50_000))
    await sink.ensure_dataset("ds")
    result = await sink.put_item("ds", single(f, folder="/pets", camera="c1", exposure=0.25))
    gk = "ingestd:ds:/pets/cat.jpg"
    assert (result.backend_id, result.changed) == (gk, True)
    row = only_row(fake)
    assert row["global_key"] == gk and row["external_id"] == "/pets/cat.jpg"
    assert row["media_type"] == "IMAGE" and row["attachments"] == []
    assert fake.fetch(row["row_data"]) == f.read_bytes()
    assert row["metadata"] == {"camera": "c1", "exposure": 0.25}
    kinds = {s["name"]: s["kind"] for s in fake.schemas.values() if not s["reserved"]}
    assert kinds == {"camera": "CustomMetadataString", "exposure": "CustomMetadataNumber"}
    assert fake.auth_headers == {f"Bearer {KEY}"}
    assert fake.chunked_uploads == 0  # streamed with a Content-Length
    assert len(fake.datasets) == 1
    await sink.ensure_dataset("ds")  # known: no new dataset, no lookup
    assert len(fake.datasets) == 1


async def test_an_existing_dataset_is_found_by_name(fake: LabelboxFake, tmp_path: Path) -> None:
    existing = fake.r_createDataset({"data": {"name": "photos"}})
    s = make_sink(fake.url)
    try:
        f = write(tmp_path / "a.png", b"png" * 100)
        await s.put_item("photos", single(f))
    finally:
        await s.close()
    assert len(fake.datasets) == 1
    assert only_row(fake, "photos")["global_key"] == "ingestd:photos:/a.png"
    assert next(iter(fake.rows.values()))["dataset_id"] == existing["id"]


async def test_names_with_hash_and_spaces(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    f = write(tmp_path / "take #1 (final).jpg", os.urandom(1000))
    await sink.put_item("ds", single(f, folder="/shoot #2"))
    row = only_row(fake)
    assert row["external_id"] == "/shoot #2/take #1 (final).jpg"
    assert row["global_key"] == "ingestd:ds:/shoot #2/take #1 (final).jpg"
    assert "#" not in row["row_data"]
    assert fake.fetch(row["row_data"]) == f.read_bytes()


def slots_item(paths: list[Path], layout: dict[str, Any], *, names: list[str]) -> ItemPayload:
    slots = tuple(
        SlotPayload(n, "image", (fp(p),), {"layout": layout} if i == 0 else {})
        for i, (n, p) in enumerate(zip(names, paths, strict=True))
    )
    return ItemPayload("/", "group", slots, {})


async def test_multi_slot_item(sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path) -> None:
    paths = [write(tmp_path / f"v{i}.jpg", os.urandom(2000 + i)) for i in range(3)]
    layout = {"type": "grid", "columns": 2, "rows": [[["0"], ["1"]], [["2"]]]}
    await sink.put_item("ds", slots_item(paths, layout, names=["0", "1", "2"]))
    row = only_row(fake)
    assert row["media_type"] == "IMAGE"
    assert fake.fetch(row["row_data"]) == paths[0].read_bytes()
    assert [(a["type"], a["name"]) for a in row["attachments"]] == [
        ("IMAGE", "slot 1: v1.jpg"),
        ("IMAGE", "slot 2: v2.jpg"),
    ]
    assert [fake.fetch(a["value"]) for a in row["attachments"]] == [
        p.read_bytes() for p in paths[1:]
    ]


async def test_channels_become_image_overlays(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    names = ["blue.png", "green.png", "red.png"]
    paths = [write(tmp_path / n, os.urandom(1500)) for n in names]
    layout = {"type": "grid", "columns": 1, "rows": [[names]]}
    await sink.put_item("ds", slots_item(paths, layout, names=names))
    row = only_row(fake)
    assert fake.fetch(row["row_data"]) == paths[0].read_bytes()
    assert [(a["type"], a["name"]) for a in row["attachments"]] == [
        ("IMAGE_OVERLAY", "green.png"),
        ("IMAGE_OVERLAY", "red.png"),
    ]


async def test_dicom_series(sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path) -> None:
    paths = [write(tmp_path / f"s{i}.dcm", os.urandom(3000)) for i in range(4)]
    slot = SlotPayload("series", "dicom", tuple(fp(p) for p in paths))
    await sink.put_item("ds", ItemPayload("/ct", "series", (slot,), {"Modality": "CT"}))
    row = only_row(fake)
    assert row["media_type"] == "DICOM"
    assert fake.fetch(row["row_data"]) == paths[0].read_bytes()
    assert [(a["type"], a["name"]) for a in row["attachments"]] == [
        ("RAW_TEXT", f"slice {i + 1} of 4: s{i}.dcm") for i in range(1, 4)
    ]
    assert [fake.fetch(a["value"]) for a in row["attachments"]] == [
        p.read_bytes() for p in paths[1:]
    ]
    assert row["metadata"] == {"Modality": "CT"}


async def test_frame_sampled_video(sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path) -> None:
    frames = [write(tmp_path / f"frame_{i:06d}.jpg", os.urandom(800)) for i in range(3)]
    slot = SlotPayload(
        "0",
        "frames",
        tuple(fp(p) for p in frames),
        {"timestamps": [0.0, 1.0, 2.0], "fps": 1, "source": "clip.mp4"},
    )
    await sink.put_item("ds", ItemPayload("/", "clip.mp4", (slot,), {}))
    row = only_row(fake)
    assert row["media_type"] == "IMAGE"
    assert fake.fetch(row["row_data"]) == frames[0].read_bytes()
    assert [(a["type"], a["name"]) for a in row["attachments"]] == [
        ("IMAGE", "t=1.000s frame_000001.jpg"),
        ("IMAGE", "t=2.000s frame_000002.jpg"),
    ]


async def test_native_video(sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path) -> None:
    f = write(tmp_path / "clip.mp4", os.urandom(5000))
    await sink.put_item("ds", single(f, kind="video"))
    assert only_row(fake)["media_type"] == "VIDEO"


async def test_bucket_registered_item(sink: LabelboxSink, fake: LabelboxFake) -> None:
    def remote(name: str, url: str) -> FilePayload:
        return FilePayload(name, "", 1234, "", url=url, etag="e1")

    slots = (
        SlotPayload("0", "image", (remote("a #1.jpg", "s3://bkt/cams/a #1.jpg"),)),
        SlotPayload("1", "image", (remote("b.jpg", "gs://gbkt/cams/b.jpg"),)),
    )
    await sink.put_item("ds", ItemPayload("/cams", "pair", slots, {"site": "north"}))
    row = only_row(fake)
    assert row["row_data"] == "https://bkt.s3.amazonaws.com/cams/a%20%231.jpg"
    assert [a["value"] for a in row["attachments"]] == [
        "https://storage.googleapis.com/gbkt/cams/b.jpg"
    ]
    # no bytes moved: the only uploads are the row chunk and the manifest
    assert sorted(f["filename"] for f in fake.files.values()) == [
        "json_import.json",
        "manifest.json",
    ]
    azure = SlotPayload("0", "image", (remote("c.jpg", "az://box/c.jpg"),))
    with pytest.raises(PermanentError, match=r"az://box/c.jpg.*storage account"):
        await sink.put_item("ds", ItemPayload("/", "c.jpg", (azure,), {}))


async def test_metadata_change_updates_in_place(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    f = write(tmp_path / "a.jpg", os.urandom(4000))
    await sink.put_item("ds", single(f, camera="c1", iso=100, split="train", note="old"))
    before = only_row(fake)
    files_before = len(fake.files)
    result = await sink.update_metadata(
        "ds", single(f, camera="c2", iso=200, split="valid"), before["global_key"]
    )
    assert result.backend_id == before["global_key"]
    after = only_row(fake)
    assert after["id"] == before["id"] and after["row_data"] == before["row_data"]
    assert after["metadata"] == {"camera": "c2", "iso": 200.0, "split": "valid"}  # note dropped
    assert len(fake.files) == files_before  # no bytes, no manifest: metadata calls only


async def test_metadata_update_of_a_missing_row_puts_the_item(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    f = write(tmp_path / "a.jpg", os.urandom(4000))
    await sink.update_metadata("ds", single(f, camera="c1"), None)
    row = only_row(fake)
    assert row["metadata"] == {"camera": "c1"} and fake.fetch(row["row_data"]) == f.read_bytes()


async def test_metadata_that_does_not_fit_fails_with_the_key_named(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    f = write(tmp_path / "a.jpg", os.urandom(100))
    await sink.put_item("ds", single(f, iso=100))
    with pytest.raises(PermanentError, match=r"'iso' is a number field.*'high'"):
        await sink.put_item("ds", single(f, iso="high"))
    with pytest.raises(PermanentError, match=r"'split' is a choice field.*'holdout'.*train"):
        await sink.put_item("ds", single(f, split="holdout"))
    with pytest.raises(PermanentError, match=r"captureDateTime.*ISO 8601"):
        await sink.put_item("ds", single(f, captureDateTime="yesterday"))
    await sink.put_item("ds", single(f, captureDateTime="2024-05-01T12:00:00Z", iso="400"))
    assert only_row(fake)["metadata"] == {
        "captureDateTime": "2024-05-01T12:00:00.000000Z",
        "iso": 400.0,
    }


async def test_metadata_field_limit_is_a_clear_failure(fake: LabelboxFake, tmp_path: Path) -> None:
    fake.max_custom_fields = 1
    s = make_sink(fake.url)
    try:
        f = write(tmp_path / "a.jpg", os.urandom(100))
        with pytest.raises(PermanentError, match=r"metadata key 'second'.*limit") as e:
            await s.put_item("ds", single(f, first=1, second="x"))
        assert "/a.jpg" in e.value.reason
    finally:
        await s.close()
    assert fake.rows_of("ds") == {} and fake.files == {}  # failed before any bytes moved


async def test_content_change_updates_the_same_row(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    paths = [write(tmp_path / f"{i}.jpg", os.urandom(900)) for i in range(2)]
    layout = {"type": "grid", "columns": 2, "rows": [[["0"], ["1"]]]}
    await sink.put_item("ds", slots_item(paths, layout, names=["0", "1"]))
    before = only_row(fake)
    write(paths[0], os.urandom(1100))
    item = ItemPayload("/", "group", (SlotPayload("0", "image", (fp(paths[0]),)),), {"v": 2})
    await sink.put_item("ds", item)
    after = only_row(fake)
    assert after["id"] == before["id"]
    assert fake.fetch(after["row_data"]) == paths[0].read_bytes()
    assert after["attachments"] == [] and after["metadata"] == {"v": 2}


async def test_deletion(sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path) -> None:
    a = write(tmp_path / "a.jpg", os.urandom(100))
    b = write(tmp_path / "b.jpg", os.urandom(100))
    await sink.put_item("ds", single(a))
    await sink.put_item("ds", single(b))
    await asyncio.gather(sink.delete_item("ds", "/", "a.jpg"), sink.delete_item("ds", "/", "x"))
    assert set(fake.rows_of("ds")) == {"ingestd:ds:/b.jpg"}
    await sink.delete_item("ds", "/", "a.jpg")  # already gone: fine
    await sink.put_item("ds", single(a))  # the key was freed: a new row
    assert set(fake.rows_of("ds")) == {"ingestd:ds:/a.jpg", "ingestd:ds:/b.jpg"}


# --- batching --------------------------------------------------------------------------


async def test_concurrent_puts_share_a_task_and_get_their_own_results(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    fake.refuse = lambda p: "Invalid asset" if "bad" in str(p.get("external_id")) else None
    names = [f"img{i}.jpg" for i in range(8)] + ["bad.jpg"]
    files = [write(tmp_path / n, os.urandom(300)) for n in names]
    await sink.ensure_dataset("ds")
    results = await asyncio.gather(
        *(sink.put_item("ds", single(f)) for f in files), return_exceptions=True
    )
    assert sum(fake.upsert_tasks) == 9 and len(fake.upsert_tasks) <= 3
    good, bad = results[:-1], results[-1]
    assert [r.backend_id for r in good] == [f"ingestd:ds:/{n}" for n in names[:-1]]  # type: ignore[union-attr]
    assert isinstance(bad, PermanentError) and "/bad.jpg" in bad.reason
    assert "Invalid asset" in bad.reason
    assert len(fake.rows_of("ds")) == 8


async def test_rows_are_chunked_by_size(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lb, "CHUNK_MAX_BYTES", 700)
    files = [write(tmp_path / f"{i}.jpg", os.urandom(100)) for i in range(5)]
    await sink.ensure_dataset("ds")
    await asyncio.gather(
        *(sink.put_item("ds", single(f, tag=f"t{i}")) for i, f in enumerate(files))
    )
    assert len(fake.rows_of("ds")) == 5
    chunk_docs = [f for f in fake.files.values() if f["filename"] == "json_import.json"]
    assert len(chunk_docs) >= 3
    assert all(len(c["data"]) <= 700 for c in chunk_docs if c["data"].count(b'"GKEY"') > 1)


async def test_a_failed_task_is_retried_later(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    fake.fail_tasks = True
    f = write(tmp_path / "a.jpg", os.urandom(100))
    with pytest.raises(RetriableError, match="Internal error"):
        await sink.put_item("ds", single(f))
    fake.fail_tasks = False
    await sink.put_item("ds", single(f))
    assert len(fake.rows_of("ds")) == 1


async def test_slow_tasks_are_polled_to_completion(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    fake.task_polls = 4
    f = write(tmp_path / "a.jpg", os.urandom(100))
    await sink.put_item("ds", single(f))
    polls = [op for _, op, _ in fake.requests if op == "user"]
    assert len(polls) == 4 and len(fake.rows_of("ds")) == 1


# --- failures --------------------------------------------------------------------------


async def test_429_storm_with_retry_after(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    f = write(tmp_path / "a.jpg", os.urandom(2000))
    await sink.ensure_dataset("ds")
    fake.fail_next(3, 429, retry_after="0.4")
    await sink.put_item("ds", single(f, camera="c"))
    assert len(fake.rows_of("ds")) == 1
    times = [t for t, _, _ in fake.requests]
    statuses = [s for _, _, s in fake.requests]
    storm = [i for i, s in enumerate(statuses) if s == 429]
    assert len(storm) == 3
    for i in storm:  # each 429 was followed by a wait of at least its Retry-After
        assert times[i + 1] - times[i] >= 0.39


async def test_a_retry_after_holds_back_every_request_of_the_sink(
    sink: LabelboxSink, fake: LabelboxFake
) -> None:
    fake.fail_next(1, 429, retry_after="0.5", match="datasets")

    async def later() -> None:
        await asyncio.sleep(0.1)  # after the 429 has come back
        await sink._gql(lb.Q_ONTOLOGY, {}, "reading the ontology")

    await asyncio.gather(sink.ensure_dataset("ds"), later())
    [(t429, _, _)] = [r for r in fake.requests if r[2] == 429]
    [(t_other, _, _)] = [r for r in fake.requests if r[1] == "customMetadataOntology"]
    assert t_other - t429 >= 0.45  # it waited out the Retry-After it was never given


async def test_a_long_retry_after_goes_back_to_the_ledger(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    f = write(tmp_path / "a.jpg", os.urandom(200))
    fake.fail_next(1, 429, retry_after="3600")
    with pytest.raises(RetriableError) as e:
        await sink.put_item("ds", single(f))
    assert e.value.retry_after == 3600


async def test_5xx_runs_out_into_a_retriable_error(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    f = write(tmp_path / "a.jpg", os.urandom(200))
    await sink.ensure_dataset("ds")
    fake.fail_next(50, 503, retry_after=None)
    with pytest.raises(RetriableError, match="HTTP 503"):
        await sink.put_item("ds", single(f))
    fake.faults.clear()
    await sink.put_item("ds", single(f))
    assert len(fake.rows_of("ds")) == 1


async def test_upload_dropped_midway_is_sent_again_whole(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    f = write(tmp_path / "big.jpg", os.urandom(3 << 20))
    await sink.ensure_dataset("ds")
    fake.drop_next_upload(after_bytes=1 << 20)
    await sink.put_item("ds", single(f))
    row = only_row(fake)
    assert fake.fetch(row["row_data"]) == f.read_bytes()
    assert fake.uploads_started >= 2


async def test_a_put_cut_off_halfway_then_redone_leaves_one_row(
    fake: LabelboxFake, tmp_path: Path
) -> None:
    f = write(tmp_path / "a.jpg", os.urandom(100_000))
    first = make_sink(fake.url)
    await first.ensure_dataset("ds")
    fake.hold_uploads()
    put = asyncio.create_task(first.put_item("ds", single(f)))
    while fake.held == 0:
        await asyncio.sleep(0.01)
    put.cancel()  # the daemon stopped mid-upload
    with pytest.raises(asyncio.CancelledError):
        await put
    await first.close()
    fake.release_uploads()
    second = make_sink(fake.url)
    try:
        await second.put_item("ds", single(f))
        await second.put_item("ds", single(f))  # the ledger may send it once more
    finally:
        await second.close()
    row = only_row(fake)
    assert fake.fetch(row["row_data"]) == f.read_bytes()
    assert len(fake.datasets) == 1


async def test_digest_mismatch_means_the_source_changed(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    f = write(tmp_path / "a.jpg", os.urandom(5000))
    item = single(f)
    write(f, os.urandom(5000))  # same size, other bytes
    with pytest.raises(SourceChangedError, match=r"a.jpg changed"):
        await sink.put_item("ds", item)
    f.unlink()
    with pytest.raises(SourceChangedError, match="vanished"):
        await sink.put_item("ds", item)
    assert fake.rows_of("ds") == {}


async def test_the_api_key_is_never_shown(fake: LabelboxFake, tmp_path: Path) -> None:
    f = write(tmp_path / "a.jpg", os.urandom(100))
    with structlog.testing.capture_logs() as logs:
        good = make_sink(fake.url)
        try:
            await good.put_item("ds", single(f, camera="c"))
            fake.fail_next(2, 503, retry_after=None)
            await good.put_item("ds", single(f, camera="d"))
        finally:
            await good.close()
        wrong = LabelboxBackend(kind="labelbox", api_key_env=ENV, base_url=fake.url)
        os.environ[ENV] = "not-the-key-1234"
        bad = LabelboxSink(wrong)
        try:
            with pytest.raises(PermanentError) as e:
                await bad.put_item("ds", single(f))
        finally:
            await bad.close()
    assert "HTTP 401" in e.value.reason and f"api_key_env {ENV}" in e.value.reason
    assert "not-the-key-1234" not in e.value.reason and KEY not in e.value.reason
    text = repr(logs) + repr(e.value)
    assert KEY not in text and "not-the-key-1234" not in text


async def test_graphql_errors_are_classified(sink: LabelboxSink, fake: LabelboxFake) -> None:
    with pytest.raises(PermanentError, match="Cannot query field"):
        await sink._gql("query { nosuchfield { id } }", {}, "testing")
    with pytest.raises(PermanentError, match="Syntax Error"):
        await sink._gql("query {", {}, "testing")


async def test_a_big_upload_streams(tmp_path: Path) -> None:
    """The bytes are read as the socket takes them (the fake runs in another process,
    so this process's memory is the sink's)."""
    f = tmp_path / "big.bin"
    with open(f, "wb") as fh:
        for _ in range(40):
            fh.write(os.urandom(1 << 20))
    proc = FakeProcess(KEY)
    try:
        s = make_sink(proc.url)
        item = single(f, kind="file")
        tracemalloc.start()
        try:
            await s.put_item("ds", item)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            await s.close()
        [row] = proc.state()["datasets"]["ds"].values()
        assert proc.fetch(row["row_data"]) == f.read_bytes()
        assert proc.state()["chunked_uploads"] == 0
        assert peak < 12 << 20, f"peak {peak / 2**20:.1f} MiB for a 40 MiB file"
    finally:
        proc.stop()
