"""The `nucleus` sink (Scale Nucleus): api.py maps the HTTP API as the current SDK
speaks it, items.py maps our items onto Nucleus images, appends.py sends them and
waits for their jobs, sink.py is the sink on the shared parts (sinks/kit)."""

from ingestd.sinks.nucleus.api import DEFAULT_BASE_URL
from ingestd.sinks.nucleus.sink import NucleusSink

__all__ = ["DEFAULT_BASE_URL", "NucleusSink"]
