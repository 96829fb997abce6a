"""The `http` sink: items go to an `ingestd serve` ingestion server (see sink.py)."""

from ingestd.sinks.http.sink import HttpSink

__all__ = ["HttpSink"]
