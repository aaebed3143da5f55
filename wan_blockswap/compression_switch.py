"""``transfer_compression="auto"``: keep compressed transfers only where copies are exposed.

Compression shortens the copies but costs GPU time to decode. It pays when a forward waits
for copies (few tokens) and costs 1-2.5% when compute hides the copies anyway (H100,
Wan-14B shapes through ComfyUI, against raw copies: -17% at 1,560 tokens with a quarter of
the weights resident, +1.0-2.4% at 32,760 tokens, ``benchmarks/results/comfyui_h100.json``).

Which case a model is in depends on the input, so auto mode starts compressed and times a
forward (from the second: the first learns the order of use) and that forward's copies. It
then compares the forward with the time the raw bytes of those copies would take at the rate
the copies themselves ran (a separate bandwidth probe would need memory and, with a small
buffer, reads low: 49.5 against 54.8 GB/s). A forward clearly slower than that could not
have been faster raw: it is compute-bound. Only when SWITCH_VERDICTS timed forwards in a row
find so does the engine drop the packed copies and keep the raw weights pinned, which also
gives back the extra RAM; the first forward that finds its copies exposed keeps compressing.
Noise only ever slows a forward, so one slow forward proves nothing: on an H100 (8 Wan-14B
blocks through ComfyUI, 1 frame, 4 GiB free) one arm's timed forward took 110 ms against 96 ms
of raw copies while its other forwards took 64-76 ms, and it ran on raw copies at 2.2x core's
s/it where the same plan kept compressed ran at 0.85x
(benchmarks/results/comfyui_dynamic_h100/session18_8blocks.json). The decision is made once
per applied swap.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger("wan_blockswap")

TIMED_FORWARD = 2  # 1-based: the first forward may load out of order while learning it
# A compressed forward this much slower than the raw copies alone is compute-bound.
COMPUTE_BOUND_MARGIN = 1.05
SWITCH_VERDICTS = 3  # timed forwards in a row that must find compute-bound to switch


class CompressionAutoSwitch:
    """Times forwards from the second on, on the compute stream; decides at the start of the
    forward after the first timed one that finds copies exposed, or after SWITCH_VERDICTS
    timed ones that find compute hiding them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.decided = False
        self.forwards = 0
        self.events: tuple[Any, Any] | None = None
        self.ended = False  # the timed forward finished and its end event was recorded
        self.raw_bytes_at_start = 0
        self.raw_bytes = 0
        self.copies: list = []  # (start, end, bytes) of the timed forward's unit copies
        self.compute_bound: list[tuple[float, float]] = []  # (forward, raw copies) ms so far
        # the rate the timed copies ran at (bytes per ms), the fastest seen; 0 before one ran
        self.bytes_per_ms = 0.0

    def begin(self, raw_bytes_copied: int, scheduler: Any) -> None:
        if self.decided:
            return
        if self.events is not None and not self.ended:
            # The timed forward never reached its end hook (KeyboardInterrupt skips
            # always_call hooks): time this one instead.
            self._restart(scheduler)
        self.forwards += 1
        if self.forwards == TIMED_FORWARD:
            stream = torch.cuda.current_stream(self.device)
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            self.events = (start, torch.cuda.Event(enable_timing=True))
            self.raw_bytes_at_start = raw_bytes_copied
            scheduler.copy_clock = self.copies = []

    def end(self, raw_bytes_copied: int, completed: bool, scheduler: Any) -> None:
        if self.decided or self.events is None or self.ended:
            return
        scheduler.copy_clock = None
        if not completed:  # interrupted: time a later forward instead
            self._restart(scheduler)
            return
        self.events[1].record(torch.cuda.current_stream(self.device))
        self.ended = True
        self.raw_bytes = raw_bytes_copied - self.raw_bytes_at_start

    def _restart(self, scheduler: Any) -> None:
        scheduler.copy_clock = None
        self._time_the_next_forward()

    def _time_the_next_forward(self) -> None:
        self.events, self.ended, self.copies = None, False, []
        self.forwards = TIMED_FORWARD - 1

    def keep_compression(self) -> bool | None:
        """True or False once decided (see the class); None before."""
        if self.decided or not self.ended:
            return None
        assert self.events is not None
        start, end = self.events
        end.synchronize()  # recorded a forward ago: normally long done
        forward_ms = start.elapsed_time(end)
        for _, copy_end, _ in self.copies:
            copy_end.synchronize()
        # The copy clock includes waits for a free staging buffer, so it reads the link a
        # little slow: ties lean towards keeping compression, which then costs 1-2.5%.
        copy_ms = sum(a.elapsed_time(b) for a, b, _ in self.copies)
        sent = sum(nbytes for _, _, nbytes in self.copies)
        if sent and copy_ms > 0:
            self.bytes_per_ms = max(self.bytes_per_ms, sent / copy_ms)
        # raw bytes at the rate this forward's copies ran (no copies: nothing to save)
        raw_ms = self.raw_bytes * copy_ms / sent if sent else 0.0
        keep = forward_ms <= COMPUTE_BOUND_MARGIN * raw_ms
        if not keep:
            self.compute_bound.append((forward_ms, raw_ms))
            if len(self.compute_bound) < SWITCH_VERDICTS:
                self._time_the_next_forward()
                return None
            # the fastest of them: the one least slowed by anything but its own work
            forward_ms, raw_ms = min(self.compute_bound)
        self.decided = True
        self.copies = []
        logger.info(
            "transfer_compression=auto: %s took %.1f ms; its raw copies alone would take "
            "%.1f ms, so %s",
            "a forward" if keep else f"the fastest of {SWITCH_VERDICTS} timed forwards",
            forward_ms,
            raw_ms,
            (
                "copies are exposed: keeping compressed transfers"
                if keep
                else "compute hides the copies: switching to raw transfers (pinned)"
            ),
        )
        return keep
