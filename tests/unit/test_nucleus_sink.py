"""The `nucleus` sink against the fake Scale Nucleus API (tests/support/fakes/nucleus.py) on real
loopback sockets, with real image files made by Pillow."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from ingestd.config import NucleusBackend
from ingestd.core.errors import PermanentError, RetriableError, SourceChangedError
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload
from ingestd.sinks.base import BatchItem, BatchPutter, MetadataUpdater, PutResult, Sink
from ingestd.sinks.nucleus import NucleusSink, api
from PIL import Image

from tests.support.fakes.nucleus import FakeNucleus, serve

KEY_ENV = "NUCLEUS_UNIT_TEST_KEY"
DS = "photos"


# --- helpers -----------------------------------------------------------------------------


def digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def png(
    path: Path, size: tuple[int, int] = (32, 24), color: tuple[int, int, int] = (200, 0, 0)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG")
    return path


def jpeg(
    path: Path, size: tuple[int, int] = (32, 24), color: tuple[int, int, int] = (0, 90, 0)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG")
    return path


def fp(path: Path, name: str | None = None) -> FilePayload:
    return FilePayload(name or path.name, str(path), path.stat().st_size, digest(path))


def image_item(path: Path, folder: str = "/", name: str | None = None, **md: Any) -> ItemPayload:
    return ItemPayload(folder, name or path.name, (SlotPayload("0", "image", (fp(path),)),), md)


def group_item(
    files: list[Path], name: str, *, channels: bool = False, folder: str = "/", **md: Any
) -> ItemPayload:
    """What plan/groups.py makes of a folder: `slots` names slots 0..n-1, `channels`
    after the files; slot 0 carries the layout hint."""
    slots = []
    for i, f in enumerate(files):
        extra = {"layout": {"type": "grid"}} if i == 0 else {}
        slots.append(SlotPayload(f.name if channels else str(i), "image", (fp(f),), extra))
    return ItemPayload(folder, name, tuple(slots), md)


def cloud_https(url: str) -> str | None:
    """What the bucket source gives an AWS or Google Cloud object as its https URL."""
    scheme, _, rest = url.partition("://")
    bucket, _, key = rest.partition("/")
    if scheme == "s3":
        return f"https://{bucket}.s3.amazonaws.com/{key}"
    if scheme == "gs":
        return f"https://storage.googleapis.com/{bucket}/{key}"
    return None


def remote(url: str, name: str, https_url: str | None = "cloud") -> FilePayload:
    https = cloud_https(url) if https_url == "cloud" else https_url
    return FilePayload(name, "", 1234, "", url=url, etag="e1", https_url=https)


def remote_item(url: str, name: str, https_url: str | None = "cloud", **md: Any) -> ItemPayload:
    return ItemPayload("/", name, (SlotPayload("0", "image", (remote(url, name, https_url),)),), md)


def batch(items: list[ItemPayload], dataset: str = DS) -> list[BatchItem]:
    return [BatchItem(dataset, it) for it in items]


def failures(results: list[PutResult | Exception]) -> dict[int, Exception]:
    return {i: r for i, r in enumerate(results) if isinstance(r, Exception)}


@pytest.fixture
async def fake() -> AsyncIterator[FakeNucleus]:
    f = FakeNucleus(job_polls=2)
    async with serve(f):
        yield f


@pytest.fixture
async def make_sink(fake: FakeNucleus, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    sinks: list[NucleusSink] = []
    monkeypatch.setenv(KEY_ENV, fake.api_key)

    def make(key: str | None = None, **tunables: Any) -> NucleusSink:
        if key is not None:
            monkeypatch.setenv(KEY_ENV, key)
        backend = NucleusBackend(
            kind="nucleus",
            api_key_env=KEY_ENV,
            base_url=fake.base_url,
            requests_per_minute=60_000,
        )
        sink = NucleusSink(backend, workers=8)
        # Fast backoff and polling: the shape of the behaviour is what is tested.
        sink.client.backoff_base = 0.01
        sink.client.backoff_cap = 2.0
        sink.appender.poll_first = 0.01
        sink.appender.poll_most = 0.05
        for k, v in tunables.items():
            setattr(sink.appender, k, v)
        sinks.append(sink)
        return sink

    yield make
    for s in sinks:
        await s.close()


@pytest.fixture
def sink(make_sink: Any) -> NucleusSink:
    return make_sink()


# --- the basics --------------------------------------------------------------------------


async def test_implements_the_interfaces(sink: NucleusSink) -> None:
    assert isinstance(sink, Sink)
    assert isinstance(sink, MetadataUpdater)
    assert isinstance(sink, BatchPutter)
    caps = sink.capabilities
    assert (caps.remote_urls, caps.metadata_update, caps.delete) == (True, True, True)
    assert caps.batch is not None and caps.batch.items >= 10 * api.FILES_PER_APPEND


async def test_dataset_is_created_once_and_found_by_name_later(
    fake: FakeNucleus, make_sink: Any
) -> None:
    a = make_sink()
    await asyncio.gather(a.ensure_dataset(DS), a.ensure_dataset(DS))
    await a.close()
    b = make_sink()  # a fresh process: finds the dataset by name instead of making another
    await b.ensure_dataset(DS)
    await b.close()
    assert len(fake.dataset_ids(DS)) == 1
    assert len(fake.requests("POST", "/dataset/create")) == 1
    assert len(fake.requests("GET", "/dataset/details")) == 2


async def test_two_datasets_with_the_name_are_refused_clearly(
    fake: FakeNucleus, sink: NucleusSink
) -> None:
    fake.add_dataset(DS)
    fake.add_dataset(DS)
    with pytest.raises(PermanentError, match="2 datasets named 'photos'"):
        await sink.ensure_dataset(DS)


async def test_single_image_as_the_current_sdk_sends_it(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    img = png(tmp_path / "a.png")
    item = image_item(img, "/cams/north", camera="north", exposure=12.5)
    await sink.ensure_dataset(DS)
    result = await sink.put_item(DS, item)
    assert result.backend_id == "/cams/north/a.png"
    items = fake.items(DS)
    assert list(items) == ["/cams/north/a.png"]
    stored = items["/cams/north/a.png"]
    assert stored["metadata"] == {"camera": "north", "exposure": 12.5}
    assert stored["image"]["digest"] == digest(img)
    assert stored["image"]["content_type"] == "image/png"
    assert fake.blobs(DS)["/cams/north/a.png"] == img.read_bytes()
    # Basic auth with the key as user name was required by the fake for every call
    assert all(r.status != 401 for r in fake.requests())
    # multipart to the async append (the SDK's path since 0.19), sent with a length
    (append,) = fake.appends()
    assert append.query == "async=1"
    assert "Content-Length" in append.headers
    assert append.headers.get("Transfer-Encoding") is None
    # the item JSON as the SDK builds it: no upload_to_scale (dropped in 0.16.8)
    (sent,) = fake.received
    assert set(sent) == {"metadata", "reference_id", "image_url", "update"}
    assert sent["update"] is True
    # the job was polled to its end (the fake answers Running twice first)
    assert len(fake.requests("GET", "/job/")) == 3


async def test_put_without_ensure_dataset_still_works(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    await sink.put_item(DS, image_item(jpeg(tmp_path / "b.jpg")))
    assert list(fake.items(DS)) == ["/b.jpg"]
    assert fake.items(DS)["/b.jpg"]["image"]["content_type"] == "image/jpeg"


# --- groups from the backlog -------------------------------------------------------------


async def test_a_group_goes_in_appends_of_ten_and_one_jobs_listing_per_poll(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    items = [image_item(png(tmp_path / f"{i:03d}.png", color=(i, 0, 0)), n=i) for i in range(95)]
    await sink.ensure_dataset(DS)
    before = len(fake.requests())
    results = await sink.put_items(batch(items))
    assert [r.backend_id for r in results if isinstance(r, PutResult)] == [i.key for i in items]
    stored = fake.items(DS)
    assert sorted(stored) == sorted(it.key for it in items)
    assert all(stored[it.key]["metadata"] == it.metadata for it in items)
    assert len(fake.appends()) == 10  # 9 x 10 + 5, not 95 requests
    polls = fake.job_answers()
    assert polls and all(r.path == "/jobs/" for r in polls)  # one listing answers for all
    assert len(polls) <= 4
    assert len(fake.requests()) - before == 10 + len(polls)


async def test_groups_of_several_datasets_and_split_items(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    views = [png(tmp_path / "g" / f"{i}.png", color=(0, i * 40, 0)) for i in range(3)]
    group = [
        BatchItem("a", image_item(png(tmp_path / "a1.png"))),
        BatchItem("b", image_item(png(tmp_path / "b1.png"))),
        BatchItem("a", group_item(views, "g")),
        BatchItem("a", image_item(png(tmp_path / "a2.png"))),
    ]
    results = await sink.put_items(group)
    assert failures(results) == {}
    assert sorted(fake.items("a")) == ["/a1.png", "/a2.png", "/g", "/g#1", "/g#2"]
    assert list(fake.items("b")) == ["/b1.png"]


async def test_each_item_of_a_group_hears_its_own_result(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    items = [image_item(png(tmp_path / f"{i}.png")) for i in range(5)]
    fake.reject_refs["/2.png"] = "Image processing failed"
    results = await sink.put_items(batch(items))
    failed = failures(results)
    assert list(failed) == [2]
    err = failed[2]
    assert isinstance(err, PermanentError)
    assert "2.png" in err.reason and "Image processing failed" in err.reason
    assert sorted(fake.items(DS)) == ["/0.png", "/1.png", "/3.png", "/4.png"]
    assert len(fake.appends()) == 1  # the job's errors named the item: no re-sends


async def test_a_request_refused_whole_is_sent_again_one_by_one(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    items = [image_item(png(tmp_path / f"{i}.png")) for i in range(4)]
    fake.refuse_refs.add("/1.png")
    results = await sink.put_items(batch(items))
    failed = failures(results)
    assert list(failed) == [1]
    assert isinstance(failed[1], PermanentError) and "1.png" in failed[1].reason
    assert sorted(fake.items(DS)) == ["/0.png", "/2.png", "/3.png"]
    assert len(fake.appends()) == 3  # the three others alone; the refused one never stored


async def test_job_errors_that_name_no_item_send_each_again_alone(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    items = [image_item(png(tmp_path / f"{i}.png")) for i in range(3)]
    fake.job_final = "Errored_User"  # a job that failed but says nothing of its items
    results = await sink.put_items(batch(items))
    assert all(isinstance(r, PermanentError) for r in results)
    assert all(f"{i}.png" in r.reason for i, r in enumerate(results))  # type: ignore[union-attr]
    assert len(fake.appends()) == 1 + 3


async def test_a_metadata_type_conflict_with_an_unknown_item_fails_that_item(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    """A conflict with an item already in Nucleus (unknown to this process) fails only
    the item in its job."""
    ds_id = fake.add_dataset(DS)
    with fake.lock:
        fake.datasets[ds_id].items["/old.png"] = {
            "reference_id": "/old.png",
            "metadata": {"site": 7},
            "version": 1,
        }
    good = [image_item(png(tmp_path / f"g{i}.png"), site=i) for i in range(3)]
    bad = image_item(png(tmp_path / "bad.png"), site="seven")
    results = await sink.put_items(batch([*good, bad]))
    assert list(failures(results)) == [3]
    assert isinstance(results[3], PermanentError)
    assert "site" in results[3].reason and "bad.png" in results[3].reason
    assert sorted(fake.items(DS)) == ["/g0.png", "/g1.png", "/g2.png", "/old.png"]


async def test_jobs_are_polled_one_by_one_where_the_listing_is_unknown(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    fake.jobs_listing = False
    items = [image_item(png(tmp_path / f"{i}.png")) for i in range(25)]
    assert failures(await sink.put_items(batch(items))) == {}
    assert len(fake.items(DS)) == 25
    assert len(fake.requests("POST", "/jobs")) == 1  # asked once, then never again
    assert len(fake.requests("GET", "/job/")) == 3 * 3  # three jobs, Running twice each


async def test_a_job_that_never_ends_is_handed_to_the_ledger(
    fake: FakeNucleus, make_sink: Any, tmp_path: Path
) -> None:
    fake.job_polls = 10**6
    sink = make_sink(job_timeout=0.3)
    with pytest.raises(RetriableError, match="still running"):
        await sink.put_item(DS, image_item(png(tmp_path / "a.png")))


@pytest.mark.parametrize("final", ["Errored_Server", "Cancelled", "Retried", "Something_New"])
async def test_every_terminal_job_state_ends_the_wait(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path, final: str
) -> None:
    fake.job_final = final
    with pytest.raises(RetriableError, match=final) as e:
        await sink.put_item(DS, image_item(png(tmp_path / "a.png")))
    assert "a.png" in e.value.reason
    assert len(fake.requests("GET", "/job/")) == 3  # no waiting on after it ended


# --- mapping our item model --------------------------------------------------------------


async def test_multi_slot_item_becomes_one_image_per_slot(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    files = [png(tmp_path / "scan1" / f"view{i}.png", color=(0, i * 40, 0)) for i in range(3)]
    item = group_item(files, "scan1", folder="/scans", operator="ann")
    result = await sink.put_item(DS, item)
    assert result.backend_id == "/scans/scan1"
    items = fake.items(DS)
    assert sorted(items) == ["/scans/scan1", "/scans/scan1#1", "/scans/scan1#2"]
    anchor = items["/scans/scan1"]
    assert anchor["image"]["digest"] == digest(files[0])
    assert anchor["metadata"] == {
        "operator": "ann",
        "ingestd_item": "/scans/scan1",
        "ingestd_slot": "0",
        "ingestd_parts": ["/scans/scan1#1", "/scans/scan1#2"],
    }
    assert items["/scans/scan1#2"]["image"]["digest"] == digest(files[2])
    assert items["/scans/scan1#2"]["metadata"] == {
        "operator": "ann",
        "ingestd_item": "/scans/scan1",
        "ingestd_slot": "2",
    }


async def test_channels_item_parts_are_named_after_the_files(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    files = [png(tmp_path / "cell7" / f"{c}.png") for c in ("dapi", "gfp", "rfp")]
    await sink.put_item(DS, group_item(files, "cell7", channels=True))
    items = fake.items(DS)
    assert sorted(items) == ["/cell7", "/cell7#gfp.png", "/cell7#rfp.png"]
    assert items["/cell7"]["metadata"]["ingestd_slot"] == "dapi.png"


async def test_changed_group_drops_parts_it_no_longer_has(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    files = [png(tmp_path / "g" / f"{i}.png", color=(i * 50, 0, 0)) for i in range(3)]
    await sink.put_item(DS, group_item(files, "g"))
    assert len(fake.items(DS)) == 3
    await sink.put_item(DS, group_item(files[:2], "g", rev=2))
    items = fake.items(DS)
    assert sorted(items) == ["/g", "/g#1"]
    assert items["/g"]["metadata"]["ingestd_parts"] == ["/g#1"]
    assert items["/g#1"]["metadata"]["rev"] == 2
    merge = fake.requests("POST", "/metadata")
    assert [m.query for m in merge] == ["async=0"]


async def test_frame_sampled_video_becomes_one_image_per_frame(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    frames = [
        jpeg(tmp_path / "spool" / f"frame_{i:06d}.jpg", color=(i * 20, 0, 0)) for i in range(4)
    ]
    slot = SlotPayload(
        "0",
        "frames",
        tuple(fp(f) for f in frames),
        {"timestamps": [0.0, 1.0, 2.0, 3.0], "fps": 1.0, "source": "clip.mp4"},
    )
    item = ItemPayload("/videos", "clip.mp4", (slot,), {"site": "a"})
    await sink.put_item(DS, item)
    items = fake.items(DS)
    assert sorted(items) == [
        "/videos/clip.mp4",
        "/videos/clip.mp4#0/frame_000001.jpg",
        "/videos/clip.mp4#0/frame_000002.jpg",
        "/videos/clip.mp4#0/frame_000003.jpg",
    ]
    assert items["/videos/clip.mp4"]["image"]["digest"] == digest(frames[0])
    third = items["/videos/clip.mp4#0/frame_000002.jpg"]
    assert third["image"]["digest"] == digest(frames[2])
    assert third["metadata"]["ingestd_time"] == 2.0
    assert third["image"]["content_type"] == "image/jpeg"


async def test_long_frame_sequence_goes_anchor_first_then_in_requests_of_ten(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    frames = [jpeg(tmp_path / "f" / f"frame_{i:06d}.jpg", color=(i, i, 0)) for i in range(25)]
    slot = SlotPayload(
        "0", "frames", tuple(fp(f) for f in frames), {"timestamps": [float(i) for i in range(25)]}
    )
    await sink.put_item(DS, ItemPayload("/", "long.mp4", (slot,), {}))
    items = fake.items(DS)
    assert len(items) == 25
    assert len(items["/long.mp4"]["metadata"]["ingestd_parts"]) == 24
    appends = fake.appends()
    assert len(appends) == 4  # the anchor alone, then 10 + 10 + 4
    first_poll = fake.requests("GET", "/job/")[0]
    assert appends[0].at < first_poll.at < appends[1].at  # the anchor's job ended first


async def test_dicom_series_is_refused_with_the_fix(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    paths = []
    for i in range(3):
        p = tmp_path / "ct" / f"{i}.dcm"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\0" * 128 + b"DICM" + bytes(64))
        paths.append(p)
    item = ItemPayload("/", "ct", (SlotPayload("ct", "dicom", tuple(fp(p) for p in paths)),), {})
    with pytest.raises(PermanentError, match="do not take DICOM") as e:
        await sink.put_item(DS, item)
    assert "0.dcm" in e.value.reason and "PNG/JPEG" in e.value.reason
    assert fake.appends() == []


async def test_native_video_is_refused_with_the_fix(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    v = tmp_path / "clip.mp4"
    v.write_bytes(b"\0\0\0\x18ftypmp42" + bytes(100))
    item = ItemPayload("/", "clip.mp4", (SlotPayload("0", "video", (fp(v),), {"fps": 1}),), {})
    with pytest.raises(PermanentError, match=r"video: \{mode: frames"):
        await sink.put_item(DS, item)
    assert fake.appends() == []


async def test_oversize_image_is_refused_naming_the_setting(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    big = png(tmp_path / "huge.png", size=(5001, 20))
    with pytest.raises(PermanentError) as e:
        await sink.put_item(DS, image_item(big))
    assert "huge.png" in e.value.reason
    assert "5001 x 20" in e.value.reason
    assert "images" in e.value.reason and "max_dimension" in e.value.reason
    assert fake.appends() == []
    # exactly the limit is fine
    await sink.put_item(DS, image_item(png(tmp_path / "edge.png", size=(5000, 8))))
    assert list(fake.items(DS)) == ["/edge.png"]


async def test_a_file_that_is_not_an_image_is_refused_and_spares_its_group(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    junk = tmp_path / "notes.png"
    junk.write_bytes(b"this is text, not a PNG")
    results = await sink.put_items(batch([image_item(junk), image_item(png(tmp_path / "ok.png"))]))
    assert list(failures(results)) == [0]
    assert isinstance(results[0], PermanentError) and "notes.png" in results[0].reason
    assert list(fake.items(DS)) == ["/ok.png"]


async def test_metadata_type_conflict_is_refused_before_sending(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    await sink.put_item(DS, image_item(png(tmp_path / "a.png"), lane=3))
    requests_before = len(fake.requests())
    with pytest.raises(PermanentError) as e:
        await sink.put_item(DS, image_item(png(tmp_path / "b.png"), lane="three"))
    assert '"lane"' in e.value.reason and "/a.png" in e.value.reason and "/b.png" in e.value.reason
    assert len(fake.requests()) == requests_before  # nothing was sent
    # the item that set a type may change it while no other item uses the key
    await sink.put_item(DS, image_item(png(tmp_path / "a.png"), lane="one"))
    assert fake.items(DS)["/a.png"]["metadata"] == {"lane": "one"}


async def test_nan_metadata_is_refused(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    with pytest.raises(PermanentError, match="score"):
        await sink.put_item(DS, image_item(png(tmp_path / "a.png"), score=float("nan")))


# --- bucket-registered items (remote URLs) -----------------------------------------------


async def test_bucket_registered_item_goes_through_an_import_job(
    fake: FakeNucleus, sink: NucleusSink
) -> None:
    item = ItemPayload(
        "/cam",
        "x.jpg",
        (SlotPayload("0", "image", (remote("s3://bucket/raw/cam/x.jpg", "x.jpg"),)),),
        {"k": "v"},
    )
    await sink.put_item(DS, item)
    stored = fake.items(DS)["/cam/x.jpg"]
    assert stored["image_url"] == "s3://bucket/raw/cam/x.jpg"
    assert stored["metadata"] == {"k": "v"}
    assert fake.appends() == []  # no bytes moved
    assert len(fake.requests("GET", "/signedUrl/")) == 1
    put = fake.requests("PUT", "/_signed/")
    assert len(put) == 1 and "Authorization" not in put[0].headers  # never the key there
    (sent,) = fake.received
    assert set(sent) == {"metadata", "reference_id", "image_url", "update"}  # no upload_to_scale
    assert len(fake.requests("GET", "/job/")) == 3  # polled while Running


async def test_import_job_errors_are_mapped_to_their_items(
    fake: FakeNucleus, sink: NucleusSink
) -> None:
    urls = [f"gs://bkt/p/{i}.jpg" for i in range(4)]
    fake.bad_urls.add(urls[1])
    items = [remote_item(u, f"{i}.jpg") for i, u in enumerate(urls)]
    results = await sink.put_items(batch(items))
    assert list(failures(results)) == [1]
    err = results[1]
    assert isinstance(err, PermanentError)
    assert urls[1] in err.reason and "Failed to fetch" in err.reason
    assert sorted(fake.items(DS)) == ["/0.jpg", "/2.jpg", "/3.jpg"]
    assert len(fake.requests("POST", "/append")) == 1  # one job for the four


async def test_azure_objects_are_registered_by_their_https_url(
    fake: FakeNucleus, sink: NucleusSink
) -> None:
    https = "https://acct.blob.core.windows.net/cont/z.jpg"
    await sink.put_item(DS, remote_item("az://cont/z.jpg", "z.jpg", https))
    assert fake.items(DS)["/z.jpg"]["image_url"] == https


async def test_objects_without_an_https_url_are_refused_with_the_fix(
    fake: FakeNucleus, sink: NucleusSink
) -> None:
    """An Azure object whose account is unknown, or an object of an S3-compatible store
    on a plain-http endpoint (whose s3:// URL would name a bucket on AWS)."""
    items = [
        remote_item("az://cont/z.jpg", "z.jpg", None),
        remote_item("s3://minio-bucket/y.jpg", "y.jpg", None),
        remote_item("s3://bkt/ok.jpg", "ok.jpg"),
    ]
    results = await sink.put_items(batch(items))
    assert list(failures(results)) == [0, 1]
    for r, url in zip(results, ("az://cont/z.jpg", "s3://minio-bucket/y.jpg"), strict=False):
        assert isinstance(r, PermanentError) and url in r.reason
        assert "account" in r.reason and "transfer: copy" in r.reason
    assert list(fake.items(DS)) == ["/ok.jpg"]


async def test_objects_of_other_s3_stores_go_by_their_endpoints_https_url(
    fake: FakeNucleus, sink: NucleusSink
) -> None:
    https = "https://store.example.org/bkt/raw/x.jpg"
    await sink.put_item(DS, remote_item("s3://bkt/raw/x.jpg", "x.jpg", https))
    assert fake.items(DS)["/x.jpg"]["image_url"] == https


# --- changes and deletes -----------------------------------------------------------------


async def test_content_change_replaces_the_item_and_its_metadata(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    img = png(tmp_path / "a.png", color=(1, 2, 3))
    await sink.put_item(DS, image_item(img, a=1, b="x"))
    png(img, color=(9, 9, 9))
    await sink.put_item(DS, image_item(img, a=2))
    items = fake.items(DS)
    assert list(items) == ["/a.png"]
    assert items["/a.png"]["image"]["digest"] == digest(img)
    assert fake.blobs(DS)["/a.png"] == img.read_bytes()
    assert items["/a.png"]["metadata"] == {"a": 2}  # b is gone: replaced, not merged
    assert items["/a.png"]["version"] == 2


async def test_metadata_change_uses_the_metadata_endpoint_as_the_sdk_does(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    img = png(tmp_path / "a.png")
    await sink.put_item(DS, image_item(img, a=1, b="x"))
    result = await sink.update_metadata(DS, image_item(img, a=5, b="y", c=True), "/a.png")
    assert result.backend_id == "/a.png"
    assert fake.items(DS)["/a.png"]["metadata"] == {"a": 5, "b": "y", "c": True}
    assert len(fake.appends()) == 1  # no bytes re-sent
    (merge,) = fake.requests("POST", "/metadata")
    assert merge.query == "async=0"


async def test_metadata_change_that_removes_keys_replaces_the_metadata(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    img = png(tmp_path / "a.png")
    await sink.put_item(DS, image_item(img, a=1, b="x"))
    await sink.update_metadata(DS, image_item(img, a=1), "/a.png")
    assert fake.items(DS)["/a.png"]["metadata"] == {"a": 1}  # b removed
    assert len(fake.appends()) == 2  # appended again: the merge endpoint cannot drop keys


async def test_metadata_change_of_a_group_updates_every_part(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    files = [png(tmp_path / "g" / f"{i}.png") for i in range(2)]
    await sink.put_item(DS, group_item(files, "g", who="a"))
    await sink.update_metadata(DS, group_item(files, "g", who="b"), "/g")
    items = fake.items(DS)
    assert {items[r]["metadata"]["who"] for r in items} == {"b"}
    assert items["/g"]["metadata"]["ingestd_parts"] == ["/g#1"]
    assert len(fake.appends()) == 2  # only the first put (anchor, then the other part)


async def test_metadata_update_of_an_item_nucleus_lacks_puts_it(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    await sink.update_metadata(DS, image_item(png(tmp_path / "n.png"), z=1), None)
    assert fake.items(DS)["/n.png"]["metadata"] == {"z": 1}


async def test_metadata_update_needs_no_prepared_files(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    """A sidecar edit of a frame-sampled video: the new metadata reaches every frame
    image Nucleus holds, whatever the payload's slots say (no frames are re-sampled)."""
    frames = [jpeg(tmp_path / "s" / f"frame_{i:06d}.jpg") for i in range(3)]
    slot = SlotPayload("0", "frames", tuple(fp(f) for f in frames), {"timestamps": [0.0, 1.0, 2.0]})
    await sink.put_item(DS, ItemPayload("/", "v.mp4", (slot,), {"site": "a"}))
    source = tmp_path / "v.mp4"
    source.write_bytes(b"not decoded here")
    unprepared = ItemPayload(
        "/", "v.mp4", (SlotPayload("0", "video", (fp(source),)),), {"site": "b"}
    )
    await sink.update_metadata(DS, unprepared, "/v.mp4")
    items = fake.items(DS)
    assert len(items) == 3
    assert {m["metadata"]["site"] for m in items.values()} == {"b"}
    assert all("ingestd_time" in m["metadata"] for m in items.values())
    assert len(fake.appends()) == 2  # the first put only (anchor, then the other frames)


async def test_delete_single_and_split_items(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    await sink.put_item(DS, image_item(png(tmp_path / "a.png"), folder="/f"))
    files = [png(tmp_path / "g" / f"{i}.png") for i in range(3)]
    await sink.put_item(DS, group_item(files, "g", folder="/f"))
    await sink.put_item(DS, image_item(png(tmp_path / "keep.png"), folder="/f"))
    assert len(fake.items(DS)) == 5
    await sink.delete_item(DS, "/f", "a.png")
    await sink.delete_item(DS, "/f", "g")
    assert list(fake.items(DS)) == ["/f/keep.png"]
    await sink.delete_item(DS, "/f", "g")  # already gone: fine
    await sink.delete_item("no-such-dataset", "/", "x")  # nothing to do, nothing created
    assert fake.dataset_ids("no-such-dataset") == []


async def test_reference_ids_with_slashes_and_hashes_round_trip(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    item = image_item(png(tmp_path / "a#b c.png"), "/x y/z")
    await sink.put_item(DS, item)
    assert list(fake.items(DS)) == ["/x y/z/a#b c.png"]
    assert fake.items(DS)["/x y/z/a#b c.png"]["image"]["name"] == "a#b c.png"
    await sink.delete_item(DS, "/x y/z", "a#b c.png")
    assert fake.items(DS) == {}


# --- failures, retries, interruptions ----------------------------------------------------


async def test_429_storm_with_retry_after_ends_synced_and_waits(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    await sink.ensure_dataset(DS)
    fake.storm(3, retry_after="0.3")
    await sink.put_item(DS, image_item(png(tmp_path / "s.png")))
    assert list(fake.items(DS)) == ["/s.png"]
    log = fake.requests()
    storm = [r for r in log if r.status == 429]
    assert len(storm) == 3
    for r in storm:  # the next request came no sooner than Retry-After asked
        nxt = next(x for x in log if x.at > r.at)
        assert nxt.at - r.at >= 0.29


async def test_a_long_retry_after_is_handed_to_the_ledger(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    await sink.ensure_dataset(DS)
    fake.storm(1, retry_after="600")
    with pytest.raises(RetriableError) as e:
        await sink.put_item(DS, image_item(png(tmp_path / "s.png")))
    assert e.value.retry_after == 600


async def test_5xx_then_success(fake: FakeNucleus, sink: NucleusSink, tmp_path: Path) -> None:
    await sink.ensure_dataset(DS)
    fake.fail_next(2, 503)
    await sink.put_item(DS, image_item(png(tmp_path / "s.png")))
    assert list(fake.items(DS)) == ["/s.png"]


async def test_connection_dropped_mid_upload_is_retried_with_fresh_bytes(
    fake: FakeNucleus, make_sink: Any, tmp_path: Path
) -> None:
    sink = make_sink(small=0)  # streamed from disk, re-opened for the retry
    img = png(tmp_path / "big.png", size=(1200, 900))
    await sink.ensure_dataset(DS)
    fake.drop_appends(1)
    await sink.put_item(DS, image_item(img))
    items = fake.items(DS)
    assert list(items) == ["/big.png"]
    assert fake.blobs(DS)["/big.png"] == img.read_bytes()
    assert items["/big.png"]["version"] == 1


async def test_cancelled_upload_then_a_fresh_sink_leaves_no_duplicate(
    fake: FakeNucleus, make_sink: Any, tmp_path: Path
) -> None:
    """A worker cancelled while Nucleus already stored the item (the daemon stopped
    before hearing the answer): the ledger re-sends it from a new process, which has
    never seen it (previous=None)."""
    img = png(tmp_path / "h.png")
    first = make_sink()
    await first.ensure_dataset(DS)
    fake.hold()
    task = asyncio.create_task(first.put_item(DS, image_item(img, v=1)))
    while fake.held == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await first.close()
    fake.release()
    second = make_sink()
    await second.put_item(DS, image_item(img, v=1), previous=None)
    await second.close()
    items = fake.items(DS)
    assert list(items) == ["/h.png"]
    assert items["/h.png"]["version"] == 2  # the same item updated, not a second one
    assert fake.stored_while_held == 1


async def test_file_changed_after_hashing_is_source_changed_and_spares_the_others(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    a = png(tmp_path / "a.png")
    b = png(tmp_path / "b.png")
    item_b = image_item(b)
    png(b, color=(1, 1, 1))  # rewritten after it was "hashed" (size or digest now differ)
    results = await sink.put_items(batch([image_item(a), item_b]))
    assert isinstance(results[0], PutResult)
    assert isinstance(results[1], SourceChangedError)
    assert list(fake.items(DS)) == ["/a.png"]


async def test_a_streamed_file_that_changes_is_not_stored(
    fake: FakeNucleus, make_sink: Any, tmp_path: Path
) -> None:
    sink = make_sink(small=0)  # streamed: the mismatch shows at the end of the bytes
    b = png(tmp_path / "b.png", size=(300, 200))
    item = image_item(b)
    b.write_bytes(b.read_bytes()[:-1] + b"\0")  # same size, other digest
    with pytest.raises(SourceChangedError, match=r"b\.png"):
        await sink.put_item(DS, item)
    assert fake.items(DS) == {}
    assert fake.blobs(DS) == {}


async def test_vanished_file_is_source_changed(sink: NucleusSink, tmp_path: Path) -> None:
    p = png(tmp_path / "gone.png")
    item = image_item(p)
    p.unlink()
    with pytest.raises(SourceChangedError):
        await sink.put_item(DS, item)


@pytest.mark.parametrize("small", [1 << 20, 0], ids=["read-whole", "streamed"])
async def test_streamed_source_files_are_sent_and_checked(
    fake: FakeNucleus, make_sink: Any, small: int
) -> None:
    sink = make_sink(small=small)
    data = io.BytesIO()
    Image.new("RGB", (40, 30), (5, 6, 7)).save(data, format="PNG")
    blob = data.getvalue()

    async def opener() -> AsyncIterator[bytes]:
        for i in range(0, len(blob), 100):
            yield blob[i : i + 100]

    f = FilePayload(
        "s.png", "", len(blob), "sha256:" + hashlib.sha256(blob).hexdigest(), opener=opener
    )
    await sink.put_item(DS, ItemPayload("/b", "s.png", (SlotPayload("0", "image", (f,)),), {}))
    assert fake.blobs(DS)["/b/s.png"] == blob


async def test_requests_stay_under_the_byte_budget(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [png(tmp_path / f"{i}.png", size=(300, 300)) for i in range(4)]
    monkeypatch.setattr(api, "APPEND_BYTES", files[0].stat().st_size * 2 + 10)
    assert failures(await sink.put_items(batch([image_item(f) for f in files]))) == {}
    assert len(fake.items(DS)) == 4
    assert len(fake.appends()) == 2


# --- the key -----------------------------------------------------------------------------


async def test_bad_key_is_refused_naming_the_setting_not_the_key(
    fake: FakeNucleus, make_sink: Any, tmp_path: Path
) -> None:
    secret = "wrong-key-7f3e9a1b2c"
    sink = make_sink(key=secret)
    with pytest.raises(PermanentError) as e:
        await sink.put_item(DS, image_item(png(tmp_path / "a.png")))
    assert "401" in e.value.reason and KEY_ENV in e.value.reason
    assert secret not in e.value.reason
    assert secret not in repr(sink)


async def test_a_key_refused_mid_group_fails_the_group_without_one_by_one_retries(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    await sink.ensure_dataset(DS)
    fake.api_key = "rotated"
    results = await sink.put_items(
        batch([image_item(png(tmp_path / f"{i}.png")) for i in range(3)])
    )
    assert all(isinstance(r, PermanentError) and KEY_ENV in r.reason for r in results)
    assert len(fake.requests("POST", "/append")) == 1


async def test_api_key_never_in_logs(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    captured: list[dict[str, Any]] = []

    def capture(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        captured.append(dict(event))
        return event

    old = structlog.get_config()
    structlog.configure(
        processors=[capture, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    try:
        with caplog.at_level(logging.DEBUG):
            fake.storm(2, retry_after="0.05")
            fake.reject_refs["/bad.png"] = "nope"
            fake.refuse_refs.add("/refused.png")
            names = ("ok.png", "bad.png", "refused.png")
            await sink.put_items(batch([image_item(png(tmp_path / n)) for n in names]))
            await sink.delete_item(DS, "/", "ok.png")
    finally:
        structlog.configure(**old)
    text = json.dumps(captured, default=str) + caplog.text
    assert captured, "expected some log lines"
    assert fake.api_key not in text
    assert base64.b64encode(f"{fake.api_key}:".encode()).decode() not in text


async def test_dataset_deleted_in_nucleus_is_found_again(
    fake: FakeNucleus, sink: NucleusSink, tmp_path: Path
) -> None:
    await sink.put_item(DS, image_item(png(tmp_path / "a.png")))
    (ds_id,) = fake.dataset_ids(DS)
    with fake.lock:
        del fake.datasets[ds_id]  # someone deleted it in the web app
    with pytest.raises(RetriableError, match="no longer exists"):
        await sink.put_item(DS, image_item(png(tmp_path / "b.png")))
    await sink.put_item(DS, image_item(png(tmp_path / "b.png")))  # the ledger's retry
    assert list(fake.items(DS)) == ["/b.png"]
    assert fake.dataset_ids(DS) != [ds_id]


# --- the fake itself refuses what Nucleus would ------------------------------------------


async def test_the_fake_refuses_what_nucleus_would(fake: FakeNucleus, tmp_path: Path) -> None:
    def basic(key: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}

    auth = basic(fake.api_key)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{fake.base_url}/dataset/details") as r:
            assert r.status == 401  # no key
        async with s.get(f"{fake.base_url}/dataset/details", headers=basic("x")) as r:
            assert r.status == 401  # a wrong key
        async with s.get(f"{fake.base_url}/no/such/route", headers=auth) as r:
            assert r.status == 404
        async with s.post(f"{fake.base_url}/dataset/create", data=b"{", headers=auth) as r:
            assert r.status == 400
        ds = fake.add_dataset("x")
        form = aiohttp.FormData()
        items = [
            {"reference_id": f"r{i}", "metadata": {}, "image_url": f"{i}.png", "update": True}
            for i in range(11)
        ]
        form.add_field("items", json.dumps(items), content_type="application/json")
        img = png(tmp_path / "i.png").read_bytes()
        for i in range(11):
            form.add_field("image", img, filename=f"{i}.png", content_type="image/png")
        url = f"{fake.base_url}/dataset/{ds}/append?async=1"
        async with s.post(url, data=form, headers=auth) as r:
            assert r.status == 400
            assert "at most 10" in (await r.json())["error"]
        async with s.get(f"{fake.base_url}/dataset/{ds}/signedUrl/abc", headers=auth) as r:
            signed = (await r.json())["signed_url"]
        async with s.put(signed, data=b"{}\n", headers=auth) as r:
            assert r.status == 400  # a pre-signed URL takes no second auth mechanism
    assert fake.items("x") == {}


async def test_a_file_that_changes_while_streaming_fails_alone(
    fake: FakeNucleus, make_sink: Any, tmp_path: Path
) -> None:
    """Streamed files share a request; one that changes breaks it for all, so the
    others go again and only it fails."""
    sink = make_sink(small=0)
    files = [png(tmp_path / f"{i}.png", size=(200, 100), color=(i, 9, 9)) for i in range(3)]
    items = [image_item(f) for f in files]
    files[1].write_bytes(files[1].read_bytes()[:-1] + b"\0")  # same size, other digest
    results = await sink.put_items(batch(items))
    assert list(failures(results)) == [1]
    assert isinstance(results[1], SourceChangedError) and "1.png" in results[1].reason
    assert sorted(fake.blobs(DS)) == ["/0.png", "/2.png"]
    assert fake.blobs(DS)["/2.png"] == files[2].read_bytes()
