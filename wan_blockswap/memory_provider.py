"""The GPU memory a :class:`~.scheduler.PrefetchScheduler` fills: one :class:`InFlight`
record per buffer, and the :class:`MemoryProvider` protocol that hands them out. The
providers are :class:`~.fixed_slots.FixedSlots`, :class:`~.packed_slots.PackedSlots` and
:class:`~.window_allocator.WindowAllocator`."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from .stats import UnitTiming
from .stored_unit import StoredUnit


@dataclass(eq=False, slots=True)  # compared by identity: one record per buffer
class InFlight:
    """One record of GPU memory for a unit: the buffer, its events, and what it holds.

    A provider keeps a fixed set of these and hands them out in turn, so prefetching makes
    no records (a window still allocates each unit's buffer and its views). ``index`` is the unit (by position in the scheduler's units) whose
    weights the buffer holds, or None. Events: ``ready`` (the copy and transform are done),
    ``freed`` (the compute stream is done with the previous occupant), ``copied`` (a
    compressed unit's raw pieces landed)."""

    number: int  # position among the provider's records
    buffer: torch.Tensor | None
    ready: Any
    freed: Any
    copied: Any
    index: int | None = None
    timing: UnitTiming | None = None  # debug: this copy's events
    # per piece: the dtype a transform left it in (its bytes reinterpreted), or None for the
    # layout's; None: all the layout's ([Note: a transform may change a view's dtype])
    view_dtypes: list | None = None
    # WindowAllocator only: the unit's views, its own staging buffer and the next free byte
    # in it, the GPU bytes held, and the stream the memory was allocated on
    views: list[torch.Tensor] | None = None
    staging: torch.Tensor | None = None
    staged: int = 0
    held: int = 0
    allocated_on: Any = None
    slot: int | None = None  # PackedSlots only: the slot the buffer is part of


class MemoryProvider(Protocol):
    """Where units land on the GPU. ``flights`` are all the records (empty while no memory is
    held); ``free`` those not prefetched or in use, the one released longest ago first."""

    flights: list[InFlight]
    free: deque[InFlight]

    def allocate(self, user: Any, inference: bool) -> None:
        """Take what memory is fixed and make the records (once per holding)."""

    def forget(self) -> None:
        """Drop every record's contents and the records (memory given up or taken over)."""

    def let_go(self, user: Any) -> None:
        """``user`` is done with the memory for now (after :meth:`forget`)."""

    @property
    def holds_memory(self) -> bool:
        """Whether :meth:`let_go` has anything to give up."""

    def pool_key(self, inference: bool) -> tuple | None: ...

    @property
    def held_bytes(self) -> int: ...

    def admits(self, stored: StoredUnit, ahead: Sequence[InFlight]) -> bool:
        """Whether prefetching ``stored`` now, with the units ``ahead`` prefetched, fits."""

    def take(self, index: int) -> InFlight:
        """A free record for unit ``index`` (the one still holding it, if any), taken out of
        ``free``; raises the fix that fits this provider when none is free."""

    def prepare(self, flight: InFlight, stored: StoredUnit) -> None:
        """Make ``flight`` ready to receive ``stored`` (a window allocates here)."""

    def views(self, flight: InFlight, index: int) -> list[torch.Tensor]:
        """Unit ``index``'s pieces as views of ``flight``'s buffer."""

    def targets(self, flight: InFlight, stored: StoredUnit) -> list[torch.Tensor]:
        """Where each piece of compressed ``stored`` goes in ``flight``'s buffer."""

    def staging(self, flight: InFlight, nbytes: int) -> tuple[torch.Tensor, Any, Any]:
        """GPU memory for the next packed chunk of ``flight``'s unit: the buffer, the event
        its previous chunk's decode records (None: nothing to wait for) and the event its
        copy records."""

    def bound(self, flight: InFlight) -> None:
        """The compute stream now waits for ``flight``'s copy."""

    def released(self, flight: InFlight) -> None:
        """The compute stream is done with ``flight``: back to ``free``."""

    def dropped(self, flight: InFlight) -> None:
        """``flight`` was prefetched but not used: back to ``free`` (contents still valid)."""

    def abandoned(self, flight: InFlight) -> None:
        """A copy into ``flight`` failed (streams synchronised): back to ``free``, empty."""

    def invalidate(self) -> None:
        """Forget anything cached about the units' pieces (they may have changed)."""
