"""The nucleus sink against the fake Scale Nucleus API (tests/support/fakes/nucleus.py),
which tests/e2e/test_nucleus_sdk.py proves against scale-nucleus 0.22.3."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from ingestd.config import NucleusBackend
from ingestd.sinks.base import Sink
from ingestd.sinks.nucleus import NucleusSink

from tests.support.conformance.adapter import Held
from tests.support.fakes.nucleus import FakeNucleus, serve

KEY_ENV = "INGESTD_CONFORMANCE_NUCLEUS_KEY"
KEY = "nucleus-conformance-key-41d7"


class NucleusAdapter:
    name = "nucleus"
    key_env: str | None = KEY_ENV

    def __init__(self, fake: FakeNucleus) -> None:
        self.fake = fake

    async def make_sink(self) -> Sink:
        backend = NucleusBackend(
            kind="nucleus",
            api_key_env=KEY_ENV,
            base_url=self.fake.base_url,
            requests_per_minute=60_000,
        )
        sink = NucleusSink(backend, workers=4)
        # Fast backoff and job polls: the 5xx case waits milliseconds, not seconds;
        # Retry-After is still honoured as the floor it is.
        sink.client.backoff_base = 0.01
        sink.client.backoff_cap = 5.0
        sink.appender.poll_first = 0.01
        sink.appender.poll_most = 0.05
        return sink

    def held(self, dataset: str) -> dict[str, Held]:
        """Each item by its key: a plain image under its reference_id, the images of a
        split item (ingestd_item) together under the item's key."""
        items = self.fake.items(dataset)
        blobs = self.fake.blobs(dataset)
        out: dict[str, Held] = {}
        for ref, record in sorted(items.items()):
            metadata = record["metadata"]
            key = metadata.get("ingestd_item", ref)
            held = out.setdefault(key, Held({}, metadata if key == ref else {}))
            if "image" in record:
                held.files[record["image"]["name"]] = blobs[ref]
            else:
                held.files[record["image_url"].rsplit("/", 1)[-1]] = record["image_url"]
        return out

    def fail_next(self, n: int, status: int, retry_after: float | None = None) -> None:
        self.fake.storm(n, None if retry_after is None else str(retry_after), status)

    def refuse_key(self) -> None:
        self.fake.api_key = "nucleus-another-key"

    def requests(self) -> int:
        return len(self.fake.requests())


@contextlib.asynccontextmanager
async def open_adapter(tmp_path: Path) -> AsyncIterator[NucleusAdapter]:
    fake = FakeNucleus(KEY, job_polls=1)
    old = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = KEY
    try:
        async with serve(fake):
            yield NucleusAdapter(fake)
    finally:
        if old is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = old
