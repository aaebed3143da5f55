"""A load progress bar on stderr, per block, for the library and the CLI."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class TerminalProgress:
    """``progress(done_bytes, total_bytes, label)`` callback that redraws one stderr line,
    at most every 0.1 s and once more when the load completes."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self._last = 0.0
        self._start = time.perf_counter()

    def __call__(self, done: int, total: int, label: str) -> None:
        now = time.perf_counter()
        finished = done >= total
        if not finished and now - self._last < 0.1:
            return
        self._last = now
        share = done / total if total else 1.0
        filled = int(self.width * share)
        rate = done / max(now - self._start, 1e-9) / 2**30
        self.stream.write(
            f"\rloading {label:<14.14} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{100 * share:5.1f}% {done / 2**30:6.2f}/{total / 2**30:.2f} GiB {rate:5.2f} GiB/s"
        )
        if finished:
            self.stream.write("\n")
        self.stream.flush()
