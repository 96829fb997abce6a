"""Prometheus metrics of `ingestd serve`.

Each app gets its own CollectorRegistry rather than the process-wide default one, so
that tests (and a process embedding several servers) can create many apps without
"duplicated timeseries" errors and read each app's numbers alone.

Labels stay bounded: `route` is the route template (`/v1/blobs/{digest}`), never the
requested path, and `code` is one of the error codes of API.md.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

# Small requests take about a millisecond; a multi-GB upload can take minutes.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "ingestd_serve_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ingestd_serve_request_seconds",
            "Time from request to response",
            ["method", "route"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.bytes_received = Counter(
            "ingestd_serve_bytes_received",
            "Request body bytes received (including those of interrupted uploads)",
            ["route"],
            registry=self.registry,
        )
        self.items = Counter(
            "ingestd_serve_items",
            "Items upserted (PUT of an item or one item of a batch), by result",
            ["result"],
            registry=self.registry,
        )
        self.errors = Counter(
            "ingestd_serve_errors",
            "Error responses by error code",
            ["code"],
            registry=self.registry,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def received(self, route: str, n: int) -> None:
        self.bytes_received.labels(route).inc(n)

    def item(self, status: int, changed: bool | None) -> None:
        """One item's upsert: created, changed, unchanged, or failed (its error code is
        counted in `errors` only when the whole request failed with it)."""
        if status == 201:
            result = "created"
        elif status == 200:
            result = "changed" if changed else "unchanged"
        else:
            result = "failed"
        self.items.labels(result).inc()

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
