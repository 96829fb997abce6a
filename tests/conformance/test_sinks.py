"""The conformance suite: every case against every sink (rclone's fstests), each sink
on its real backend or its platform's fake (tests/support/conformance/). A case about API keys and
throttling runs for the sinks that have them; a case about an optional feature runs
for the sinks that declare it, and `test_declared_features_are_implemented` holds every
sink to what it declares.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
from ingestd.core.errors import PermanentError, SourceChangedError
from ingestd.core.model import FilePayload, ItemPayload, SlotPayload, item_key
from ingestd.sinks.base import BatchItem, BatchPutter, MetadataUpdater, PutResult, Sink
from PIL import Image

from tests.support.conformance.adapter import SinkAdapter

SINKS = ["local", "memory", "http", "darwin", "labelbox", "nucleus"]
# The sinks with an API key (a bearer token for `ingestd serve`) and a server that
# throttles or fails: the fault cases run against these.
KEYED = ["http", "darwin", "labelbox", "nucleus"]
# The sinks that take groups (capabilities.batch); the memory double does not.
BATCHED = ["local", "http", "darwin", "labelbox", "nucleus"]
keyed = pytest.mark.parametrize("adapter", KEYED, indirect=True)
batched = pytest.mark.parametrize("adapter", BATCHED, indirect=True)
# V7 has no item metadata an API can set (docs/platforms.md): the metadata cases check
# there only that a metadata-only change neither fails nor duplicates the item.
KEEPS_METADATA = {"darwin": False}
DATASET = "conformance"


@pytest.fixture(params=SINKS)
async def adapter(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SinkAdapter]:
    module = importlib.import_module(f"tests.support.conformance.{request.param}")
    async with module.open_adapter(tmp_path / "backend") as a:
        assert a.name == request.param
        yield a


@pytest.fixture
async def sinks(adapter: SinkAdapter) -> AsyncIterator[list[Sink]]:
    """Every sink a case makes, closed at its end."""
    made: list[Sink] = []
    yield made
    for s in made:
        with contextlib.suppress(Exception):
            await s.close()


async def new_sink(adapter: SinkAdapter, made: list[Sink]) -> Sink:
    s = await adapter.make_sink()
    made.append(s)
    await s.ensure_dataset(DATASET)
    return s


def png(folder: Path, name: str, seed: int) -> Path:
    """A real PNG whose bytes differ by seed."""
    folder.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    img = Image.new("RGB", (24, 16))
    img.putdata([(rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)) for _ in range(384)])
    p = folder / name
    img.save(p, format="PNG")
    return p


def payload(
    path: str, file: Path, *, digest_of: bytes | None = None, **metadata: object
) -> ItemPayload:
    data = file.read_bytes()
    digest = "sha256:" + hashlib.sha256(data if digest_of is None else digest_of).hexdigest()
    f = FilePayload(file.name, str(file), len(data), digest, content_type="image/png")
    return ItemPayload(path, file.name, (SlotPayload("0", "image", (f,)),), dict(metadata))


async def test_declared_features_are_implemented(adapter: SinkAdapter, sinks: list[Sink]) -> None:
    s = await new_sink(adapter, sinks)
    caps = s.capabilities
    assert isinstance(s, Sink)
    assert isinstance(s.reachable, bool)
    assert caps.metadata_update == isinstance(s, MetadataUpdater)
    assert (caps.batch is not None) == isinstance(s, BatchPutter)
    if caps.batch is not None:
        assert caps.batch.items >= 2 and caps.batch.bytes > 0 and caps.batch.linger >= 0


async def test_put_new(adapter: SinkAdapter, sinks: list[Sink], tmp_path: Path) -> None:
    s = await new_sink(adapter, sinks)
    f = png(tmp_path, "cat.png", 1)
    result = await s.put_item(DATASET, payload("/pets", f, camera="north"))
    assert isinstance(result, PutResult) and result.changed and result.version >= 1
    held = adapter.held(DATASET)
    assert list(held) == [item_key("/pets", "cat.png")]
    got = held[item_key("/pets", "cat.png")]
    assert got.files == {"cat.png": f.read_bytes()}
    if KEEPS_METADATA.get(adapter.name, True):
        assert got.metadata.get("camera") == "north"


async def test_put_changed(adapter: SinkAdapter, sinks: list[Sink], tmp_path: Path) -> None:
    s = await new_sink(adapter, sinks)
    first = payload("/", png(tmp_path / "v1", "scan.png", 1))
    await s.put_item(DATASET, first)
    second = payload("/", png(tmp_path / "v2", "scan.png", 2))
    result = await s.put_item(DATASET, second, previous=first.manifest())
    assert result.changed
    held = adapter.held(DATASET)
    assert list(held) == ["/scan.png"]
    assert held["/scan.png"].files == {"scan.png": (tmp_path / "v2" / "scan.png").read_bytes()}


async def test_metadata_only_change(
    adapter: SinkAdapter, sinks: list[Sink], tmp_path: Path
) -> None:
    s = await new_sink(adapter, sinks)
    f = png(tmp_path, "slide.png", 3)
    before = payload("/", f, stain="HE", site="north")
    put = await s.put_item(DATASET, before)
    after = payload("/", f, stain="IHC")
    if s.capabilities.metadata_update:
        await cast(MetadataUpdater, s).update_metadata(DATASET, after, put.backend_id)
    else:
        await s.put_item(DATASET, after, previous=before.manifest())
    held = adapter.held(DATASET)
    assert list(held) == ["/slide.png"]
    assert held["/slide.png"].files == {"slide.png": f.read_bytes()}
    if KEEPS_METADATA.get(adapter.name, True):
        meta = held["/slide.png"].metadata
        assert meta.get("stain") == "IHC"
        assert "site" not in meta  # the new metadata replaces the old


async def test_move(adapter: SinkAdapter, sinks: list[Sink], tmp_path: Path) -> None:
    s = await new_sink(adapter, sinks)
    f = png(tmp_path, "x.png", 4)
    await s.put_item(DATASET, payload("/inbox", f))
    await s.put_item(DATASET, payload("/sorted", f))
    assert set(adapter.held(DATASET)) == {"/inbox/x.png", "/sorted/x.png"}
    await s.delete_item(DATASET, "/inbox", "x.png")  # on_delete: delete of the old place
    held = adapter.held(DATASET)
    assert set(held) == {"/sorted/x.png"}
    assert held["/sorted/x.png"].files == {"x.png": f.read_bytes()}


async def test_delete(adapter: SinkAdapter, sinks: list[Sink], tmp_path: Path) -> None:
    s = await new_sink(adapter, sinks)
    assert s.capabilities.delete  # every sink here deletes
    await s.put_item(DATASET, payload("/", png(tmp_path, "a.png", 5)))
    await s.put_item(DATASET, payload("/", png(tmp_path, "b.png", 6)))
    await s.delete_item(DATASET, "/", "a.png")
    assert set(adapter.held(DATASET)) == {"/b.png"}
    await s.delete_item(DATASET, "/", "a.png")  # gone already: not an error
    assert set(adapter.held(DATASET)) == {"/b.png"}


@keyed
async def test_429_with_retry_after_waits_and_succeeds(
    adapter: SinkAdapter, sinks: list[Sink], tmp_path: Path
) -> None:
    s = await new_sink(adapter, sinks)
    f = png(tmp_path, "busy.png", 7)
    adapter.fail_next(1, 429, retry_after=1.0)
    started = time.monotonic()
    await s.put_item(DATASET, payload("/", f))
    assert time.monotonic() - started >= 0.9  # Retry-After is a floor, not a hint
    assert adapter.held(DATASET)["/busy.png"].files == {"busy.png": f.read_bytes()}


@keyed
async def test_5xx_then_success(adapter: SinkAdapter, sinks: list[Sink], tmp_path: Path) -> None:
    s = await new_sink(adapter, sinks)
    f = png(tmp_path, "flaky.png", 8)
    adapter.fail_next(2, 503)
    await s.put_item(DATASET, payload("/", f))
    assert adapter.held(DATASET)["/flaky.png"].files == {"flaky.png": f.read_bytes()}


@keyed
async def test_refused_key_names_its_variable(
    adapter: SinkAdapter, sinks: list[Sink], tmp_path: Path
) -> None:
    s = await new_sink(adapter, sinks)
    adapter.refuse_key()
    with pytest.raises(PermanentError) as e:
        await s.put_item(DATASET, payload("/", png(tmp_path, "k.png", 9)))
    assert adapter.key_env is not None and adapter.key_env in str(e.value)


async def test_digest_mismatch_while_streaming_stores_nothing(
    adapter: SinkAdapter, sinks: list[Sink], tmp_path: Path
) -> None:
    s = await new_sink(adapter, sinks)
    f = png(tmp_path, "changed.png", 10)
    with pytest.raises(SourceChangedError):
        await s.put_item(DATASET, payload("/", f, digest_of=b"what was hashed before"))
    held = adapter.held(DATASET)
    assert "/changed.png" not in held or not held["/changed.png"].files


async def test_crash_between_accepted_and_recorded(
    adapter: SinkAdapter, sinks: list[Sink], tmp_path: Path
) -> None:
    """The backend took the item, then the daemon died before its ledger said so: the
    restarted daemon puts it again as never synced. One item, not two, and nothing lost."""
    f = png(tmp_path, "once.png", 11)
    item = payload("/", f, camera="east")
    first = await new_sink(adapter, sinks)
    await first.put_item(DATASET, item)
    await first.close()
    again = await new_sink(adapter, sinks)
    result = await again.put_item(DATASET, item, previous=None)
    held = adapter.held(DATASET)
    assert list(held) == ["/once.png"]
    assert held["/once.png"].files == {"once.png": f.read_bytes()}
    assert isinstance(result, PutResult) and result.backend_id


@batched
async def test_batch_put(adapter: SinkAdapter, sinks: list[Sink], tmp_path: Path) -> None:
    s = await new_sink(adapter, sinks)
    assert s.capabilities.batch is not None
    singles = [payload("/one", png(tmp_path / "one", f"{i}.png", 100 + i)) for i in range(4)]
    group = [payload("/many", png(tmp_path / "many", f"{i}.png", 200 + i)) for i in range(50)]
    counted = adapter.name in KEYED
    before = adapter.requests() if counted else 0
    for p in singles:
        await s.put_item(DATASET, p)
    middle = adapter.requests() if counted else 0
    results = await cast(BatchPutter, s).put_items([BatchItem(DATASET, p) for p in group])
    after = adapter.requests() if counted else 0
    assert all(isinstance(r, PutResult) and r.changed for r in results), results
    held = adapter.held(DATASET)
    assert len(held) == 54
    assert held["/many/7.png"].files == {"7.png": (tmp_path / "many" / "7.png").read_bytes()}
    if counted:
        per_single = (middle - before) / len(singles)
        per_batched = (after - middle) / len(group)
        assert per_batched < per_single, (per_batched, per_single)


@batched
async def test_batch_put_fails_only_the_bad_item(
    adapter: SinkAdapter, sinks: list[Sink], tmp_path: Path
) -> None:
    s = await new_sink(adapter, sinks)
    assert s.capabilities.batch is not None
    good = [payload("/g", png(tmp_path / "g", f"{i}.png", 300 + i)) for i in range(3)]
    bad = payload("/g", png(tmp_path / "g", "bad.png", 399), digest_of=b"not these bytes")
    items = [*good[:2], bad, good[2]]
    results = await cast(BatchPutter, s).put_items([BatchItem(DATASET, p) for p in items])
    assert isinstance(results[2], SourceChangedError)
    assert all(isinstance(results[i], PutResult) for i in (0, 1, 3))
    held = adapter.held(DATASET)
    assert {"/g/0.png", "/g/1.png", "/g/2.png"} <= set(held)
    assert "/g/bad.png" not in held or not held["/g/bad.png"].files
