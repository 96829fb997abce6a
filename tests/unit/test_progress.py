"""`ingestd sync` progress: one bar per watch on a terminal, plain lines per watch otherwise."""

from __future__ import annotations

import io

from ingestd.ledger import Claim
from ingestd.pipeline.outcome import Outcome
from ingestd.runtime.progress import Progress, WatchProgress


def _outcome(watch: str, result: str, size: int = 0) -> Outcome:
    claim = Claim(watch, "a.jpg", "ds", "/a.jpg", None, None, None, 0, None)
    return Outcome(claim, result, bytes=size)


def test_each_watch_counts_only_its_own_finished_items_and_bytes() -> None:
    p = Progress(out=io.StringIO(), tty=False)
    p.begin(["cams", "scans"])
    p.tick({"cams": 3, "scans": 1})
    p.outcome(_outcome("cams", "synced", 2_000_000))
    p.outcome(_outcome("cams", "failed"))
    p.outcome(_outcome("cams", "retry"))  # comes back later: not finished
    p.outcome(_outcome("scans", "unchanged"))
    cams, scans = p.watches["cams"], p.watches["scans"]
    assert (cams.done, cams.failed, cams.bytes, cams.total) == (2, 1, 2_000_000, 3)
    assert (scans.done, scans.failed, scans.bytes, scans.total) == (1, 0, 0, 1)


def test_total_grows_as_the_scan_beside_the_workers_plans_more() -> None:
    p = Progress(out=io.StringIO(), tty=False)
    p.begin(["w"])
    p.tick({"w": 2})
    p.outcome(_outcome("w", "synced", 10))
    p.tick({"w": 5})
    assert p.watches["w"].total == 6


def test_plain_lines_name_each_watch_with_counts_bytes_rate_and_eta() -> None:
    out = io.StringIO()
    p = Progress(out=out, tty=False, interval=0.0)
    p.begin(["cams", "idle"])
    p.outcome(_outcome("cams", "synced", 1_500_000))
    p.tick({"cams": 1})
    text = out.getvalue()
    assert "cams: 1/2 items, 1.5 MB," in text
    assert "items/s" in text and "B/s" in text and "eta " in text
    assert "idle" not in text  # nothing to do there: no line


def test_plain_lines_wait_for_the_interval() -> None:
    out = io.StringIO()
    p = Progress(out=out, tty=False, interval=3600.0)
    p.begin(["w"])
    p.outcome(_outcome("w", "synced"))
    p.tick({"w": 0})
    assert out.getvalue() == ""


def test_terminal_shows_one_bar_per_watch() -> None:
    out = io.StringIO()
    p = Progress(out=out, tty=True)
    p.begin(["cams", "scans"])
    for _ in range(3):
        p.outcome(_outcome("cams", "synced", 1000))
    p.outcome(_outcome("scans", "synced", 5000))
    p.tick({"cams": 1, "scans": 0})
    p.end()
    text = out.getvalue()
    assert "cams" in text and "scans" in text
    assert "3/4" in text and "1/1" in text
    assert "items/s" in text and "kB" in text


def test_eta_is_unknown_until_something_finished() -> None:
    w = WatchProgress("w", pending=4)
    assert w.rates(1.0)[2] is None
    w.done = 2
    assert w.rates(1.0) == (2.0, 0.0, 2.0)
