"""The GPU slot ring: prefetch, wait and release swap units in execution order.

[Note: stream ordering]
Two streams touch a slot: the copy stream X writes it, the compute stream C reads it.
  prefetch(u -> slot s): X waits on ``freed[s]`` (recorded on C when s's previous occupant was
      released), copies u's host buffer into s, records ``ready[s]`` on X.
  wait(u):    C waits on ``ready[s]``; u's tensors are rebound to views of s.
  release(u): C records ``freed[s]``; u's tensors go back to placeholders. No copy back:
      weights are read-only at inference.
Every wait is a GPU-side ``wait_event``; the host never synchronises on the hot path. Slots
are taken at the first forward (``allocate``) and kept across forwards; only
``release_memory`` (a host unloading the model, ``remove``) lets them go, after synchronising
every stream. So no memory crosses streams through the caching allocator while copies are in
flight (the hazard that crashes ComfyUI core's async offload under ``cudaMallocAsync``).
Waiting on a never-recorded event is a no-op, which covers fresh slots.
tests/test_stream_order.py checks this order on the CPU with a recording stand-in for the
streams, and that dropping either wait is caught.

[Note: schedule]
The ring prefetches in ``schedule`` order, cyclically: when the last units of one forward are
released, the first ones of the next forward start copying (sampling repeats the forward).
The schedule starts as the declared order and is replaced by the order actually observed in
a forward whenever that forward had to load something that was not prefetched (the first
forward always does this for interleaved VACE). A unit that is wanted but not prefetched is
loaded on demand, so a wrong schedule costs time, never correctness. A slot keeps its
contents after release; a unit still cached in a free slot is reused without a copy.

[Note: compressed copies]
A unit with a :class:`CompressedTransfer` arrives in pieces. Raw pieces are copied into the
slot on X as above. A packed chunk goes to one of the pool's few staging buffers on X, then a
third stream D decodes it into the slot:
  X waits ``consumed[k]`` (D finished decoding staging buffer k's last chunk), copies the
      chunk into k, records ``landed[k]``;
  D waits ``freed[s]`` once per unit and ``landed[k]`` per chunk, decodes k into s, records
      ``consumed[k]``; after the last piece D waits ``copied[s]`` (X's raw pieces), runs the
      transform and records ``ready[s]``.
So the copy engine streams chunk after chunk while D decodes the previous ones, and C still
waits on nothing but ``ready[s]``. Writes into a slot now come from two streams, so before
writing s, X and D also wait for ``ready[s]`` of its previous occupant: ``freed[s]`` alone
does not cover an occupant that was prefetched but never used (dropped, evicted by a model
sharing the pool), whose decodes or transform may still be running on the other stream.
Decode temporaries come from the caching allocator on D and are reused on D only.
"""

from __future__ import annotations

import weakref
from collections import deque
from typing import Sequence

import torch

from . import bf16_codec, slot_pool
from .errors import BlockSwapError, InsufficientMemoryError
from .stats import SwapStats, UnitTiming
from .stored_unit import StoredUnit
from .streams import DeviceStreams


