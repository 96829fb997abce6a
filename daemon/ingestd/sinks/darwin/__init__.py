"""The V7 Darwin sink: `api.py` is V7's vocabulary (slugs, layouts, what an answer
says), `shapes.py` what an item becomes on V7 (entries and the bytes of each file),
`calls.py` the requests, `sink.py` the sink on the shared kit (sinks/kit)."""

from ingestd.sinks.darwin.api import slots_layout, slugify, storage_key
from ingestd.sinks.darwin.sink import DarwinSink

__all__ = ["DarwinSink", "slots_layout", "slugify", "storage_key"]
