"""Progress of a one-pass `ingestd sync`: one rich bar per watch on a terminal, plain
periodic lines otherwise (logs and CI capture stderr, where a bar would be noise)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from ingestd.pipeline.outcome import Outcome

# Results that finish an item for this pass; "retry" and "changed" come back later.
_FINISHED = frozenset({"synced", "unchanged", "deleted", "failed"})


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


@dataclass
class WatchProgress:
    """One watch's share of the pass. `total` is what finished plus what is still pending,
    so it grows while the scan that runs beside the workers plans more items."""

    name: str
    done: int = 0
    failed: int = 0
    bytes: int = 0
    pending: int = 0

    @property
    def total(self) -> int:
        return self.done + self.pending

    def rates(self, elapsed: float) -> tuple[float, float, float | None]:
        """(items/s, bytes/s, seconds left or None while no rate is known)."""
        elapsed = max(elapsed, 1e-6)
        items_rate = self.done / elapsed
        eta = self.pending / items_rate if items_rate > 0 else None
        return items_rate, self.bytes / elapsed, eta

    def line(self, elapsed: float) -> str:
        items_rate, bytes_rate, eta = self.rates(elapsed)
        left = "?" if eta is None else f"{eta:.0f}s"
        failed = f", {self.failed} failed" if self.failed else ""
        return (
            f"{self.name}: {self.done}/{self.total} items{failed}, {_human_bytes(self.bytes)},"
            f" {items_rate:.0f} items/s, {_human_bytes(bytes_rate)}/s, eta {left}"
        )


@dataclass
class Progress:
    out: TextIO = field(default_factory=lambda: sys.stderr)
    tty: bool = False
    interval: float = 2.0  # seconds between plain lines
    watches: dict[str, WatchProgress] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    _bar: object | None = None
    _tasks: dict[str, object] = field(default_factory=dict)
    _last_line: float = 0.0

    def begin(self, names: list[str]) -> None:
        self.started = time.monotonic()
        self._last_line = self.started
        for n in names:
            self.watches.setdefault(n, WatchProgress(n))
        if not self.tty:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[bytes]}"),
            TimeRemainingColumn(),
            console=Console(file=self.out, force_terminal=True),
            transient=False,
        )
        bar.start()
        self._bar = bar
        for n in names:
            self._tasks[n] = bar.add_task(n, total=None, rate="", bytes="")

    def outcome(self, o: Outcome) -> None:
        w = self.watches.setdefault(o.claim.watch, WatchProgress(o.claim.watch))
        if o.result in _FINISHED:
            w.done += 1
            w.pending = max(w.pending - 1, 0)
        if o.result == "failed":
            w.failed += 1
        w.bytes += o.bytes

    def tick(self, pending: dict[str, int]) -> None:
        """Refresh with each watch's pending count as the ledger has it now."""
        for name, w in self.watches.items():
            w.pending = pending.get(name, 0)
        now = time.monotonic()
        elapsed = now - self.started
        if self._bar is not None:
            for name, w in self.watches.items():
                items_rate, bytes_rate, _ = w.rates(elapsed)
                self._bar.update(  # type: ignore[attr-defined]
                    self._tasks[name],
                    completed=w.done,
                    total=w.total or None,
                    rate=f"{items_rate:.0f} items/s",
                    bytes=f"{_human_bytes(w.bytes)} {_human_bytes(bytes_rate)}/s",
                )
        elif now - self._last_line >= self.interval:
            self._last_line = now
            self._print_lines(elapsed)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.stop()  # type: ignore[attr-defined]

    def _print_lines(self, elapsed: float) -> None:
        for w in self.watches.values():
            if w.total:
                print(w.line(elapsed), file=self.out, flush=True)
