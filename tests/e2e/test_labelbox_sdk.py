"""labelbox-python 7.17.0, the official SDK, against the fake Labelbox API
(tests/support/fakes/labelbox.py): the fake is only worth the sink's tests if the real
client gets from it what it expects. The SDK runs in its own venv (tests/support/sdk.py)
and does what a Labelbox user's script does: create a dataset (which attaches the
organisation's default delegated-access integration), upsert rows of local files with
global keys and metadata, create rows from local paths and from URLs, wait for each
task and read its errors. The fake must end holding every row with its bytes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.support.fakes.labelbox import FakeProcess
from tests.support.sdk import run_sdk

KEY = "lb-sdk-key-0c4e7a91d2"

SCRIPT = r"""
import json, os
import labelbox as lb

url = os.environ["LB_URL"]
client = lb.Client(api_key=os.environ["LB_KEY"], endpoint=url + "/graphql",
                   rest_endpoint=url + "/api/v1")
files = json.loads(os.environ["LB_FILES"])
dataset = client.create_dataset(name="sdk-proof")   # the default IAM integration
upsert = dataset.upsert_data_rows([
    {"row_data": path, "global_key": "sdk:" + os.path.basename(path),
     "external_id": os.path.basename(path), "media_type": "IMAGE",
     "metadata_fields": [{"name": "tag", "value": "from the sdk"}],
     "attachments": [{"type": "RAW_TEXT", "name": "note", "value": "hello"}]}
    for path in files[:3]
])
upsert.wait_till_done()
again = dataset.upsert_data_rows([   # the same key again: an update, not a new row
    {"key": lb.GlobalKey("sdk:" + os.path.basename(files[0])), "external_id": "renamed"}
])
again.wait_till_done()
local = dataset.create_data_rows(files[3:])           # local paths as strings
local.wait_till_done()
remote = dataset.create_data_rows([
    {"row_data": "https://images.example.org/cat.png", "global_key": "sdk:url",
     "media_type": "IMAGE"},
    {"row_data": "https://images.example.org/dup.png", "global_key": "sdk:url"},
])
remote.wait_till_done()
print(json.dumps({
    "dataset": dataset.uid,
    "statuses": [t.status for t in (upsert, again, local, remote)],
    "errors": [t.errors for t in (upsert, again, local, remote)],
    "created": len(upsert.result or []),
}))
"""


@pytest.fixture
def fake() -> Iterator[FakeProcess]:
    proc = FakeProcess(KEY)
    yield proc
    proc.stop()


def png(path: Path, color: tuple[int, int, int]) -> bytes:
    Image.new("RGB", (40, 30), color).save(path, format="PNG")
    return path.read_bytes()


def test_the_sdk_uploads_upserts_and_waits_against_the_fake(
    fake: FakeProcess, tmp_path: Path
) -> None:
    fake.add_integration("s3-read")  # the organisation's default delegated access
    paths = [tmp_path / f"img{i}.png" for i in range(5)]
    data = {p.name: png(p, (i * 50, 10, 200)) for i, p in enumerate(paths)}
    out = run_sdk(
        "labelbox",
        SCRIPT,
        env={"LB_URL": fake.url, "LB_KEY": KEY, "LB_FILES": json.dumps([str(p) for p in paths])},
    )
    assert out["statuses"] == ["COMPLETE"] * 4
    # The upserts and the local rows went through; the two URL rows share a global key,
    # which Labelbox refuses for the second of them in one task.
    assert out["errors"][:3] == [None, None, None]
    [refused] = out["errors"][3]
    assert "Duplicate global key" in refused["message"]
    assert refused["failedDataRows"][0]["globalKey"] == "sdk:url"
    assert out["created"] == 3

    state = fake.state()
    assert state["signers"] == {"sdk-proof": "s3-read"}
    rows = state["datasets"]["sdk-proof"]
    by_key = {r["global_key"]: r for r in rows.values() if r["global_key"]}
    assert set(by_key) == {"sdk:img0.png", "sdk:img1.png", "sdk:img2.png", "sdk:url"}
    for name in ("img0.png", "img1.png", "img2.png"):
        row = by_key[f"sdk:{name}"]
        assert fake.fetch(row["row_data"]) == data[name]
        assert row["metadata"] == {"tag": "from the sdk"}
        assert row["attachments"] == [{"type": "RAW_TEXT", "name": "note", "value": "hello"}]
    assert by_key["sdk:img0.png"]["external_id"] == "renamed"
    local = [r for r in rows.values() if not r["global_key"]]
    assert sorted(hashlib.sha256(fake.fetch(r["row_data"]) or b"").hexdigest() for r in local) == (
        sorted(hashlib.sha256(data[p.name]).hexdigest() for p in paths[3:])
    )
    # The SDK orders a task's rows as its threads finish them: either row may win.
    urls = {"https://images.example.org/cat.png", "https://images.example.org/dup.png"}
    assert {by_key["sdk:url"]["row_data"], refused["failedDataRows"][0]["rowData"]} == urls


REFUSED = r"""
import json, os
import labelbox as lb

url = os.environ["LB_URL"]
client = lb.Client(api_key=os.environ["LB_KEY"], endpoint=url + "/graphql",
                   rest_endpoint=url + "/api/v1")
try:
    client.create_dataset(name="no-access")
    outcome = "created"
except Exception as e:   # the SDK deletes the dataset again and raises
    outcome = type(e).__name__ + ": " + str(e)
plain = client.create_dataset(name="plain", iam_integration=None)
print(json.dumps({"outcome": outcome, "plain": plain.uid}))
"""


def test_the_sdk_deletes_a_dataset_whose_integration_does_not_validate(
    fake: FakeProcess,
) -> None:
    """The path ingestd's dataset creation follows (datasets.py): setSignerForDataset,
    validateDataset, and the dataset deleted again when it does not validate."""
    fake.add_integration("broken", validates=False)
    out = run_sdk("labelbox", REFUSED, env={"LB_URL": fake.url, "LB_KEY": KEY})
    assert "IAMIntegration was not successfully added" in out["outcome"]
    state = fake.state()
    assert state["signers"] == {"plain": None}  # "no-access" was deleted
    assert state["dataset_count"] == {"no-access": 1, "plain": 1}
