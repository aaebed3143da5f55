"""Streaming layer by layer with no fixed slots: each unit gets GPU memory of its own size
when it is prefetched and gives it back when it has run.

[Note: streamed plans]
Fixed slots are each as large as the largest unit, and weights outside the blocks stay
resident, so fixed slots cannot go below a few of the largest layers plus those weights
(Wan 14B: 0.61 GiB). ComfyUI core at a zero weight budget holds one layer at a time, sized to
that layer, and peaks at its activations plus its largest layer (0.35 GiB at 1,560 tokens,
where Wan's 315 MB ``time_projection`` is that layer). A streamed plan does the same with
prefetch: at most ``window_bytes`` of units are on the GPU at once, prefetched or in use, and
the units ahead of the one in use stop once they hold ``prefetch_blocks`` blocks' worth of
streamed bytes (the largest block's); a unit larger than the window loads alone, and the
least plan's window holds one layer at a time. The window bounds the peak: it is what the
plan gives the weights beside the forward (``vram_budget_gb``, or what auto measured).

Why a block's worth of bytes ahead, not a count of layers: a layer's copy must hide behind
the compute of the layers before it, and some layers compute almost nothing (Wan's
cross-attention k and v see the 512 text tokens; see [Note: grouped parts] in ``units``).
With one layer ahead the GPU waits on such copies; a block's layers together compute far
longer than they take to copy wherever copies can hide at all, which core's prefetch, looking
ahead by block, relies on too. Outside the server (H100, 8 Wan-14B blocks, 32,760 tokens, a
0.40 GiB window, session 25: benchmarks/results/streamed_lookahead_h100.json) a forward took
1.0142x the all-on-GPU time with one layer ahead and 1.0095x with a block's bytes. (Until
then the look-ahead was one layer, to hold the peak down inside self-attention, where a wider
window fills with four attention projections instead of one; the window is the budget for
that, and the least plan's holds one layer at a time.)

Memory crosses streams safely without fixed slots:
  prefetch(u): the buffer is allocated on the compute stream C (like any activation), C
      records its ``freed`` right after, and the copy stream X waits on it before writing:
      the allocator only hands out memory whose previous users on C are ordered before that
      point.
  wait(u): C waits on ``ready`` as with fixed slots.
  release(u): the buffer is dropped on C, after C's last use. X and D (decode) wrote it
      before ``ready``, which C waited for, so nothing else still uses it.
  a prefetched unit that is never used: C waits on its ``ready`` before dropping it.
A compressed unit's packed chunks land in one staging buffer of the unit's own, allocated
with it and dropped once C has waited for the decodes (at wait(u)), so it takes memory only
while the unit is in flight. Under ``cudaMallocAsync`` the same holds: allocation and free
are ordered on C, and every other stream's use is fenced by those events.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

import torch

from .errors import BlockSwapError, InsufficientMemoryError
from .memory import PACKED_SHARE
from .memory_provider import InFlight
from .storage import _align
from .stored_unit import StoredUnit
from .streams import DeviceStreams
from .swap_plan import ModelSizes, SwapPlan

# Records for units in flight, each with its events; the window and the look-ahead bound how
# many are taken, and this caps them (a look-ahead of many small layers stops here).
RECORDS = 32


def block_lookahead_bytes(sizes: ModelSizes, plan: SwapPlan, prefetch_blocks: int) -> int:
    """The bytes a streamed plan prefetches ahead of the unit in use: ``prefetch_blocks``
    times the largest swapped block's streamed layers ([Note: streamed plans])."""
    swapped = set(plan.swapped)
    block = max((sum(b.layer_bytes) for b in sizes.blocks if b.name in swapped), default=0)
    # blocks without layer units (only layers outside them stream): one unit ahead, as before
    return prefetch_blocks * max(block, 1)


