"""What the config's backend and watches turn into at run time: the sink items are sent
to, the de-identification key, and each watch's side of the sync pool (with a source
of its own, opened here)."""

from __future__ import annotations

from ingestd.config import (
    Config,
    DarwinBackend,
    HttpBackend,
    LabelboxBackend,
    NucleusBackend,
    Watch,
)
from ingestd.media.transform import MediaSettings
from ingestd.pipeline.side import WatchSide
from ingestd.sinks.base import Sink
from ingestd.sinks.local import LocalSink
from ingestd.sources import open_source


def build_sink(config: Config) -> Sink:
    # Platform sinks are imported only when configured: each pulls in its own client.
    backend = config.backend
    if isinstance(backend, HttpBackend):
        from ingestd.sinks.http import HttpSink

        return HttpSink.from_backend(backend, workers=config.workers)
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


def side_for(watch: Watch, key: bytes | None) -> WatchSide:
    """What the sync workers need to know about one configured watch."""
    media = MediaSettings(
        watch.images, watch.video, watch.dicom, key if watch.dicom.deidentify else None
    )
    bucket = watch.bucket is not None
    return WatchSide(
        open_source(watch),
        watch.settle,
        # Objects of a bucket are no symlinks; `transfer` is for buckets only (config).
        False if bucket else watch.follow_symlinks,
        media,
        watch.transfer if bucket else None,
        on_delete=watch.on_delete,
    )


def sides(config: Config, key: bytes | None) -> dict[str, WatchSide]:
    """Each watch's side of the sync pool, by watch name."""
    return {w.name: side_for(w, key) for w in config.watches}
