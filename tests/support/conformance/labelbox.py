"""The labelbox sink against the fake Labelbox GraphQL API (tests/support/fakes/labelbox.py),
which tests/e2e/test_labelbox_sdk.py proves against labelbox-python 7.17.0."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ingestd.config import LabelboxBackend
from ingestd.sinks.base import Sink
from ingestd.sinks.labelbox import LabelboxSink

from tests.support.conformance.adapter import Held
from tests.support.fakes.labelbox import LabelboxFake

KEY_ENV = "INGESTD_CONFORMANCE_LABELBOX_KEY"
KEY = "labelbox-conformance-key-8e21"


class LabelboxAdapter:
    name = "labelbox"
    key_env: str | None = KEY_ENV

    def __init__(self, fake: LabelboxFake) -> None:
        self.fake = fake

    async def make_sink(self) -> Sink:
        backend = LabelboxBackend(kind="labelbox", api_key_env=KEY_ENV, base_url=self.fake.url)
        sink = LabelboxSink(backend, workers=4)
        # Fast backoff and task polls: the 5xx case waits milliseconds, not seconds;
        # Retry-After is still honoured as the floor it is.
        sink.client.backoff_base = 0.01
        sink.poll_first = sink.poll_most = 0.01
        return sink

    def held(self, dataset: str) -> dict[str, Held]:
        """Each data row by its item key (external_id): the row's asset and its
        attachments by the file name they were uploaded as (their URL when Labelbox
        reads them from elsewhere), and its metadata by field name."""
        out: dict[str, Held] = {}
        for row in self.fake.rows_of(dataset).values():
            files: dict[str, bytes | str] = {}
            for url in [row["row_data"], *(a["value"] for a in row["attachments"])]:
                data = self.fake.fetch(url)
                files[unquote(urlsplit(url).path).rsplit("/", 1)[-1]] = (
                    data if data is not None else url
                )
            out[str(row["external_id"])] = Held(files, dict(row["metadata"]))
        return out

    def fail_next(self, n: int, status: int, retry_after: float | None = None) -> None:
        self.fake.fail_next(n, status, None if retry_after is None else str(retry_after))

    def refuse_key(self) -> None:
        self.fake.api_key = "labelbox-another-key"

    def requests(self) -> int:
        return len(self.fake.requests)


@contextlib.asynccontextmanager
async def open_adapter(tmp_path: Path) -> AsyncIterator[LabelboxAdapter]:
    fake = LabelboxFake(KEY)
    old = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = KEY
    await fake.start()
    try:
        yield LabelboxAdapter(fake)
    finally:
        await fake.stop()
        if old is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = old