class WindowAllocator:
    """GPU memory per unit (a :class:`MemoryProvider`): units ahead of the one in use until
    they hold ``lookahead_bytes``, and at most ``window_bytes`` of them on the GPU; with
    nothing on the GPU the next unit always loads (alone, if larger than the window)."""

    def __init__(
        self,
        streams: DeviceStreams,
        units: Sequence[StoredUnit],
        window_bytes: int,
        lookahead_bytes: int,
    ) -> None:
        self.streams = streams
        self.units = list(units)
        self.window_bytes = window_bytes
        self.lookahead_bytes = lookahead_bytes
        self.inference = False
        self.flights: list[InFlight] = []
        self.free: deque[InFlight] = deque()
        self.held = 0  # GPU bytes of every record together (kept, not summed per prefetch)

    def pool_key(self, inference: bool) -> tuple | None:
        return None  # nothing fixed to share with another model

    @property
    def holds_memory(self) -> bool:
        return bool(self.flights)

    @property
    def held_bytes(self) -> int:
        """GPU bytes the units in flight hold now."""
        return self.held

    def allocate(self, user: Any, inference: bool) -> None:
        if self.flights:
            return
        self.inference = inference
        new_event = self.streams.new_event
        self.flights = [
            InFlight(number, None, new_event(), new_event(), new_event())
            for number in range(RECORDS)
        ]
        self.free = deque(self.flights)

    def forget(self) -> None:
        """Called with every stream synchronised: each buffer can go at once."""
        self.flights = []
        self.free = deque()
        self.held = 0

    def let_go(self, user: Any) -> None:
        pass  # the buffers went with the records

    def invalidate(self) -> None:
        pass  # pieces' places are worked out per copy

    def _cost(self, stored: StoredUnit) -> int:
        if stored.transfer is not None:
            return stored.nbytes + stored.transfer.staging_nbytes
        if stored.compress:  # sealed when it loads (a loader filled it after apply)
            return stored.nbytes + int(PACKED_SHARE * stored.nbytes)
        return stored.nbytes

    def admits(self, stored: StoredUnit, ahead: Sequence[InFlight]) -> bool:
        held = self.held
        if not held:
            return True
        if self.lookahead_bytes <= 0:  # prefetch_blocks=0: each unit loads when it runs
            return False
        # a block's worth of bytes ahead, in the window ([Note: streamed plans])
        if ahead and sum(flight.held for flight in ahead) >= self.lookahead_bytes:
            return False
        return held + self._cost(stored) <= self.window_bytes

    def take(self, index: int) -> InFlight:
        if not self.free:
            raise BlockSwapError(
                f"{RECORDS} streamed layers are in flight while loading "
                f"{self.units[index].name}: swapped modules are nested deeper than a streamed "
                f"plan follows; use fixed slots (a larger vram_budget_gb)"
            )
        return self.free.popleft()  # every free record is empty: any will do

    def prepare(self, flight: InFlight, stored: StoredUnit) -> None:
        device = self.streams.device
        try:
            with torch.inference_mode(self.inference), torch.no_grad():
                buffer = torch.empty(stored.nbytes, dtype=torch.uint8, device=device)
                staging = None
                if stored.transfer is not None:
                    staging = torch.empty(
                        stored.transfer.staging_nbytes, dtype=torch.uint8, device=device
                    )
                flight.views = stored.layout.views(buffer)
        except torch.cuda.OutOfMemoryError as error:
            held = self.held_bytes
            # With none of our layers in flight a smaller window frees nothing: the forward's
            # own tensors fill the device (a floor run on an H100 ended here at 4 GiB free)
            fix = (
                "lower vram_budget_gb (a smaller window) or free VRAM"
                if held
                else "the forward's own tensors (activations) and other allocations fill the "
                "device, so a smaller window would not help: run a smaller input (fewer "
                "frames, a lower resolution or batch) or free VRAM"
            )
            raise InsufficientMemoryError(
                f"out of VRAM streaming {stored.name} ({stored.nbytes / 2**20:.0f} MiB, with "
                f"{held / 2**20:.0f} MiB of layers already on {device}): {fix}. The model is "
                f"unchanged and usable."
            ) from error
        flight.buffer = buffer
        flight.staging = staging
        flight.staged = 0
        flight.held = stored.nbytes + (staging.numel() if staging is not None else 0)
        self.held += flight.held
        # The writers on other streams start after this point of C (see the note)
        compute = self.streams.compute_stream()
        flight.allocated_on = compute
        self.streams.record(flight.freed, compute)

    def views(self, flight: InFlight, index: int) -> list[torch.Tensor]:
        views = flight.views
        assert views is not None
        return views

    def targets(self, flight: InFlight, stored: StoredUnit) -> list[torch.Tensor]:
        assert stored.transfer is not None
        return stored.transfer.targets(flight.buffer)

    def staging(self, flight: InFlight, nbytes: int) -> tuple[torch.Tensor, Any, Any]:
        """A place in the unit's own staging buffer: every chunk has its own, so no chunk
        waits for the previous one's decode."""
        staging = flight.staging
        assert staging is not None
        offset = flight.staged
        flight.staged = _align(offset + nbytes)
        return staging[offset : offset + nbytes], None, self.streams.new_event(timing=False)

    def bound(self, flight: InFlight) -> None:
        staging = flight.staging
        if staging is not None:  # C waits for the decodes from here on: staging is done
            flight.held -= staging.numel()
            self.held -= staging.numel()
            flight.staging = None

    def released(self, flight: InFlight) -> None:
        self.free.append(flight)
        allocated_on, compute = flight.allocated_on, self.streams.compute_stream()
        if allocated_on is not None and allocated_on != compute:
            # used on another stream than the one it came from (a forward under a different
            # torch.cuda.stream): the allocator may hand it out again on the first one
            done = self.streams.new_event(timing=False)
            self.streams.record(done, compute)
            self.streams.wait(allocated_on, done)
        self._empty(flight)

    def dropped(self, flight: InFlight) -> None:
        self.free.appendleft(flight)
        # Never used, so C never waited for its writers: it does before the memory goes.
        if flight.allocated_on is not None:
            self.streams.wait(flight.allocated_on, flight.ready)
        self._empty(flight)

    def abandoned(self, flight: InFlight) -> None:
        self.free.appendleft(flight)
        self._empty(flight)

    def _empty(self, flight: InFlight) -> None:
        flight.buffer = None
        flight.views = None
        flight.staging = None
        self.held -= flight.held
        flight.held = 0
        flight.index = None
        flight.allocated_on = None
