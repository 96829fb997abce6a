"""What the conformance suite (test_sinks.py) needs from each sink under test, in the
manner of rclone's fstests: one adapter per sink, and every case runs against every
sink whose features it concerns.

An adapter module beside this one (tests/support/conformance/<sink>.py) exposes `open_adapter(tmp_path)`, an async context
manager yielding a `SinkAdapter`: the real sink, talking to its real backend (the local
store, `ingestd serve` on 127.0.0.1) or to the platform's fake (tests/support/fakes),
which the official SDK is proven against in tests/e2e/test_*_sdk.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ingestd.sinks.base import Sink


@dataclass(frozen=True)
class Held:
    """One item as the backend holds it: its files' bytes (by file name) or, for
    a registered object, its URL; and its metadata as the backend shows it (keys the
    platform adds of its own may be present; the suite compares what it sent)."""

    files: dict[str, bytes | str]
    metadata: dict[str, Any] = field(default_factory=dict)


class SinkAdapter(Protocol):
    name: str  # "local", "memory", "http", "darwin", "labelbox", "nucleus"
    # The environment variable that a refused key's error must name (e.g. "V7_API_KEY");
    # None for sinks without an API key (local, memory): the fault cases skip them.
    key_env: str | None

    async def make_sink(self) -> Sink:
        """A new sink on the same backend, as a restarted daemon makes (no caches
        shared with earlier sinks). Closed by the suite."""
        ...

    def held(self, dataset: str) -> dict[str, Held]:
        """Everything the backend holds in `dataset`, by item key ("/path/name", as
        ingestd.core.model.item_key makes it). Items removed (archived, deleted) are
        absent."""
        ...

    def fail_next(self, n: int, status: int, retry_after: float | None = None) -> None:
        """The next `n` API requests (any route the sink uses first for a put) answer
        `status`, with a Retry-After header when `retry_after` is given."""
        ...

    def refuse_key(self) -> None:
        """From now on the backend answers 401 to the key the sink was made with."""
        ...

    def requests(self) -> int:
        """API requests the backend has answered so far (for the batch case)."""
        ...