class SlotRing:
    """Fixed ring of ``num_slots`` device buffers of ``slot_bytes`` each, shared by ``units``."""

    def __init__(
        self,
        streams: DeviceStreams,
        units: Sequence[StoredUnit],
        num_slots: int,
        slot_bytes: int,
        non_blocking: bool,
        stats: SwapStats,
        debug: bool = False,
        staging_bytes: int = 0,
    ) -> None:
        self.streams = streams
        self.staging_bytes = staging_bytes
        self.units = list(units)
        self.non_blocking = non_blocking
        self.stats = stats
        self.debug = debug
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        # Slots and their events come from a pool shared with other models of the same slot
        # shape (see [Note: shared slots]), acquired on first use: loading needs no slots.
        self.pool: slot_pool.SlotPool | None = None
        self.slots: list[torch.Tensor] = []
        self.views: list[list[list[torch.Tensor]]] = []
        # (id of a compressed unit, slot) -> its pieces' destinations in that slot
        self.piece_targets: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.ready: list = []
        self.freed: list = []
        self.copied: list = []  # raw pieces of a compressed unit landed, per slot
        self.occupant: list[int | None] = [None] * num_slots
        self.free_slots: deque[int] = deque(range(num_slots))  # oldest release first
        self.ahead: deque[int] = deque()  # prefetched slots in expected order of use
        self.in_use: dict[int, int] = {}  # unit -> slot
        self.pending: set[int] = set()  # units prefetched or in use
        self.timings: dict[int, UnitTiming] = {}
        self.set_schedule(list(range(len(self.units))))
        self.observed: list[int] = []
        self.misses_this_forward = 0
        self.transform = None  # see BlockSwap.set_transform
        # When a list: (start, end, bytes) of each unit's copies on the copy stream (the
        # link's real rate, for transfer_compression="auto")
        self.copy_clock: list | None = None
        self.inference = False  # see [Note: inference tensors]
        # A ring collected without close() (its model dropped unremoved) frees its pool then;
        # not at interpreter exit, when CUDA may be gone and the pools die with the process.
        weakref.finalize(self, slot_pool.prune).atexit = False

    # -- schedule -------------------------------------------------------------------------

    def set_schedule(self, order: list[int]) -> None:
        self.schedule = order
        self.positions: dict[int, list[int]] = {}
        for position, unit in enumerate(order):
            self.positions.setdefault(unit, []).append(position)
        self.cursor = 0  # schedule position of the next unit to prefetch

    def pool_key(self) -> tuple | None:
        """The key of the slot pool this ring uses (rings with equal keys share their slots);
        None without slots."""
        if not self.num_slots:
            return None
        return slot_pool.pool_key(
            self.streams.device,
            self.num_slots,
            self.slot_bytes,
            self._units_are_inference(),
            self.staging_bytes,
        )

    def _units_are_inference(self) -> bool:
        # [Note: inference tensors] A Parameter created under inference mode (ComfyUI builds
        # models inside torch.inference_mode()) breaks once its .data points at a normal
        # tensor ("Inference tensors do not track version counter"), while a normal Parameter
        # accepts either kind. So slots and their views are made in the parameters' mode, and
        # writes into inference slots happen in inference mode.
        first = next((u.tensors[0] for u in self.units if u.tensors), None)
        return bool(first is not None and first.is_inference())

    def allocate(self) -> None:
        """Acquire the slots and make every unit's views into them (once per holding)."""
        if self.slots or not self.num_slots:
            return
        self.inference = self._units_are_inference()
        try:
            self.pool = slot_pool.acquire(
                self,
                self.streams,
                self.num_slots,
                self.slot_bytes,
                self.inference,
                self.staging_bytes,
            )
        except torch.cuda.OutOfMemoryError as error:
            free = torch.cuda.mem_get_info(self.streams.device)[0] if self.streams.is_cuda else 0
            raise InsufficientMemoryError(
                f"no room for {self.num_slots} swap slots of {self.slot_bytes / 2**20:.0f} MiB "
                f"({self.num_slots * self.slot_bytes / 2**30:.2f} GiB; {free / 2**30:.2f} GiB "
                f"free on {self.streams.device}): swap more blocks (fewer resident), lower "
                f"prefetch_blocks (now {self.num_slots - 1}), or use swap_unit='layer'. The "
                f"model is unchanged and usable once memory is freed."
            ) from error
        self.slots, self.ready, self.freed = self.pool.slots, self.pool.ready, self.pool.freed
        self.copied = self.pool.copied
        with torch.inference_mode(self.inference), torch.no_grad():
            # Views are made once per holding, so rebinding costs only ``.data``.
            self.views = [[u.layout.views(slot) for slot in self.slots] for u in self.units]

    def evict(self) -> None:
        """Another ring took the shared slots over: forget what they held."""
        if self.in_use:
            raise BlockSwapError(
                "two swapped models ran interleaved inside one forward on shared slots; "
                "give them different prefetch_blocks to keep their slots apart"
            )
        self.ahead.clear()
        self.pending.clear()
        self.timings.clear()
        self.occupant = [None] * self.num_slots
        self.free_slots = deque(range(self.num_slots))
        self.slots, self.views, self.ready, self.freed, self.copied = [], [], [], [], []
        self.piece_targets.clear()

    def release_memory(self) -> None:
        """Let go of the slots (freed if no other model uses them); reacquired on next use."""
        if self.pool is None:
            return
        self.end_forward(completed=False)
        self.streams.synchronize()
        pool, self.pool = self.pool, None
        self.evict()
        slot_pool.let_go(self, pool)

    def begin_forward(self) -> None:
        self.allocate()
        self.observed = []
        self.misses_this_forward = 0
        self._pump()

    def end_forward(self, completed: bool) -> None:
        """Release what an interrupted forward left in use; adopt the observed order if the
        schedule mispredicted."""
        for unit in list(self.in_use):
            self.release(unit)
        if completed and self.observed and self.misses_this_forward:
            self.stats.relearned += 1
            while self.ahead:
                self._drop(self.ahead.pop())
            self.set_schedule(self.observed)
            self._pump()
        self.observed = []

    # -- the protocol ---------------------------------------------------------------------

    def wait(self, unit: int) -> None:
        """Make ``unit``'s weights usable by work queued next on the compute stream."""
        slot = self._take(unit)
        compute = self.streams.compute_stream()
        timing = self.timings.get(slot) if self.debug else None
        if timing is not None:
            timing.reached = self._mark(compute)
        self.streams.wait(compute, self.ready[slot])
        if timing is not None:
            timing.began = self._mark(compute)
        self.in_use[unit] = slot
        self.units[unit].bind(self._views(unit, slot))
        self.observed.append(unit)
        self._on_bound(slot)
        self._pump()

    def release(self, unit: int) -> None:
        """Mark ``unit``'s slot reusable once the compute stream has finished with it."""
        slot = self.in_use.pop(unit, None)
        if slot is None:
            return
        compute = self.streams.compute_stream()
        self.streams.record(self.freed[slot], compute)
        timing = self.timings.pop(slot, None) if self.debug else None
        if timing is not None:
            timing.released = self._mark(compute)
            self.stats.pending.append(timing)
        self.units[unit].unbind()
        self.pending.discard(unit)
        self.free_slots.append(slot)
        self._on_released(slot)
        self._pump()

    # -- internals ------------------------------------------------------------------------

    def invalidate(self) -> None:
        """Forget what free and prefetched slots hold, so every unit is copied again."""
        self.piece_targets.clear()  # a unit's pieces may have changed (re-sealed)
        while self.ahead:
            self._drop(self.ahead.pop())
        for slot in range(self.num_slots):
            if slot not in self.in_use.values():
                self.occupant[slot] = None

    def _take(self, unit: int) -> int:
        """The slot holding ``unit``: the next prefetched one, or loaded now on a miss."""
        if self.ahead and self.occupant[self.ahead[0]] == unit:
            return self.ahead.popleft()
        self.stats.misses += 1
        self.misses_this_forward += 1
        skipped = next((i for i, s in enumerate(self.ahead) if self.occupant[s] == unit), None)
        if skipped is not None:  # units in between were skipped; their copies stay cached
            for _ in range(skipped):
                self._drop(self.ahead.popleft())
            return self.ahead.popleft()
        consumed = (self.cursor - len(self.ahead)) % max(1, len(self.schedule))
        while self.ahead:
            self._drop(self.ahead.pop())
        position = self._position_of(unit, consumed)
        self.cursor = consumed if position is None else (position + 1) % len(self.schedule)
        return self._load(unit)

    def _position_of(self, unit: int, start: int) -> int | None:
        positions = self.positions.get(unit)
        if not positions:
            return None
        return next((p for p in positions if p >= start), positions[0])

    def _pump(self) -> None:
        """Fill free slots with the next units of the schedule."""
        length = len(self.schedule)
        while self.free_slots and length:
            unit = self.schedule[self.cursor]
            if unit in self.pending:  # the ring wrapped: everything ahead is already here
                break
            if not self._admits(unit):
                break
            self.ahead.append(self._load(unit))
            self.cursor = (self.cursor + 1) % length

    def _load(self, unit: int) -> int:
        """Pick a free slot for ``unit`` and start its copy (none if still cached there)."""
        self.allocate()
        slot = self._free_slot_for(unit)
        self.pending.add(unit)
        if self.occupant[slot] == unit:
            self.stats.cache_hits += 1
            return slot
        stored = self.units[unit]
        try:
            if stored.compress and stored.transfer is None:  # filled after apply (a loader)
                stored.seal(self.streams.device)
            self.occupant[slot] = unit
            self._start_copy(unit, slot)
        except BaseException:
            self._abandon(unit, slot)
            raise
        self.stats.copies += 1
        self.stats.bytes_copied += stored.copy_nbytes
        self.stats.raw_bytes_copied += stored.nbytes
        return slot

    def _start_copy(self, unit: int, slot: int) -> None:
        """Queue ``unit``'s copy (and transform) into ``slot`` and record its ready event."""
        stored = self.units[unit]
        self._prepare(unit, slot)
        timing = UnitTiming(stored.name) if self.debug else None
        copy_stream = self.streams.copy_stream
        with self.streams.on_copy_stream(), torch.inference_mode(self.inference):
            self.streams.wait(copy_stream, self.freed[slot])
            # The previous occupant's last writes may be on the decode stream (a compressed
            # unit's decodes, or its transform), and a unit prefetched but never used leaves
            # no newer ``freed``: wait for them too (see [Note: compressed copies]).
            self.streams.wait(copy_stream, self.ready[slot])
            if timing is not None:
                timing.copy_start = self._mark(copy_stream)
            clock = self._mark(copy_stream) if self.copy_clock is not None else None
            if stored.transfer is None:
                self.slots[slot][: stored.nbytes].copy_(
                    stored.host.tensor[: stored.nbytes], non_blocking=self.non_blocking
                )
                last = copy_stream
            else:
                last = self._copy_compressed(stored, slot)
            if clock is not None:
                self.copy_clock.append((clock, self._mark(copy_stream), stored.copy_nbytes))
        with self.streams.on(last), torch.inference_mode(self.inference):
            if self.transform is not None:  # after the copy, before the ready event
                self.transform(stored.name, self._views(unit, slot))
            self.streams.record(self.ready[slot], last)
            if timing is not None:
                timing.copy_end = self._mark(last)
                self.timings[slot] = timing

    def _abandon(self, unit: int, slot: int) -> None:
        """A copy into ``slot`` failed half-way (out of memory, a failing transform): wait for
        what was queued, then hand the slot back empty."""
        self.streams.synchronize()
        self.occupant[slot] = None
        self.pending.discard(unit)
        self.timings.pop(slot, None)
        self.free_slots.appendleft(slot)

    def _copy_compressed(self, stored: StoredUnit, slot: int) -> object:
        """Queue ``stored``'s pieces into ``slot`` (see [Note: compressed copies]); returns
        the stream on which the slot is complete."""
        transfer = stored.transfer
        assert transfer is not None
        streams = self.streams
        copy_stream, decode_stream = streams.copy_stream, streams.decode_stream
        targets = self._targets(stored, slot)
        streams.wait(decode_stream, self.freed[slot])
        streams.wait(decode_stream, self.ready[slot])  # the previous occupant's last writes
        for piece, source, destination in zip(transfer.pieces, transfer.sources, targets):
            if not piece.packed:
                destination.copy_(source, non_blocking=self.non_blocking)  # on X
                continue
            staged, consumed, landed = self._staging(slot, piece.host_nbytes)
            if consumed is not None:
                streams.wait(copy_stream, consumed)
            staged.copy_(source, non_blocking=self.non_blocking)
            streams.record(landed, copy_stream)
            with streams.on(decode_stream):
                streams.wait(decode_stream, landed)
                bf16_codec.decode_chunk(
                    staged, piece.slot_nbytes // 2, piece.window, piece.exceptions, destination
                )
                if consumed is not None:
                    streams.record(consumed, decode_stream)
        streams.record(self.copied[slot], copy_stream)
        streams.wait(decode_stream, self.copied[slot])
        return decode_stream

    # -- what a ring with other memory (window_ring) changes ------------------------------

    def _views(self, unit: int, slot: int) -> list[torch.Tensor]:
        """``unit``'s tensors as views of ``slot``."""
        return self.views[unit][slot]

    def _prepare(self, unit: int, slot: int) -> None:
        """Make ``slot`` ready to receive ``unit`` (fixed slots always are)."""

    def _targets(self, stored: StoredUnit, slot: int) -> list[torch.Tensor]:
        """Where each piece of a compressed unit goes inside ``slot`` (cached: slots stay)."""
        assert stored.transfer is not None
        targets = self.piece_targets.get((id(stored), slot))
        if targets is None:
            targets = self.piece_targets[(id(stored), slot)] = stored.transfer.targets(
                self.slots[slot]
            )
        return targets

    def _staging(self, slot: int, nbytes: int) -> tuple[torch.Tensor, object, object]:
        """GPU memory for the next packed chunk of the unit loading into ``slot``: the buffer,
        the event its previous chunk's decode records (None: nothing to wait for) and the
        event its copy records. Here: the pool's staging buffers, in turn."""
        assert self.pool is not None
        pool = self.pool
        k = pool.next_staging
        pool.next_staging = (k + 1) % len(pool.staging)
        return pool.staging[k][:nbytes], pool.consumed[k], pool.landed[k]

    def _admits(self, unit: int) -> bool:
        """Whether prefetching ``unit`` now fits (fixed slots: a free slot is enough)."""
        return True

    def _on_bound(self, slot: int) -> None:
        """The compute stream now waits for ``slot``'s copy."""

    def _on_released(self, slot: int) -> None:
        """The compute stream is done with ``slot``."""

    def _free_slot_for(self, unit: int) -> int:
        if not self.free_slots:
            raise BlockSwapError(
                f"all {self.num_slots} swap slots are in use while loading {self.units[unit].name}: "
                f"swapped modules are nested deeper than the ring; raise prefetch_blocks"
            )
        for slot in self.free_slots:
            if self.occupant[slot] == unit:
                break
        else:
            slot = next((s for s in self.free_slots if self.occupant[s] is None), None)
            if slot is None:
                slot = self.free_slots[0]
        self.free_slots.remove(slot)
        return slot

    def _drop(self, slot: int) -> None:
        """Return a prefetched-but-unused slot; its contents stay valid for its occupant."""
        self.pending.discard(self.occupant[slot])
        self.timings.pop(slot, None)
        self.free_slots.appendleft(slot)

    def _mark(self, stream: object) -> object:
        event = self.streams.new_event(timing=True)
        self.streams.record(event, stream)
        return event

    def close(self) -> None:
        """Wait for in-flight copies and let go of the slots."""
        self.release_memory()
        self.in_use.clear()
        self.stats.pending.clear()
