"""The darwin sink against the fake V7 API (tests/support/fakes/darwin.py), which
tests/e2e/test_darwin_sdk.py proves against darwin-py's `push`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from ingestd.config import DarwinBackend
from ingestd.sinks.base import Sink
from ingestd.sinks.darwin import DarwinSink

from tests.support.conformance.adapter import Held
from tests.support.fakes.darwin import API_KEY, STORAGE, TEAM, FakeDarwin

KEY_ENV = "INGESTD_CONFORMANCE_V7_KEY"


class DarwinAdapter:
    name = "darwin"
    key_env: str | None = KEY_ENV

    def __init__(self, fake: FakeDarwin) -> None:
        self.fake = fake

    async def make_sink(self) -> Sink:
        backend = DarwinBackend.model_validate(
            {
                "kind": "darwin",
                "team": TEAM,
                "api_key_env": KEY_ENV,
                "base_url": self.fake.url,
                "storage_slug": STORAGE,
            },
            context={"check_paths": False},
        )
        sink = DarwinSink(backend, workers=4)
        # Fast backoff: the 5xx case waits milliseconds, not seconds; Retry-After is
        # still honoured as the floor it is.
        for client in (sink.v7.api, sink.v7.storage):
            client.backoff_base = 0.01
            client.backoff_cap = 5.0
        return sink

    def held(self, dataset: str) -> dict[str, Held]:
        """Live items whose upload finished (an item V7 lists as `uploading` holds no
        file anyone can open); `live` itself fails on a key held twice."""
        out: dict[str, Held] = {}
        for key, item in self.fake.live(dataset).items():
            if item["status"] == "uploading":
                continue
            files: dict[str, bytes | str] = {}
            for slot in item["slots"]:
                for name, data in self.fake.content(item["id"], slot["slot_name"]):
                    if data is not None:
                        files[name] = data
                for f in slot["source_files"]:
                    if "storage_key" in f:
                        files[f["file_name"]] = f["storage_key"]
            out[key] = Held(files)  # V7 holds no metadata of ours
        return out

    def fail_next(self, n: int, status: int, retry_after: float | None = None) -> None:
        self.fake.fail_next(n, status, retry_after)

    def refuse_key(self) -> None:
        self.fake.api_key = "v7-another-key"

    def requests(self) -> int:
        return len(self.fake.calls)


@contextlib.asynccontextmanager
async def open_adapter(tmp_path: Path) -> AsyncIterator[DarwinAdapter]:
    fake = FakeDarwin()
    await fake.start()
    old = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = API_KEY
    try:
        yield DarwinAdapter(fake)
    finally:
        if old is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = old
        await fake.stop()
