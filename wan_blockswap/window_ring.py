"""Streaming layer by layer with no fixed slots: each unit gets GPU memory of its own size
when it is prefetched and gives it back when it has run.

[Note: streamed plans]
Fixed slots are each as large as the largest unit, and weights outside the blocks stay
resident, so a slot ring cannot go below a few of the largest layers plus those weights
(Wan 14B: 0.61 GiB). ComfyUI core at a zero weight budget holds one layer at a time, sized to
that layer, and peaks at its activations plus its largest layer (0.35 GiB at 1,560 tokens,
where Wan's 315 MB ``time_projection`` is that layer). A streamed plan does the same with
prefetch: at most ``window_bytes`` of units are on the GPU at once, prefetched or in use, at
most ``prefetch_blocks`` of them ahead of the one in use, and a unit larger than the window
loads alone. Both limits matter. The window bounds the peak where a large layer is the peak
(Wan's time projection at 1,560 tokens). The depth bounds it where activations are: at
32,760 tokens Wan peaks inside self-attention, between its projections, and a window that
lets both FFN layers sit on the GPU at once (270 MiB, one copy hidden behind the other's
matmul) would there fill with four attention projections instead; one layer ahead keeps that
to one (H100, comfyui benchmark: the peak stayed 2% above core's).

Memory crosses streams safely without fixed slots:
  prefetch(u): the buffer is allocated on the compute stream C (like any activation), C
      records ``freed[h]`` right after, and the copy stream X waits on it before writing: the
      allocator only hands out memory whose previous users on C are ordered before that point.
  wait(u): C waits on ``ready[h]`` as with slots.
  release(u): the buffer is dropped on C, after C's last use. X and D (decode) wrote it
      before ``ready[h]``, which C waited for, so nothing else still uses it.
  a prefetched unit that is never used: C waits on its ``ready[h]`` before dropping it.
A compressed unit's packed chunks land in one staging buffer of the unit's own, allocated
with it and dropped once C has waited for the decodes (at wait(u)), so it takes memory only
while the unit is in flight. Under ``cudaMallocAsync`` the same holds: allocation and free
are ordered on C, and every other stream's use is fenced by those events.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .errors import InsufficientMemoryError
from .memory import PACKED_SHARE
from .ring import SlotRing
from .stats import SwapStats
from .storage import _align
from .stored_unit import StoredUnit
from .streams import DeviceStreams

# Handles for units in flight; the window, not this, bounds how many there are.
HANDLES = 32


class WindowRing(SlotRing):
    """Prefetch ``units`` in schedule order, at most ``lookahead`` ahead of the one in use,
    while at most ``window_bytes`` of them sit on the GPU; with nothing on the GPU the next
    unit always loads (alone, if larger than the window)."""

    def __init__(
        self,
        streams: DeviceStreams,
        units: Sequence[StoredUnit],
        window_bytes: int,
        lookahead: int,
        non_blocking: bool,
        stats: SwapStats,
        debug: bool = False,
    ) -> None:
        super().__init__(streams, units, HANDLES, 0, non_blocking, stats, debug=debug)
        self.window_bytes = window_bytes
        self.lookahead = lookahead
        self.held = [0] * HANDLES  # GPU bytes each handle holds now
        self.handle_views: list[list[torch.Tensor] | None] = [None] * HANDLES
        self.unit_staging: list[torch.Tensor | None] = [None] * HANDLES
        self.stage_cursor = [0] * HANDLES
        # The stream each handle's memory was allocated on (the compute stream of its time)
        self.allocated_on: list = [None] * HANDLES

    def pool_key(self) -> tuple | None:
        return None  # nothing fixed to share with another model

    @property
    def held_bytes(self) -> int:
        """GPU bytes the units in flight hold now."""
        return sum(self.held)

    def allocate(self) -> None:
        if self.ready:
            return
        self.inference = self._units_are_inference()
        self.slots = [None] * HANDLES  # type: ignore[list-item]
        self.ready = [self.streams.new_event() for _ in range(HANDLES)]
        self.freed = [self.streams.new_event() for _ in range(HANDLES)]
        self.copied = [self.streams.new_event() for _ in range(HANDLES)]

    def release_memory(self) -> None:
        if not self.ready:
            return
        self.end_forward(completed=False)
        self.streams.synchronize()  # nothing in flight: every buffer can go
        self.evict()

    def evict(self) -> None:
        super().evict()
        self.held = [0] * HANDLES
        self.handle_views = [None] * HANDLES
        self.unit_staging = [None] * HANDLES
        self.allocated_on = [None] * HANDLES

    # -- the hooks of SlotRing --------------------------------------------------------------

    def _cost(self, unit: int) -> int:
        stored = self.units[unit]
        if stored.transfer is not None:
            return stored.nbytes + stored.transfer.staging_nbytes
        if stored.compress:  # sealed when it loads (a loader filled it after apply)
            return stored.nbytes + int(PACKED_SHARE * stored.nbytes)
        return stored.nbytes

    def _admits(self, unit: int) -> bool:
        held = self.held_bytes
        if not held:
            return True
        if len(self.ahead) >= self.lookahead:  # see [Note: streamed plans] for why both
            return False
        return held + self._cost(unit) <= self.window_bytes

    def _prepare(self, unit: int, slot: int) -> None:
        stored = self.units[unit]
        device = self.streams.device
        try:
            with torch.inference_mode(self.inference), torch.no_grad():
                buffer = torch.empty(stored.nbytes, dtype=torch.uint8, device=device)
                staging = None
                if stored.transfer is not None:
                    staging = torch.empty(
                        stored.transfer.staging_nbytes, dtype=torch.uint8, device=device
                    )
                self.handle_views[slot] = stored.layout.views(buffer)
        except torch.cuda.OutOfMemoryError as error:
            raise InsufficientMemoryError(
                f"out of VRAM streaming {stored.name} ({stored.nbytes / 2**20:.0f} MiB, with "
                f"{self.held_bytes / 2**20:.0f} MiB of layers already on {device}): lower "
                f"vram_budget_gb (a smaller window) or free VRAM. The model is unchanged and "
                f"usable."
            ) from error
        self.slots[slot] = buffer
        self.unit_staging[slot] = staging
        self.stage_cursor[slot] = 0
        self.held[slot] = stored.nbytes + (staging.numel() if staging is not None else 0)
        # The writers on other streams start after this point of C (see the note)
        compute = self.streams.compute_stream()
        self.allocated_on[slot] = compute
        self.streams.record(self.freed[slot], compute)

    def _views(self, unit: int, slot: int) -> list[torch.Tensor]:
        views = self.handle_views[slot]
        assert views is not None
        return views

    def _targets(self, stored: StoredUnit, slot: int) -> list[torch.Tensor]:
        assert stored.transfer is not None
        return stored.transfer.targets(self.slots[slot])

    def _staging(self, slot: int, nbytes: int) -> tuple[torch.Tensor, object, object]:
        staging = self.unit_staging[slot]
        assert staging is not None
        offset = self.stage_cursor[slot]
        self.stage_cursor[slot] = _align(offset + nbytes)
        # Every chunk has its own place: no chunk waits for the previous one's decode.
        return staging[offset : offset + nbytes], None, self.streams.new_event(timing=False)

    def _on_bound(self, slot: int) -> None:
        staging = self.unit_staging[slot]
        if staging is not None:  # C waits for the decodes from here on: staging is done
            self.held[slot] -= staging.numel()
            self.unit_staging[slot] = None

    def _on_released(self, slot: int) -> None:
        allocated_on, compute = self.allocated_on[slot], self.streams.compute_stream()
        if allocated_on is not None and allocated_on != compute:
            # used on another stream than the one it came from (a forward under a different
            # torch.cuda.stream): the allocator may hand it out again on the first one
            done = self.streams.new_event(timing=False)
            self.streams.record(done, compute)
            self.streams.wait(allocated_on, done)
        self._free(slot)

    def _drop(self, slot: int) -> None:
        super()._drop(slot)
        # Never used, so C never waited for its writers: it does before the memory goes.
        if self.allocated_on[slot] is not None:
            self.streams.wait(self.allocated_on[slot], self.ready[slot])
        self._free(slot)

    def _abandon(self, unit: int, slot: int) -> None:
        super()._abandon(unit, slot)  # synchronises first
        self._free(slot)

    def _free(self, slot: int) -> None:
        self.slots[slot] = None  # type: ignore[call-overload]
        self.handle_views[slot] = None
        self.unit_staging[slot] = None
        self.held[slot] = 0
        self.occupant[slot] = None
        self.allocated_on[slot] = None
