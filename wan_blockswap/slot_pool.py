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
from typing import Any, Protocol

import torch

from .compressed_transfer import STAGING_BUFFERS
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
