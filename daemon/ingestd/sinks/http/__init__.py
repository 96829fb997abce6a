"""The `http` sink: items go to an `ingestd serve` ingestion server (see sink.py)."""

from ingestd.sinks.http.sink import HttpSink
from ingestd.sinks.kit.pacer import parse_retry_after  # where sinks/platform.py finds it

__all__ = ["HttpSink", "parse_retry_after"]
