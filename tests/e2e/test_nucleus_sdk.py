"""The fake Scale Nucleus (tests/support/fakes/nucleus.py) is only worth the tests run
against it if the official client agrees with it: scale-nucleus 0.22.3, in its own venv
(.cache/sdk/nucleus), is driven against the fake the way a user would drive it, and the
fake must end up holding what the SDK sent, bytes and all.

What the SDK sends here is what the sink sends too: local files as multipart to
`append?async=1` in requests of at most 10 files (nucleus/dataset_item_uploader.py),
each answered by a job that is polled; remote URLs as NDJSON through a signed URL and
`append?async=1 {requestId, update}`; the metadata merge with `?async=0`
(nucleus/metadata_manager.py); and the jobs listing (`list_jobs`) the sink polls a
group's jobs with.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.support.fakes.nucleus import FakeNucleus, FakeNucleusThread
from tests.support.sdk import run_sdk

SCRIPT = r"""
import json, os, warnings
import nucleus
from nucleus import DatasetItem, NucleusClient

warnings.simplefilter("ignore", DeprecationWarning)
files = json.loads(os.environ["PROOF_FILES"])
client = NucleusClient(os.environ["PROOF_KEY"], endpoint=os.environ["PROOF_URL"])
ds = client.create_dataset("sdk-proof", is_scene=False)
local = [
    DatasetItem(image_location=p, reference_id=f"/local/{i}", metadata={"i": i, "kind": "png"})
    for i, p in enumerate(files)
]
job = ds.append(local, update=True, asynchronous=True)  # waits for all but the last job
job.sleep_until_complete(verbose_std_out=False)
remote = [
    DatasetItem(image_location="s3://bucket/raw/a.jpg", reference_id="/remote/a", metadata={"i": 99}),
    DatasetItem(image_location="gs://bucket/raw/bad.jpg", reference_id="/remote/bad"),
]
rjob = ds.append(remote, update=True)
failed = None
try:
    rjob.sleep_until_complete(verbose_std_out=False)
except Exception as e:  # JobError: the job ended Errored_Partial
    failed = type(e).__name__
merged = ds.update_item_metadata({"/local/0": {"extra": "x"}})
listed = client.list_jobs(show_completed=True, dataset_id=ds.id)
print(json.dumps({
    "dataset": ds.id,
    "local_job": job.status()["status"],
    "remote_status": rjob.status()["status"],
    "remote_failed": failed,
    "remote_errors": rjob.errors(),
    "merged": merged,
    "listed": sorted(j.job_last_known_status for j in listed),
    "names": [d.name for d in client.datasets],
}))
"""


@pytest.fixture
def served() -> Iterator[tuple[FakeNucleus, str]]:
    fake = FakeNucleus(job_polls=0)  # the SDK sleeps 5 s after every poll: answer at once
    with FakeNucleusThread(fake) as server:
        yield fake, server.url


def png(path: Path, seed: int) -> Path:
    Image.frombytes("RGB", (24, 16), bytes((seed * 7 + i) % 256 for i in range(24 * 16 * 3))).save(
        path, format="PNG"
    )
    return path


def test_scale_nucleus_sdk_against_the_fake(
    served: tuple[FakeNucleus, str], tmp_path: Path
) -> None:
    fake, url = served
    fake.bad_urls.add("gs://bucket/raw/bad.jpg")
    files = [png(tmp_path / f"img {i}.png", i) for i in range(12)]
    started = time.monotonic()
    out = run_sdk(
        "nucleus",
        SCRIPT,
        env={
            "PROOF_KEY": fake.api_key,
            "PROOF_URL": url,
            "PROOF_FILES": json.dumps([str(f) for f in files]),
        },
        timeout=120,
    )
    assert time.monotonic() - started < 60

    # The items, with the bytes the SDK read from disk, under their reference_ids.
    items = fake.items("sdk-proof")
    blobs = fake.blobs("sdk-proof")
    local = {f"/local/{i}": f for i, f in enumerate(files)}
    assert set(items) == {*local, "/remote/a"}
    for ref, f in local.items():
        data = f.read_bytes()
        assert blobs[ref] == data
        assert items[ref]["image"]["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
        assert items[ref]["image"]["name"] == f.name  # the SDK names the part by its path
        assert items[ref]["image"]["content_type"] == "image/png"
        i = int(ref.rsplit("/", 1)[1])
        want = {"i": i, "kind": "png", **({"extra": "x"} if i == 0 else {})}
        assert items[ref]["metadata"] == want
    assert items["/remote/a"]["image_url"] == "s3://bucket/raw/a.jpg"

    # Local files: multipart to append?async=1, at most 10 a request, one job each.
    appends = fake.appends()
    assert [a.query for a in appends] == ["async=1", "async=1"]
    assert out["local_job"] == "Completed"
    # Remote: a signed URL, a PUT without the key, the job; its error names the item.
    (put,) = fake.requests("PUT", "/_signed/")
    assert "Authorization" not in put.headers
    assert out["remote_status"] == "Errored_Partial" and out["remote_failed"] == "JobError"
    (error,) = [json.loads(e) for e in out["remote_errors"]]
    assert error["item"]["reference_id"] == "/remote/bad" and "Failed to fetch" in error["error"]
    # The metadata merge as the SDK sends it: synchronous, ?async=0.
    (merge,) = fake.requests("POST", "/metadata")
    assert merge.query == "async=0" and merge.status == 200
    assert "Updated 1 items" in out["merged"]["message"]
    # The jobs listing the sink polls a group's jobs with.
    assert out["listed"] == ["Completed", "Completed", "Errored_Partial"]
    assert out["names"] == ["sdk-proof"]
    assert all(r.status != 401 for r in fake.requests())
