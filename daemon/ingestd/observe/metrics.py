"""Prometheus metrics of the running daemon (`/metrics` on the control endpoint).

Two kinds of numbers:

- Counted as things happen, from sync outcomes: items planned, synced, failed, retried,
  deleted, bytes uploaded, and the planned → synced latency. They start at zero when
  the daemon starts, as Prometheus counters do.
- Read when scraped: per-watch runtime counters (files seen, rescans, inotify
  overflows), config reloads, the queue depth, and the ledger's current synced /
  pending / failed counts per watch (`ingestd_items`), so the gauges are right even
  for work done before this run.

The daemon gets its own CollectorRegistry rather than prometheus_client's global one,
so that tests (and the server of `ingestd serve`, which has its own metrics) can create
as many as they like without "duplicated timeseries" errors. Labels stay bounded: the
watch name (from the config) and a fixed set of results.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ingestd.pipeline.outcome import Outcome

# A file settles for a couple of seconds before it is planned; a big upload or a
# backlog can take minutes to hours.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 900, 3600, 14400)
SEEN_PLANS = 100_000  # distinct item states remembered so a retry is not counted as planned


@dataclass
class Snapshot:
    """The numbers read at scrape time (gathered on the event loop and the ledger
    reader before rendering, since a collector cannot await)."""

    watch_stats: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    items: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # watch -> status -> n
    queue_depth: int = 0
    reloads: int = 0
    watches: tuple[str, ...] = ()


class _Live(Collector):
    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def describe(self) -> Iterator[Metric]:
        return iter(self._families(Snapshot()))

    def collect(self) -> Iterator[Metric]:
        return iter(self._families(self.snapshot))

    @staticmethod
    def _families(s: Snapshot) -> list[Metric]:
        seen = CounterMetricFamily(
            "ingestd_files_seen",
            "Files the watch noticed new or changed; the events of one write count once",
            labels=["watch"],
        )
        scans = CounterMetricFamily(
            "ingestd_rescans", "Scans of the watch's source (full and sub-folder)", labels=["watch"]
        )
        overflows = CounterMetricFamily(
            "ingestd_inotify_overflows",
            "Times the kernel's event queue overflowed (each triggers a rescan)",
            labels=["watch"],
        )
        for watch, stats in sorted(s.watch_stats.items()):
            seen.add_metric([watch], float(stats.get("files_seen", 0)))
            scans.add_metric([watch], float(stats.get("scans", 0)))
            overflows.add_metric([watch], float(stats.get("overflows", 0)))
        items = GaugeMetricFamily(
            "ingestd_items", "Items in the ledger by status, now", labels=["watch", "status"]
        )
        for watch in s.watches:
            counts = s.items.get(watch, {})
            for status in ("synced", "pending", "failed"):
                items.add_metric([watch, status], float(counts.get(status, 0)))
        queue = GaugeMetricFamily(
            "ingestd_queue_depth", "Items being synced right now (claimed by a worker)"
        )
        queue.add_metric([], float(s.queue_depth))
        reloads = CounterMetricFamily(
            "ingestd_config_reloads", "New configs applied since the daemon started"
        )
        reloads.add_metric([], float(s.reloads))
        return [seen, scans, overflows, items, queue, reloads]


class DaemonMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.planned = Counter(
            "ingestd_items_planned",
            "Distinct item states (new or changed items, deletions) taken up by the sync workers",
            ["watch"],
            registry=r,
        )
        self.synced = Counter(
            "ingestd_items_synced",
            "Items sent to the backend and confirmed (created or updated)",
            ["watch"],
            registry=r,
        )
        self.unchanged = Counter(
            "ingestd_items_unchanged",
            "Items re-checked and found identical to what was synced (nothing sent)",
            ["watch"],
            registry=r,
        )
        self.deleted = Counter(
            "ingestd_items_deleted", "Item deletions recorded (on_delete)", ["watch"], registry=r
        )
        self.failed = Counter(
            "ingestd_items_failed",
            "Items that failed permanently (bad input, rejected by the backend)",
            ["watch"],
            registry=r,
        )
        self.retries = Counter(
            "ingestd_sync_retries",
            "Sync attempts that failed and will be retried (backend down, timeouts)",
            ["watch"],
            registry=r,
        )
        self.bytes = Counter(
            "ingestd_bytes_uploaded", "Bytes of items sent to the backend", ["watch"], registry=r
        )
        self.latency = Histogram(
            "ingestd_sync_latency_seconds",
            "From an item being planned (or its last retry being scheduled) to it being synced",
            ["watch"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._per_watch = (
            self.planned,
            self.synced,
            self.unchanged,
            self.deleted,
            self.failed,
            self.retries,
            self.bytes,
            self.latency,
        )
        self._live = _Live()
        r.register(self._live)
        self._seen: OrderedDict[tuple[str, str, str | None], None] = OrderedDict()

    def outcome(self, o: Outcome, now: float | None = None) -> None:
        """Count one sync outcome (called on the event loop for every outcome)."""
        c = o.claim
        state = (c.watch, c.source_id, c.desired_fp)
        if o.result != "abandoned":
            if state in self._seen:
                self._seen.move_to_end(state)
            else:
                self._seen[state] = None
                if len(self._seen) > SEEN_PLANS:
                    self._seen.popitem(last=False)
                self.planned.labels(c.watch).inc()
        if o.result == "synced":
            self.synced.labels(c.watch).inc()
            self.bytes.labels(c.watch).inc(o.bytes)
            planned_at = getattr(c, "planned_at", 0.0)
            if planned_at > 0:
                now = time.time() if now is None else now
                self.latency.labels(c.watch).observe(max(0.0, now - planned_at))
        elif o.result == "unchanged":
            self.unchanged.labels(c.watch).inc()
        elif o.result == "deleted":
            self.deleted.labels(c.watch).inc()
        elif o.result == "failed":
            self.failed.labels(c.watch).inc()
        elif o.result == "retry":
            self.retries.labels(c.watch).inc()

    def render(self, snapshot: Snapshot) -> bytes:
        # Every configured watch shows its counters from 0, before its first outcome,
        # so that rate() and increase() see the first items too.
        for watch in snapshot.watches:
            for counter in self._per_watch:
                counter.labels(watch)
        self._live.snapshot = snapshot
        return generate_latest(self.registry)
