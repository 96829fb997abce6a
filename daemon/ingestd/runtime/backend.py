"""What the config's backend and watches turn into at run time: the sink items are sent
to, the de-identification key, and each watch's side of the sync pool."""

from __future__ import annotations

from ingestd.config import (
    Config,
    DarwinBackend,
    HttpBackend,
    LabelboxBackend,
    NucleusBackend,
)
from ingestd.pipeline.side import WatchSide, side_for
from ingestd.sinks.base import Sink
from ingestd.sinks.local import LocalSink


def build_sink(config: Config) -> Sink:
    # Platform sinks are imported only when configured: each pulls in its own client.
    backend = config.backend
    if isinstance(backend, HttpBackend):
        from ingestd.sinks.http import HttpSink

        return HttpSink(backend.url, backend.token(), workers=config.workers)
    if isinstance(backend, DarwinBackend):
        from ingestd.sinks.darwin import DarwinSink

        return DarwinSink(backend, workers=config.workers)
    if isinstance(backend, LabelboxBackend):
        from ingestd.sinks.labelbox import LabelboxSink

        return LabelboxSink(backend, workers=config.workers)
    if isinstance(backend, NucleusBackend):
        from ingestd.sinks.nucleus import NucleusSink

        return NucleusSink(backend, workers=config.workers)
    return LocalSink(backend.path)


def deid_key(config: Config) -> bytes | None:
    """One key per state dir: the same UID always maps to the same new UID, across runs
    and watches, so series stay consistent."""
    if not any(w.dicom.deidentify for w in config.watches):
        return None
    from ingestd.media.dicom import load_or_create_key

    return load_or_create_key(str(config.state_dir))


def sides(config: Config, key: bytes | None) -> dict[str, WatchSide]:
    """Each watch's side of the sync pool, by watch name."""
    return {w.name: side_for(w, key) for w in config.watches}
