"""Fixed slots: a few GPU buffers, each as large as the largest unit, that units take turns in.

The slots come from a pool shared by every model of the same slot shape on the device (see
[Note: shared slots] in ``slot_pool.py``), taken at the first forward and kept across
forwards. A slot keeps its contents after release, so a unit still in a free slot is reused
without a copy (see [Note: schedule] in ``scheduler.py``).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

import torch

from . import slot_pool
from .errors import BlockSwapError
from .memory_provider import InFlight
from .stored_unit import StoredUnit
from .streams import DeviceStreams


class FixedSlots(slot_pool.PooledSlots):
    """``num_slots`` device buffers of ``slot_bytes`` each (a :class:`MemoryProvider`), and
    ``staging_bytes`` of staging buffers for compressed transfers."""

    def _reset(self) -> None:
        # views[unit index][slot number]: made once per holding, so binding costs only .data
        self.views_of: list[list[list[torch.Tensor]]] = []
        # (id of a compressed unit, slot number) -> its pieces' destinations in that slot
        self.piece_targets: dict[tuple[int, int], list[torch.Tensor]] = {}

    def allocate(self, user: Any, inference: bool) -> None:
        if self.flights or not self.num_slots:
            return
        pool = self._acquire(
            user,
            inference,
            f"swap more blocks (fewer resident), lower prefetch_blocks (now "
            f"{self.num_slots - 1}), or use swap_unit='layer'",
        )
        # The events travel with the slots: the previous holder's last ``freed`` still orders
        # the next copy into each slot.
        self.flights = [
            InFlight(number, buffer, ready, freed, copied)
            for number, (buffer, ready, freed, copied) in enumerate(
                zip(pool.slots, pool.ready, pool.freed, pool.copied)
            )
        ]
        self.free = deque(self.flights)
        with torch.inference_mode(inference), torch.no_grad():
            self.views_of = [[u.layout.views(slot) for slot in pool.slots] for u in self.units]

    def invalidate(self) -> None:
        self.piece_targets.clear()

    def admits(self, stored: StoredUnit, ahead: Sequence[InFlight]) -> bool:
        return True  # a free slot is enough

    def take(self, index: int) -> InFlight:
        free = self.free
        if not free:
            raise BlockSwapError(
                f"all {self.num_slots} swap slots are in use while loading "
                f"{self.units[index].name}: swapped modules are nested deeper than the slots "
                f"go; raise prefetch_blocks"
            )
        for flight in free:  # the slot still holding it, else an empty one, else the oldest
            if flight.index == index:
                break
        else:
            flight = next((f for f in free if f.index is None), None)
            if flight is None:
                flight = free[0]
        free.remove(flight)
        return flight

    def prepare(self, flight: InFlight, stored: StoredUnit) -> None:
        pass  # slots always are

    def views(self, flight: InFlight, index: int) -> list[torch.Tensor]:
        return self.views_of[index][flight.number]

    def targets(self, flight: InFlight, stored: StoredUnit) -> list[torch.Tensor]:
        assert stored.transfer is not None
        key = (id(stored), flight.number)
        targets = self.piece_targets.get(key)
        if targets is None:
            targets = self.piece_targets[key] = stored.transfer.targets(flight.buffer)
        return targets

    def staging(self, flight: InFlight, nbytes: int) -> tuple[torch.Tensor, Any, Any]:
        """The pool's staging buffers, in turn."""
        assert self.pool is not None
        pool = self.pool
        k = pool.next_staging
        pool.next_staging = (k + 1) % len(pool.staging)
        return pool.staging[k][:nbytes], pool.consumed[k], pool.landed[k]

    def bound(self, flight: InFlight) -> None:
        pass

    def released(self, flight: InFlight) -> None:
        self.free.append(flight)

    def dropped(self, flight: InFlight) -> None:
        self.free.appendleft(flight)

    def abandoned(self, flight: InFlight) -> None:
        self.free.appendleft(flight)
