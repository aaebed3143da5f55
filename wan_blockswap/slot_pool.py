"""GPU slots shared by every swapped model of the same slot shape on one device.

[Note: shared slots]
Wan 2.2 A14B samples with two models one after the other (high noise, then low noise), with
identical block shapes. Only one of them runs at a time, so they can share one set of slots:
the second model does not double the slots' VRAM. A pool holds the slot buffers and their
events; the model that runs takes the pool over ("acquire"), and the previous holder forgets
what the slots held ("evict") and reacquires when it runs again. Ordering stays correct
because the events travel with the slots: a copy into a slot still waits for the ``freed``
event the previous holder recorded, and all copies on a device share one copy stream.
The pool is freed when its last user closes or lets go of its VRAM. A user is a
:class:`~.scheduler.PrefetchScheduler` whose memory is :class:`~.fixed_slots.FixedSlots` or
:class:`~.packed_slots.PackedSlots` (see [Note: packed slots] for how they share a pool).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from typing import Any, Protocol, Sequence

import torch

from .compressed_transfer import STAGING_BUFFERS
from .errors import InsufficientMemoryError
from .memory_provider import InFlight
from .stored_unit import StoredUnit
from .streams import DeviceStreams


class PoolUser(Protocol):
    def evict(self) -> None: ...


class SlotPool:
    """``num_slots`` device buffers of ``slot_bytes`` with a ready and a freed event each, and
    the staging buffers of compressed transfers (``staging_bytes`` in all) with theirs."""

    def __init__(
        self,
        streams: DeviceStreams,
        num_slots: int,
        slot_bytes: int,
        inference: bool,
        staging_bytes: int = 0,
    ):
        count = STAGING_BUFFERS if staging_bytes else 0
        with torch.inference_mode(inference), torch.no_grad():
            self.slots = [
                torch.empty(slot_bytes, dtype=torch.uint8, device=streams.device)
                for _ in range(num_slots)
            ]
            self.staging = [
                torch.empty(staging_bytes // count, dtype=torch.uint8, device=streams.device)
                for _ in range(count)
            ]
        self.ready = [streams.new_event() for _ in range(num_slots)]
        self.freed = [streams.new_event() for _ in range(num_slots)]
        self.copied = [streams.new_event() for _ in range(num_slots)]  # raw pieces landed
        self.landed = [streams.new_event() for _ in range(count)]  # a chunk is in staging
        self.consumed = [streams.new_event() for _ in range(count)]  # ... and decoded
        self.next_staging = 0
        self.users: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self.holder: "weakref.ref[Any] | None" = None


_pools: dict[tuple, SlotPool] = {}


def pool_key(
    device: torch.device, num_slots: int, slot_bytes: int, inference: bool, staging_bytes: int = 0
) -> tuple:
    """Users with equal keys share one pool (one set of slots in VRAM)."""
    return (str(device), num_slots, slot_bytes, inference, staging_bytes)


_lock = threading.RLock()  # re-entrant: prune() runs from finalizers, which a collection
# triggered inside acquire() may call on the same thread


def acquire(
    user: PoolUser,
    streams: DeviceStreams,
    num_slots: int,
    slot_bytes: int,
    inference: bool,
    staging_bytes: int = 0,
) -> SlotPool:
    """The pool for this shape, held by ``user`` from now on (the previous holder is evicted)."""
    key = pool_key(streams.device, num_slots, slot_bytes, inference, staging_bytes)
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = SlotPool(streams, num_slots, slot_bytes, inference, staging_bytes)
        pool.users.add(user)
        previous = pool.holder() if pool.holder is not None else None
        pool.holder = weakref.ref(user)
    if previous is not None and previous is not user:
        previous.evict()
    return pool


def let_go(user: PoolUser, pool: SlotPool) -> None:
    """``user`` no longer needs ``pool``; the last user's departure frees the VRAM."""
    with _lock:
        pool.users.discard(user)
        if pool.holder is not None and pool.holder() is user:
            pool.holder = None
        if not len(pool.users):
            for key, value in list(_pools.items()):
                if value is pool:
                    del _pools[key]


def prune() -> None:
    """Free the pools whose users were all garbage-collected without letting go (a model
    dropped without ``remove()``). A copy into a slot may still be running: wait for the
    device first, or the allocator could hand that memory out while the copy writes it."""
    with _lock:
        dead = [key for key, pool in _pools.items() if not len(pool.users)]
        for key in dead:
            if key[0].startswith("cuda"):
                torch.cuda.synchronize(key[0])
            del _pools[key]


def _nbytes(pool: SlotPool) -> int:
    return sum(s.numel() for s in (*pool.slots, *pool.staging))


def pooled_bytes() -> int:
    """VRAM held by all pools (for leak checks)."""
    with _lock:
        return sum(_nbytes(pool) for pool in _pools.values())


def bytes_of(key: tuple) -> int:
    """VRAM held by the pool of ``key``, slots and staging, whichever user holds it; 0 while
    there is none."""
    with _lock:
        pool = _pools.get(key)
        return 0 if pool is None else _nbytes(pool)


class PooledSlots:
    """What the providers of fixed slots share (:class:`~.fixed_slots.FixedSlots`,
    :class:`~.packed_slots.PackedSlots`): ``num_slots`` device buffers of ``slot_bytes``
    each, and ``staging_bytes`` of staging buffers, from the pool of their key."""

    def __init__(
        self,
        streams: DeviceStreams,
        units: Sequence[StoredUnit],
        num_slots: int,
        slot_bytes: int,
        staging_bytes: int = 0,
    ) -> None:
        self.streams = streams
        self.units = list(units)
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.staging_bytes = staging_bytes
        self.pool: SlotPool | None = None
        self.flights: list[InFlight] = []
        self.free: deque[InFlight] = deque()
        self._reset()

    def _reset(self) -> None:
        """Forget what the slots hold (no slots held, or just taken)."""

    def pool_key(self, inference: bool) -> tuple | None:
        if not self.num_slots:
            return None
        return pool_key(
            self.streams.device, self.num_slots, self.slot_bytes, inference, self.staging_bytes
        )

    @property
    def holds_memory(self) -> bool:
        return self.pool is not None

    @property
    def held_bytes(self) -> int:
        """The slots' bytes while this model holds them (staging not counted)."""
        if self.pool is None or not self.flights:
            return 0
        return sum(slot.numel() for slot in self.pool.slots)

    def forget(self) -> None:
        self.flights = []
        self.free = deque()
        self._reset()

    def _acquire(self, user: Any, inference: bool, fixes: str) -> SlotPool:
        """The pool, held by ``user`` from now on; no room for it is reported as an
        :class:`InsufficientMemoryError` with the numbers and ``fixes``."""
        streams = self.streams
        try:
            self.pool = acquire(
                user, streams, self.num_slots, self.slot_bytes, inference, self.staging_bytes
            )
        except torch.cuda.OutOfMemoryError as error:
            free = torch.cuda.mem_get_info(streams.device)[0] if streams.is_cuda else 0
            raise InsufficientMemoryError(
                f"no room for {self.num_slots} swap slots of {self.slot_bytes / 2**20:.0f} MiB "
                f"({self.num_slots * self.slot_bytes / 2**30:.2f} GiB; {free / 2**30:.2f} GiB "
                f"free on {streams.device}): {fixes}. The model is unchanged and usable once "
                f"memory is freed."
            ) from error
        return self.pool

    def let_go(self, user: Any) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            let_go(user, pool)
