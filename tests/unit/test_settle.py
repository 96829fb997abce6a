"""The settle rule, driven by a fake clock and scripted stats (no sleeping)."""

from __future__ import annotations

from collections.abc import Sequence

from ingestd.core.model import Entry
from ingestd.sources.settle import Settler, Stat


class Harness:
    def __init__(self, settle: float, max_pending: int = 1000) -> None:
        self.now = 100.0
        self.stats: dict[str, Stat] = {}
        self.ready: list[Entry] = []
        self.gone: list[str] = []
        self.overflows = 0
        self.s = Settler(
            settle,
            self._stat_many,
            self.ready.extend,
            self.gone.extend,
            max_pending=max_pending,
            on_overflow=self._overflow,
            clock=lambda: self.now,
        )

    def _overflow(self) -> None:
        self.overflows += 1

    def _stat_many(self, rels: Sequence[str]) -> list[Stat]:
        return [self.stats.get(r) for r in rels]

    def step(self, dt: float) -> None:
        """Advance the clock and evaluate whatever is due (what run() does)."""
        self.now += dt
        due = self.s.pop_due(self.now)
        if due:
            self.s.evaluate(due, self._stat_many(due), self.now)


def test_ready_only_after_stable_for_settle() -> None:
    h = Harness(2.0)
    h.stats["a"] = (10, 1)
    h.s.hint("a")
    h.step(0)  # first observation
    assert h.ready == []
    h.step(1.0)
    assert h.ready == []
    h.step(1.0)
    assert h.ready == [Entry("a", 10, 1)]
    assert "a" not in h.s


def test_growing_file_is_held_until_it_stops_changing() -> None:
    h = Harness(2.0)
    h.stats["a"] = (10, 1)
    h.s.hint("a")
    h.step(0)
    for i in range(10):  # grows every 1.9 s, i.e. never quiet for 2 s
        h.stats["a"] = (10 + i, 2 + i)
        h.step(1.9)
        assert h.ready == [], f"released a growing file at step {i}"
    h.step(2.0)
    h.step(2.0)
    assert h.ready == [Entry("a", 19, 11)]


def test_scan_observation_counts_as_first_look() -> None:
    h = Harness(2.0)
    h.stats["a"] = (5, 5)
    h.s.hint("a", stat=(5, 5))
    h.step(1.0)
    assert h.ready == []
    h.step(1.0)
    assert h.ready == [Entry("a", 5, 5)]


def test_zero_settle_is_ready_on_first_observation() -> None:
    h = Harness(0.0)
    h.stats["a"] = (1, 1)
    h.s.hint("a")
    h.step(0)
    assert h.ready == [Entry("a", 1, 1)]


def test_vanished_file_is_reported_gone() -> None:
    h = Harness(1.0)
    h.stats["a"] = (1, 1)
    h.s.hint("a")
    h.step(0)
    del h.stats["a"]
    h.step(1.0)
    assert h.gone == ["a"]
    assert h.ready == []


def test_repeated_hints_do_not_restart_a_stable_window() -> None:
    h = Harness(2.0)
    h.stats["a"] = (1, 1)
    h.s.hint("a")
    h.step(0)
    for _ in range(3):  # close events etc. for an unchanged file
        h.s.hint("a")
        h.step(0.5)
    h.step(0.6)
    assert h.ready == [Entry("a", 1, 1)]


def test_overflow_drops_new_paths_and_reports_once() -> None:
    h = Harness(1.0, max_pending=2)
    for rel in ("a", "b", "c", "d"):
        h.stats[rel] = (1, 1)
        h.s.hint(rel)
    assert len(h.s) == 2
    assert h.overflows == 1
    h.step(0)
    h.step(1.0)
    assert sorted(e.relpath for e in h.ready) == ["a", "b"]
    assert not h.s.overflowed  # drained: the rescan it asked for will find c and d


def test_a_hint_after_a_mid_write_look_looks_again_at_once() -> None:
    # The first look caught the writer just after its open (size 0); its close event
    # must not leave the file waiting a second settle.
    h = Harness(0.5)
    h.stats["a"] = (0, 1)
    h.s.hint("a")
    h.step(0)
    h.stats["a"] = (10, 2)  # written and closed
    h.s.hint("a")
    h.step(0.01)
    h.step(0.5)
    assert h.ready == [Entry("a", 10, 2)]


def test_hint_says_whether_the_path_is_newly_held() -> None:
    h = Harness(1.0)
    h.stats["a"] = (1, 1)
    assert h.s.hint("a") is True
    assert h.s.hint("a") is False  # more events of the same write
    assert h.s.hint("a", stat=(1, 1)) is False  # a scan meeting it while it settles
    h.step(0)
    h.step(1.0)
    assert h.ready == [Entry("a", 1, 1)]
    assert h.s.hint("a") is True  # written again after it was handed on
