"""The labelbox sink against the fake Labelbox GraphQL API (tests/support/fakes/labelbox.py,
which labelbox-python 7.17 is run against in tests/e2e/test_labelbox_sdk.py) on real
loopback sockets: what ends up in the fake's rows, files and metadata is what a
Labelbox organisation would hold. The conformance suite holds the sink to the cases
every sink shares; these are Labelbox's own."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from ingestd.config import LabelboxBackend
from ingestd.core.errors import PermanentError, RetriableError, SourceChangedError
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
from ingestd.sinks.base import BatchItem, BatchPutter, MetadataUpdater, PutResult, Sink
from ingestd.sinks.labelbox import LabelboxSink, global_key
from ingestd.sinks.labelbox import graphql as gq
from ingestd.sinks.labelbox import rows as rw
from ingestd.sinks.labelbox import sink as lbsink

from tests.support.fakes.labelbox import FakeProcess, LabelboxFake
from tests.support.wait import wait_until

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


def remote(name: str, url: str, https: str | None = None) -> FilePayload:
    return FilePayload(name, "", 1234, "", url=url, etag="e1", https_url=https)


def backend(fake_url: str, **kw: Any) -> LabelboxBackend:
    return LabelboxBackend(kind="labelbox", api_key_env=ENV, base_url=fake_url, **kw)


def make_sink(url: str, **kw: Any) -> LabelboxSink:
    sink = LabelboxSink(backend(url, **kw), workers=4)
    # Fast polls and backoff: the shapes are what is tested, not the waits.
    sink.poll_first = sink.poll_most = 0.01
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


def ops(fake: LabelboxFake) -> list[str]:
    return [op for _, op, _ in fake.requests]


# --- identity, URLs, the interface ---------------------------------------------------------


def test_global_key_is_stable_escaped_and_within_the_limit() -> None:
    assert global_key("photos", "/a/b.jpg") == "ingestd:photos:/a/b.jpg"
    # ':' in a dataset name is escaped, so dataset "a:/x" + "/y" differs from "a" + "/x:/y"
    assert global_key("a:/x", "/y") != global_key("a", "/x:/y")
    assert global_key("a:/x", "/y") == "ingestd:a%3A/x:/y"
    long = global_key("ds", "/" + "n" * 300)
    assert long.startswith("ingestd:sha256:") and len(long) <= 200
    assert long == global_key("ds", "/" + "n" * 300)
    assert long != global_key("ds2", "/" + "n" * 300)


def test_registered_objects_are_read_by_their_https_url() -> None:
    azure = "https://acct.blob.core.windows.net/box/cams/a%20%231.jpg"
    assert rw.fetchable_url(remote("a", "az://box/cams/a #1.jpg", azure)) == azure
    s3 = "https://bkt.s3.amazonaws.com/a.jpg"
    assert rw.fetchable_url(remote("a", "s3://bkt/a.jpg", s3)) == s3
    assert rw.fetchable_url(remote("a", "https://cdn.example/x.png")) == "https://cdn.example/x.png"
    # The source knows no https form: the user is told what to change.
    with pytest.raises(PermanentError, match=r"az://box/c.jpg.*storage account.*account"):
        rw.fetchable_url(remote("c", "az://box/c.jpg"))
    with pytest.raises(PermanentError, match=r"s3://lan/c.jpg.*not an https URL.*copy"):
        rw.fetchable_url(remote("c", "s3://lan/c.jpg"))
    with pytest.raises(PermanentError, match="https"):
        rw.fetchable_url(remote("c", "http://insecure.example/x.png"))


async def test_implements_the_sink_interface(sink: LabelboxSink) -> None:
    assert isinstance(sink, Sink) and isinstance(sink, MetadataUpdater)
    assert isinstance(sink, BatchPutter)
    caps = sink.capabilities
    assert caps.remote_urls and caps.metadata_update and caps.delete
    assert caps.batch is not None and caps.batch.items >= 1000
    assert caps.batch.items <= rw.ROWS_PER_TASK
    assert KEY not in repr(sink)
    assert sink.endpoint.endswith("/graphql")
    assert sink.client.pacer.rate is None  # no client-side budget unless configured


def test_endpoint_and_budget_from_the_backend() -> None:
    assert LabelboxSink(LabelboxBackend(kind="labelbox", api_key_env=ENV)).endpoint == (
        "https://api.labelbox.com/graphql"
    )
    assert make_sink("https://lb.example/graphql").endpoint == "https://lb.example/graphql"
    assert make_sink("https://lb.example/api").endpoint == "https://lb.example/api/graphql"
    paced = make_sink("https://lb.example", requests_per_minute=600)
    assert paced.client.pacer.rate == 10.0


# --- items ---------------------------------------------------------------------------------


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
    assert fake.chunked_uploads == 0  # sent with a Content-Length
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


async def test_dicom_series_goes_without_a_media_type(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    """labelbox-python 7.x's MediaType has no DICOM (and the fake refuses one, as the
    SDK cannot send it): the row carries no media_type and Labelbox decides."""
    paths = [write(tmp_path / f"s{i}.dcm", os.urandom(3000)) for i in range(4)]
    slot = SlotPayload("series", "dicom", tuple(fp(p) for p in paths))
    await sink.put_item("ds", ItemPayload("/ct", "series", (slot,), {"Modality": "CT"}))
    row = only_row(fake)
    assert row["media_type"] is None
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


# --- registered objects and delegated access --------------------------------------------------


async def test_a_created_dataset_gets_the_default_integration(
    sink: LabelboxSink, fake: LabelboxFake
) -> None:
    fake.add_integration("other", default=False)
    fake.add_integration("s3-read")
    slots = (
        SlotPayload("0", "image", (remote("a #1.jpg", "s3://bkt/cams/a #1.jpg", "https://s3/a"),)),
        SlotPayload("1", "image", (remote("b.jpg", "az://box/cams/b.jpg", "https://az/b"),)),
    )
    await sink.put_item("ds", ItemPayload("/cams", "pair", slots, {"site": "north"}))
    assert fake.state()["signers"] == {"ds": "s3-read"}
    row = only_row(fake)
    assert row["row_data"] == "https://s3/a"
    assert [a["value"] for a in row["attachments"]] == ["https://az/b"]
    # no bytes moved: the only uploads are the row chunk and the manifest
    assert sorted(f["filename"] for f in fake.files.values()) == [
        "json_import.json",
        "manifest.json",
    ]
    assert ops(fake)[:4] == [
        "datasets,iamIntegrations",  # one request: the lookup and the integrations
        "createDataset",
        "setSignerForDataset",
        "validateDataset",
    ]


async def test_bucket_objects_without_delegated_access_fail_clearly(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    obj = ItemPayload(
        "/",
        "a.jpg",
        (SlotPayload("0", "image", (remote("a.jpg", "gs://b/a.jpg", "https://g/a"),)),),
        {},
    )
    with pytest.raises(
        PermanentError, match=r"gs://b/a.jpg.*delegated-access.*'ds' has none.*copy"
    ):
        await sink.put_item("ds", obj)
    assert fake.state()["signers"] == {"ds": None} and fake.rows_of("ds") == {}
    # Local files need no integration; public https URLs neither.
    f = write(tmp_path / "b.jpg", os.urandom(100))
    web = ItemPayload(
        "/", "w.jpg", (SlotPayload("0", "image", (remote("w.jpg", "https://cdn/w.jpg"),)),), {}
    )
    results = await sink.put_items([BatchItem("ds", single(f)), BatchItem("ds", web)])
    assert [type(r) for r in results] == [PutResult, PutResult]
    # Once the dataset has an integration (attached by hand), the object goes through:
    # after a refusal the dataset is looked up again.
    with pytest.raises(PermanentError, match="has none"):
        await sink.put_item("ds", obj)
    ds = fake.datasets[fake.dataset_id("ds") or ""]
    ds["signer"] = fake.integrations[fake.add_integration(default=False)]
    await sink.put_item("ds", obj)
    assert fake.rows_of("ds")["ingestd:ds:/a.jpg"]["row_data"] == "https://g/a"


async def test_an_integration_that_does_not_validate_leaves_no_dataset(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    fake.add_integration("broken", validates=False)
    f = write(tmp_path / "a.jpg", os.urandom(100))
    with pytest.raises(PermanentError, match=r"'broken' did not validate.*fix the integration"):
        await sink.put_item("ds", single(f))
    assert fake.state()["signers"] == {}  # created, then deleted again (as the SDK does)
    assert fake.files == {}


async def test_an_invalid_default_integration_is_named(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    fake.add_integration("stale", valid=False)
    f = write(tmp_path / "a.jpg", os.urandom(100))
    with pytest.raises(PermanentError, match=r"integration 'stale' is not valid"):
        await sink.put_item("ds", single(f))
    assert fake.datasets == {}


# --- metadata --------------------------------------------------------------------------------


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


async def test_date_times_are_sent_as_the_sdk_formats_them(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    """labelbox.utils.format_iso_datetime: UTC, whole seconds, a 'Z'; no offset is UTC."""
    f = write(tmp_path / "a.jpg", os.urandom(100))
    await sink.put_item("ds", single(f, captureDateTime="2024-05-01T12:00:00.123456+02:00"))
    assert only_row(fake)["metadata"] == {"captureDateTime": "2024-05-01T10:00:00Z"}
    await sink.put_item("ds", single(f, captureDateTime="2024-05-01T12:00:00"))
    assert only_row(fake)["metadata"] == {"captureDateTime": "2024-05-01T12:00:00Z"}


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
    await sink.put_items([BatchItem("ds", single(a)), BatchItem("ds", single(b))])
    await asyncio.gather(sink.delete_item("ds", "/", "a.jpg"), sink.delete_item("ds", "/", "x"))
    assert set(fake.rows_of("ds")) == {"ingestd:ds:/b.jpg"}
    await sink.delete_item("ds", "/", "a.jpg")  # already gone: fine
    await sink.put_item("ds", single(a))  # the key was freed: a new row
    assert set(fake.rows_of("ds")) == {"ingestd:ds:/a.jpg", "ingestd:ds:/b.jpg"}


# --- groups: one import task -----------------------------------------------------------------


async def test_a_group_is_one_task_and_each_item_gets_its_own_result(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    fake.refuse = lambda p: "Invalid asset" if "bad" in str(p.get("external_id")) else None
    names = [f"img{i}.jpg" for i in range(40)] + ["bad.jpg"]
    files = [write(tmp_path / n, os.urandom(300 + i)) for i, n in enumerate(names)]
    changed = single(files[0], name="changed.jpg")
    write(files[0], os.urandom(300))  # same size, other bytes: the source changed
    await sink.ensure_dataset("ds")
    before = len(fake.requests)
    batch = [BatchItem("ds", changed)] + [BatchItem("ds", single(f)) for f in files[1:]]
    results = await sink.put_items(batch)
    assert fake.upsert_tasks == [40]  # one task for every row that could be sent
    assert isinstance(results[0], SourceChangedError) and "img0.jpg" in results[0].reason
    assert [r.backend_id for r in results[1:-1]] == [f"ingestd:ds:/{n}" for n in names[1:-1]]  # type: ignore[union-attr]
    bad = results[-1]
    assert isinstance(bad, PermanentError) and "/bad.jpg" in bad.reason
    assert "Invalid asset" in bad.reason
    assert len(fake.rows_of("ds")) == 39
    # 40 uploads, a chunk, a manifest, the upsert, one poll, the failures: no lookups
    assert len(fake.requests) - before == 40 + 5


async def test_uploads_run_twenty_at_a_time(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    files = [write(tmp_path / f"{i}.png", os.urandom(200)) for i in range(30)]
    await sink.ensure_dataset("ds")
    fake.hold_uploads()
    put = asyncio.create_task(sink.put_items([BatchItem("ds", single(f)) for f in files]))
    await wait_until(lambda: fake.held >= lbsink.UPLOADS, what="the uploads to reach the fake")
    fake.release_uploads()
    results = await put
    assert all(isinstance(r, PutResult) for r in results)
    assert fake.most_uploading == lbsink.UPLOADS


async def test_a_group_of_several_datasets_and_a_repeated_key(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    a = write(tmp_path / "a.jpg", os.urandom(100))
    b = write(tmp_path / "b.jpg", os.urandom(120))
    first, again = single(a), single(b, name="a.jpg")  # the same key twice
    results = await sink.put_items(
        [BatchItem("one", first), BatchItem("two", single(b)), BatchItem("one", again)]
    )
    assert all(isinstance(r, PutResult) for r in results)
    # One task per dataset; the repeated key in a task of its own, after the first.
    assert sorted(fake.upsert_tasks) == [1, 1, 1]
    assert fake.fetch(fake.rows_of("one")["ingestd:one:/a.jpg"]["row_data"]) == b.read_bytes()
    assert set(fake.rows_of("two")) == {"ingestd:two:/b.jpg"}


async def test_a_dataset_that_cannot_be_had_fails_its_items_with_one_lookup(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    files = [write(tmp_path / f"{i}.jpg", os.urandom(100)) for i in range(5)]
    fake.error_next(2, "AUTHORIZATION_ERROR", message="not allowed", match="datasets")
    results = await sink.put_items([BatchItem("ds", single(f)) for f in files])
    assert all(isinstance(r, PermanentError) and "may not do this" in r.reason for r in results)
    # the lookup with the integrations, then without them: not one per item
    assert ops(fake) == ["datasets,iamIntegrations", "datasets"]


async def test_a_key_that_may_not_read_integrations_still_creates_datasets(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path
) -> None:
    fake.add_integration("s3-read")
    fake.error_next(1, "AUTHORIZATION_ERROR", message="admins only", match="datasets")
    f = write(tmp_path / "a.jpg", os.urandom(100))
    with structlog.testing.capture_logs() as logs:
        await sink.put_item("ds", single(f))
    assert fake.state()["signers"] == {"ds": None} and len(fake.rows_of("ds")) == 1
    assert any("may not read the delegated-access" in e["event"] for e in logs)


async def test_rows_are_chunked_by_size(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rw, "CHUNK_MAX_BYTES", 700)
    files = [write(tmp_path / f"{i}.jpg", os.urandom(100)) for i in range(5)]
    await sink.put_items([BatchItem("ds", single(f, tag=f"t{i}")) for i, f in enumerate(files)])
    assert len(fake.rows_of("ds")) == 5 and fake.upsert_tasks == [5]
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
    assert ops(fake).count("user") == 4 and len(fake.rows_of("ds")) == 1


@pytest.mark.parametrize("end", ["CANCELED", "SOMETHING_NEW"])
async def test_every_terminal_task_state_ends_the_wait(
    fake: LabelboxFake, tmp_path: Path, end: str
) -> None:
    """labelbox-python waits while IN_PROGRESS and stops at anything else: a canceled
    or unknown task is not polled until the 900 s timeout."""
    fake.end_status = end
    s = make_sink(fake.url)
    s.poll_first, s.poll_most = 0.05, 2.0
    f = write(tmp_path / "a.jpg", os.urandom(100))
    started = time.monotonic()
    try:
        with pytest.raises(RetriableError, match=rf"ended {end}"):
            await s.put_item("ds", single(f))
    finally:
        await s.close()
    assert time.monotonic() - started < 5
    assert ops(fake).count("user") == 1 and "failedDataRowImports" not in ops(fake)


# --- failures --------------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    "fault",
    ["internal error", "API limit"],
)
async def test_graphql_errors_in_200_answers_are_retried(
    sink: LabelboxSink, fake: LabelboxFake, tmp_path: Path, fault: str
) -> None:
    f = write(tmp_path / "a.jpg", os.urandom(200))
    await sink.ensure_dataset("ds")
    if fault == "internal error":
        fake.error_next(2, "INTERNAL_SERVER_ERROR", inner=503, match="upsertDataRows")
    else:
        fake.limit_next(2, match="upsertDataRows")
    await sink.put_item("ds", single(f))
    assert len(fake.rows_of("ds")) == 1
    assert ops(fake).count("upsertDataRows") == 3


async def test_graphql_client_errors_are_not_retried(
    sink: LabelboxSink, fake: LabelboxFake
) -> None:
    fake.error_next(1, "INTERNAL_SERVER_ERROR", inner=422, message="bad input", match="datasets")
    with pytest.raises(PermanentError, match="rejected: bad input"):
        await sink.ensure_dataset("ds")
    with pytest.raises(PermanentError, match="Cannot query field"):
        await sink._gql("query { nosuchfield { id } }", {}, "testing")
    with pytest.raises(PermanentError, match="Syntax Error"):
        await sink._gql("query {", {}, "testing")
    assert ops(fake).count("datasets,iamIntegrations") == 1


def test_the_retry_rule() -> None:
    def answer(status: int, body: str) -> gq.Answer:
        return gq.Answer(status, {}, body.encode())

    assert gq.labelbox_rule(answer(200, '{"data": {"x": 1}}')) == "ok"
    assert gq.labelbox_rule(answer(429, "")) == "retry"
    assert gq.labelbox_rule(answer(502, "bad gateway")) == "retry"
    assert gq.labelbox_rule(answer(200, "<html>")) == "retry"
    assert gq.labelbox_rule(answer(200, '{"message": "You have exceeded the limit"}')) == "retry"
    err = '{"errors": [{"message": "m", "extensions": {"code": "%s"%s}}]}'
    internal = err % ("INTERNAL_SERVER_ERROR", "")
    assert gq.labelbox_rule(answer(200, internal)) == "retry"
    client = err % ("INTERNAL_SERVER_ERROR", ', "exception": {"status": 400}')
    assert gq.labelbox_rule(answer(200, client)) == "reject"
    limited = err % ("INTERNAL_SERVER_ERROR", ', "exception": {"status": 429}')
    assert gq.labelbox_rule(answer(200, limited)) == "retry"
    for code in ("AUTHENTICATION_ERROR", "AUTHORIZATION_ERROR", "GRAPHQL_VALIDATION_FAILED"):
        assert gq.labelbox_rule(answer(200, err % (code, ""))) == "reject"
    assert gq.labelbox_rule(answer(400, err % ("GRAPHQL_PARSE_FAILED", ""))) == "reject"


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
    await wait_until(lambda: fake.held >= 1, what="the upload to reach the fake")
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
    for size in (5000, 3 << 20):  # read whole, and streamed
        f = write(tmp_path / f"a{size}.jpg", os.urandom(size))
        item = single(f)
        write(f, os.urandom(size))  # same size, other bytes
        with pytest.raises(SourceChangedError, match=rf"a{size}.jpg changed"):
            await sink.put_item("ds", item)
        f.unlink()
        with pytest.raises(SourceChangedError, match="vanished"):
            await sink.put_item("ds", item)
    assert fake.rows_of("ds") == {}
    assert not any(f["filename"].startswith("a") for f in fake.files.values())


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
    assert "HTTP 401" in e.value.reason and ENV in e.value.reason
    assert "not-the-key-1234" not in e.value.reason and KEY not in e.value.reason
    text = repr(logs) + repr(e.value)
    assert KEY not in text and "not-the-key-1234" not in text


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
