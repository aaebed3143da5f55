"""Packed slots: fixed slots of layer units, each holding as many consecutive units as fit.

[Note: packed slots]
A fixed slot is as large as the largest unit, and with one unit per slot the look-ahead is
``num_slots - 1`` units, whatever their size. Layer units differ in size and in compute:
Wan 14B's FFN (270 MiB) computes for tens of milliseconds at 81 frames, while its
cross-attention k and v (52 MB each, about 1 ms of PCIe Gen5 copy) project the 512 text
tokens and compute almost nothing, so with two slots the copy of the unit after them cannot
hide and the GPU waits (see [Note: grouped parts] in ``units``: 1.3-1.6% of an 81-frame
prompt on an H100). Packed, a slot takes units in schedule order at its next free byte
until the next one does not fit, then the next empty slot opens; a slot is empty again once
every unit in it has gone. So while the self-attention computes, the small units after it
all land, and the copies wait only for a unit as large as a slot (which needs an empty
one). The slots' VRAM is unchanged: the same pool, the same peak.

Ordering (see [Note: stream ordering] in ``scheduler``): a unit's record takes its slot's
``freed`` event, which every release in that slot first waits on and then records on the
compute stream, so the record chains every release before it, on whatever compute stream,
and a copy into the slot waits for every unit that was in it when it emptied. Writes are ordered by the one
copy stream of the device, which every unit's copy and transform run on: packing is only
for units without compressed transfers (whose decodes run on a stream of their own). A
model that takes the pool over (``slot_pool``) waits on the same per-slot events, and a
packed one first makes the copy stream wait on each slot's ``ready`` (the previous holder's
last writes, a compressed unit's decodes included). The other way round, a compressed
model's decodes into a slot wait for chunks its copies land on the copy stream, after the
packed copies queued there. Under ``transfer_compression="auto"`` the plan starts
compressed in fixed slots; once auto sends every unit raw (none left to seal either), the
next forward packs them, in a pool of the same key (``BlockSwap._pack_slots_once_raw``);
the copies queued for that forward are dropped and the schedule goes back to them.

What packing gives up: a unit's copy is not kept after release for reuse (with units more
than slots, the same unit comes round only after the others have overwritten it), and each
copy makes its views (a few microseconds).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

import torch

from . import slot_pool
from .errors import BlockSwapError
from .memory_provider import InFlight
from .storage import _align
from .stored_unit import StoredUnit
from .streams import DeviceStreams
from .swap_plan import SwapPlan

# False: one unit per fixed slot for layer units too (benchmarks' experiment arm patches it)
PACK_LAYER_SLOTS = True
# Records for units in flight; the slots' bytes bound how many are taken, and this caps them
RECORDS = 32


def packs(plan: SwapPlan, unit_count: int) -> bool:
    """Whether ``plan``'s fixed slots are packed ([Note: packed slots]): layer units, more
    of them than slots, two slots or more (``prefetch_blocks=0`` keeps its one slot, which
    loads each unit when it runs), and no compressed transfers."""
    return (
        PACK_LAYER_SLOTS
        and plan.kind == "slots"
        and plan.swap_unit == "layer"
        and plan.num_slots >= 2
        and unit_count > plan.num_slots
        and not plan.compressed
    )


class PackedSlots(slot_pool.PooledSlots):
    """``num_slots`` device buffers of ``slot_bytes`` each (a :class:`MemoryProvider`), units
    packed into them in order ([Note: packed slots]). ``staging_bytes``: a compressed plan's
    (auto dropped compression since), unused here but in the pool's key, so the models
    sharing the pool go on sharing it."""

    def _reset(self) -> None:
        self.inference = False  # the mode of the units' tensors, set when the slots are taken
        self.count_in = [0] * self.num_slots  # per slot: units placed there, not yet gone
        self.end_of = [0] * self.num_slots  # per slot: the next free byte
        self.filling = 0  # the slot the next unit goes into if it fits

    def allocate(self, user: Any, inference: bool) -> None:
        if self.flights:
            return
        pool = self._acquire(
            user,
            inference,
            f"swap more blocks (fewer resident) or lower prefetch_blocks (now "
            f"{self.num_slots - 1})",
        )
        # The previous holder's last writes into each slot, decodes included (one unit per
        # slot, compressed): later copies queue behind them on the one copy stream
        for ready in pool.ready:
            self.streams.wait(self.streams.copy_stream, ready)
        self._reset()
        self.inference = inference
        new_event = self.streams.new_event
        self.flights = [
            InFlight(number, None, new_event(), None, new_event()) for number in range(RECORDS)
        ]
        self.free = deque(self.flights)

    def invalidate(self) -> None:
        pass  # nothing of a unit outlives its copy

    def _place(self, nbytes: int) -> tuple[int, int] | None:
        """(slot, offset) for the next unit of ``nbytes``: after the units in the slot being
        filled, else at the start of an empty slot; None if neither has room."""
        filling = self.filling
        if self.end_of[filling] + nbytes <= self.slot_bytes:
            return filling, self.end_of[filling]
        for slot, count in enumerate(self.count_in):
            if not count and nbytes <= self.slot_bytes:
                return slot, 0
        return None

    def admits(self, stored: StoredUnit, ahead: Sequence[InFlight]) -> bool:
        return self._place(stored.nbytes) is not None

    def take(self, index: int) -> InFlight:
        stored = self.units[index]
        place = self._place(stored.nbytes) if self.free else None
        if place is None:
            raise BlockSwapError(
                f"the {self.num_slots} swap slots are full while loading {stored.name}: "
                f"swapped modules are nested deeper than the slots go; raise prefetch_blocks"
            )
        assert self.pool is not None
        slot, offset = place
        flight = self.free.popleft()
        flight.slot = slot
        with torch.inference_mode(self.inference):  # a view in its base's mode, as FixedSlots
            flight.buffer = self.pool.slots[slot][offset : offset + stored.nbytes]
        flight.freed = self.pool.freed[slot]  # see the note: the slot's releases
        self.count_in[slot] += 1
        self.end_of[slot] = _align(offset + stored.nbytes)
        self.filling = slot
        return flight

    def prepare(self, flight: InFlight, stored: StoredUnit) -> None:
        with torch.inference_mode(self.inference), torch.no_grad():
            flight.views = stored.layout.views(flight.buffer)

    def views(self, flight: InFlight, index: int) -> list[torch.Tensor]:
        views = flight.views
        assert views is not None
        return views

    def targets(self, flight: InFlight, stored: StoredUnit) -> list[torch.Tensor]:
        raise BlockSwapError(f"{stored.name} travels compressed, which packed slots never take")

    def staging(self, flight: InFlight, nbytes: int) -> tuple[torch.Tensor, Any, Any]:
        raise BlockSwapError("packed slots have no staging buffers")

    def bound(self, flight: InFlight) -> None:
        pass

    def released(self, flight: InFlight) -> None:
        self._empty(flight)
        self.free.append(flight)

    def dropped(self, flight: InFlight) -> None:
        self._empty(flight)
        self.free.appendleft(flight)

    def abandoned(self, flight: InFlight) -> None:
        self._empty(flight)
        self.free.appendleft(flight)

    def _empty(self, flight: InFlight) -> None:
        slot = flight.slot
        if slot is not None and self.flights:
            self.count_in[slot] -= 1
            if not self.count_in[slot]:
                self.end_of[slot] = 0  # empty: the next unit may start at its first byte
        flight.slot = None
        flight.buffer = None
        flight.views = None
        flight.index = None
