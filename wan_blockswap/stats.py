"""Counters that are always on (cheap) and per-forward timings that only debug mode collects.

Timings need a host synchronisation to read, so they are gathered once at the end of a
forward and only when ``debug`` is set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("wan_blockswap")


@dataclass
class UnitTiming:
    """Events of one use of one unit (debug mode): copy on the copy stream, use on compute."""

    name: str
    copy_start: Any = None
    copy_end: Any = None
    reached: Any = None  # compute stream arrived at the unit
    began: Any = None  # compute stream passed the wait (copy done)
    released: Any = None

    def resolve(self) -> tuple[float, float, float]:
        """(copy ms, compute ms, stall ms): call after a synchronisation."""
        copy_ms = self.copy_start.elapsed_time(self.copy_end) if self.copy_start else 0.0
        stall_ms = self.reached.elapsed_time(self.began) if self.reached else 0.0
        compute_ms = self.began.elapsed_time(self.released) if self.released else 0.0
        return copy_ms, compute_ms, max(0.0, stall_ms)


@dataclass
class ForwardReport:
    """Debug summary of one forward."""

    units: list[tuple[str, float, float, float]] = field(default_factory=list)

    @property
    def copy_ms(self) -> float:
        return sum(u[1] for u in self.units)

    @property
    def compute_ms(self) -> float:
        return sum(u[2] for u in self.units)

    @property
    def stall_ms(self) -> float:
        return sum(u[3] for u in self.units)

    @property
    def hidden_share(self) -> float:
        """Share of copy time overlapped by compute (1.0 = copies cost nothing)."""
        if self.copy_ms <= 0:
            return 1.0
        return max(0.0, 1.0 - self.stall_ms / self.copy_ms)

    def format(self) -> str:
        lines = [
            f"{name}: copy {copy:.2f} ms, compute {compute:.2f} ms, stalled {stall:.2f} ms"
            for name, copy, compute, stall in self.units
        ]
        lines.append(
            f"copy {self.copy_ms:.1f} ms, compute {self.compute_ms:.1f} ms, "
            f"{100 * self.hidden_share:.0f}% of copy time hidden behind compute"
        )
        return "\n".join(lines)


@dataclass
class SwapStats:
    """Running totals for one swapped model."""

    forwards: int = 0
    copies: int = 0
    bytes_copied: int = 0  # over the link (packed where transfers are compressed)
    raw_bytes_copied: int = 0  # the same copies' weights, unpacked
    cache_hits: int = 0
    misses: int = 0
    relearned: int = 0
    last_report: ForwardReport | None = None
    pending: list[UnitTiming] = field(default_factory=list)

    def finish_forward(self, synchronize: Any) -> None:
        """Turn this forward's debug events into a report and log it."""
        if not self.pending:
            return
        synchronize()
        report = ForwardReport()
        for timing in self.pending:
            if timing.released is None:
                continue
            report.units.append((timing.name, *timing.resolve()))
        self.pending.clear()
        self.last_report = report
        logger.info("block swap forward %d:\n%s", self.forwards, report.format())
