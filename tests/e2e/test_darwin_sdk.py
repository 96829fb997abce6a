"""The fake V7 (tests/support/fakes/darwin.py) is only worth the tests run against it if
the official client agrees with it: darwin-py 3.6.3, in its own venv (.cache/sdk/darwin),
is driven against the fake the way a user drives it, and the fake must end up holding
what the SDK pushed, bytes and all.

What darwin-py sends here is what the sink sends too: `register_upload` for many items
in one request (`options.handle_as_slices`, relative `path`s with `preserve_folders`),
then per file `sign`, a PUT to the signed URL and `confirm`; a multi-slot item with a
version-3 layout; a DICOM series as one ZIP; `ALREADY_EXISTS` in `blocked_items` when
the same files are pushed again; the item listing (`fetch_remote_files`); and
`register_existing` for files in external storage.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from PIL import Image

from tests.support.fakes.darwin import API_KEY, STORAGE, TEAM, FakeDarwin, FakeDarwinThread
from tests.support.sdk import run_sdk

CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
DATASET = "SDK Push"

SCRIPT = r"""
import json, os
from pathlib import Path
from darwin.client import Client
from darwin.datatypes import ObjectStore

root = Path(os.environ["PROOF_ROOT"])
client = Client.from_api_key(os.environ["PROOF_KEY"])  # asks /users/token_info for the team
ds = client.create_dataset(os.environ["PROOF_DATASET"])
single = ds.push([root / "single"], preserve_folders=True)
rig = ds.push([root / "rig"], item_merge_mode="slots")
series = ds.push([root / "s1"], item_merge_mode="series")
again = ds.push([root / "single"], preserve_folders=True)
remote = client.get_remote_dataset(f"{client.default_team}/{ds.slug}")
listed = sorted((i.path, i.filename, i.status) for i in remote.fetch_remote_files())
store = ObjectStore(
    name=os.environ["PROOF_STORAGE"], prefix="v7", readonly=False, provider="aws",
    default=True, bucket="bkt",
)
registered = remote.register_single_slotted(
    store, [f"raw/cam/{i}.jpg" for i in range(12)], preserve_folders=True
)
print(json.dumps({
    "team": client.default_team,
    "slug": ds.slug,
    "pushed": [h.pending_count for h in (single, rig, series)],
    "errors": [str(e.error) for h in (single, rig, series, again) for e in h.errors],
    "blocked_again": sorted(
        (b.full_path, [s.reason for s in b.slots]) for b in again.blocked_items
    ),
    "listed": listed,
    "registered": len(registered["registered"]),
    "blocked_registered": registered["blocked"],
}))
"""


@pytest.fixture
def fake() -> Iterator[FakeDarwin]:
    with FakeDarwinThread() as f:
        yield f


def png(path: Path, seed: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = bytes((seed * 31 + i * 7) % 256 for i in range(20 * 14 * 3))
    Image.frombytes("RGB", (20, 14), data).save(path, format="PNG")
    return path.read_bytes()


def test_darwin_py_push_lands_on_the_fake(fake: FakeDarwin, tmp_path: Path) -> None:
    root = tmp_path / "data"
    singles = {
        f"/{folder}/{i}.png": png(root / "single" / folder / f"{i}.png", 10 * n + i)
        for n, folder in enumerate(["d0000", "d0001"])
        for i in range(3)
    }
    views = [png(root / "rig" / f"view{i}.png", 100 + i) for i in range(3)]
    slices = sorted(CT5N.iterdir())[:3]
    (root / "s1").mkdir()
    for src in slices:
        shutil.copyfile(src, root / "s1" / f"{src.name}.dcm")
    host = fake.url.removesuffix("/api")
    got = run_sdk(
        "darwin",
        SCRIPT,
        env={
            "DARWIN_BASE_URL": host,
            "HOME": str(tmp_path / "home"),  # darwin-py keeps no config there, but may look
            "PROOF_ROOT": str(root),
            "PROOF_KEY": API_KEY,
            "PROOF_DATASET": DATASET,
            "PROOF_STORAGE": STORAGE,
        },
    )
    assert got["errors"] == []
    assert (got["team"], got["slug"]) == (TEAM, "sdk-push")
    assert got["pushed"] == [6, 1, 1]

    # Every pushed file is held, complete, with its bytes.
    live = fake.live(DATASET)
    for key, data in singles.items():
        item = live[key]
        assert item["status"] == "new"
        assert fake.content(item["id"], "0") == [(key.rsplit("/", 1)[-1], data)]
    rig = live["/rig"]
    assert [s["slot_name"] for s in rig["slots"]] == ["0", "1", "2"]
    assert rig["layout"] == {"version": 3, "slots_grid": [[["0"]], [["1"]], [["2"]]]}
    for i, data in enumerate(views):
        assert fake.content(rig["id"], str(i)) == [(f"view{i}.png", data)]
    [(zip_name, zipped)] = fake.content(live["/s1"]["id"], "0")
    assert zip_name == "s1.dcm" and zipped is not None
    zf = zipfile.ZipFile(io.BytesIO(zipped))
    assert sorted(zf.namelist()) == sorted(f"{p.name}.dcm" for p in slices)
    for p in slices:
        assert zf.read(f"{p.name}.dcm") == p.read_bytes()

    # The same files pushed again: refused per slot, nothing duplicated.
    assert got["blocked_again"] == [[key, ["ALREADY_EXISTS"]] for key in sorted(singles)]
    # One register_upload per push (darwin-py sends up to 500 items a request), then
    # one sign and one confirm per file: the floor the sink is measured against.
    registrations = [json.loads(b) for b in fake.bodies("register_upload")]
    assert [len(r["items"]) for r in registrations] == [6, 1, 1, 6]
    assert registrations[0]["options"] == {"handle_as_slices": False}
    assert {i["path"] for i in registrations[0]["items"]} == {"d0000", "d0001"}
    assert len(fake.api_calls("GET", "/sign")) == len(fake.api_calls("POST", "/confirm")) == 10
    assert all("Authorization" not in put.headers for put in fake.puts)

    # The listing darwin-py reads (fetch_remote_files parses every item), taken before
    # the bucket objects were registered.
    assert sorted((p, n) for p, n, _ in got["listed"]) == sorted(
        [(k.rsplit("/", 1)[0], k.rsplit("/", 1)[1]) for k in singles] + [("/", "rig"), ("/", "s1")]
    )
    # register_existing, as darwin-py sends it: 10 items a request, flat single slots.
    assert got["registered"] == 12 and got["blocked_registered"] == []
    existing = [json.loads(b) for b in fake.bodies("register_existing")]
    assert [len(r["items"]) for r in existing] == [10, 2]
    assert existing[0]["storage_slug"] == STORAGE
    cam = {k: v for k, v in fake.live(DATASET).items() if k.startswith("/raw/cam/")}
    assert len(cam) == 12
    assert cam["/raw/cam/3.jpg"]["slots"][0]["source_files"] == [
        {"file_name": "3.jpg", "storage_key": "raw/cam/3.jpg"}
    ]
