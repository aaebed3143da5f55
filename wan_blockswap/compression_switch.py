"""``transfer_compression="auto"``: keep compressed transfers only where copies are exposed.

Compression shortens the copies but costs GPU time to decode. It pays when a forward waits
for copies (few tokens) and costs 1-2.5% when compute hides the copies anyway (H100,
Wan-14B shapes through ComfyUI, against raw copies: -17% at 1,560 tokens with a quarter of
the weights resident, +1.0-2.4% at 32,760 tokens, ``benchmarks/results/comfyui_h100.json``).

Which case a model is in depends on the input, so auto mode starts compressed and times one
forward (the second: the first learns the order of use) and that forward's copies. It then
compares the forward with the time the raw bytes of those copies would take at the rate the
copies themselves ran (a separate bandwidth probe would need memory and, with a small
buffer, reads low: 49.5 against 54.8 GB/s). A forward clearly slower than that could not
have been faster raw: it is compute-bound, so the engine drops the packed copies and keeps
the raw weights pinned, which also gives back the extra RAM. Otherwise it keeps compressing.
The decision is made once per applied swap.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger("wan_blockswap")

TIMED_FORWARD = 2  # 1-based: the first forward may load out of order while learning it
# A compressed forward this much slower than the raw copies alone is compute-bound.
COMPUTE_BOUND_MARGIN = 1.05


class CompressionAutoSwitch:
    """Times the second forward on the compute stream; decides at the start of the third."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.decided = False
        self.forwards = 0
        self.events: tuple[Any, Any] | None = None
        self.ended = False  # the timed forward finished and its end event was recorded
        self.raw_bytes_at_start = 0
        self.raw_bytes = 0
        self.copies: list = []  # (start, end, bytes) of the timed forward's unit copies

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
        self.events, self.ended, self.copies = None, False, []
        self.forwards = TIMED_FORWARD - 1

    def keep_compression(self) -> bool | None:
        """True or False once the timed forward has finished; None before."""
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
        # raw bytes at the rate this forward's copies ran (no copies: nothing to save)
        raw_ms = self.raw_bytes * copy_ms / sent if sent else 0.0
        self.decided = True
        self.copies = []
        keep = forward_ms <= COMPUTE_BOUND_MARGIN * raw_ms
        logger.info(
            "transfer_compression=auto: a forward took %.1f ms; its raw copies alone would "
            "take %.1f ms, so %s",
            forward_ms,
            raw_ms,
            (
                "copies are exposed: keeping compressed transfers"
                if keep
                else "compute hides the copies: switching to raw transfers (pinned)"
            ),
        )
        return keep
