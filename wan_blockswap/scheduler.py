"""Prefetching swap units in execution order: the scheduler, and the GPU memory it fills.

A :class:`PrefetchScheduler` decides which unit to copy next and when the compute stream may
use it; a :class:`MemoryProvider` decides where on the GPU a unit lands: one of a few fixed
slots (:class:`~.fixed_slots.FixedSlots`), a place in one of them beside other units
(:class:`~.packed_slots.PackedSlots`), or memory of the unit's own size within a window
(:class:`~.window_allocator.WindowAllocator`). Each unit on its way to the GPU, or on it, is
one :class:`InFlight`: its buffer and the events that order the streams around it. The
lifecycle reads as a protocol: ``prefetch`` (start the copy), ``wait`` (the compute stream
waits for it and the unit's tensors point at the buffer), ``release`` (the compute stream is
done; the memory may be reused), ``evict`` (forget what the memory held).

[Note: stream ordering]
Two streams touch a buffer: the copy stream X writes it, the compute stream C reads it.
  prefetch(u -> buffer b): X waits on ``freed`` of b (recorded on C when b's previous occupant
      was released), copies u's host buffer into b, records b's ``ready`` on X.
  wait(u):    C waits on ``ready``; u's tensors are rebound to views of b.
  release(u): C records ``freed``; u's tensors go back to placeholders. No copy back:
      weights are read-only at inference.
Every wait is a GPU-side ``wait_event``; the host never synchronises on the hot path. Fixed
slots are taken at the first forward and kept across forwards; only ``release_memory`` (a
host unloading the model, ``remove``) lets them go, after synchronising every stream. So no
memory crosses streams through the caching allocator while copies are in flight (the hazard
that crashes ComfyUI core's async offload under ``cudaMallocAsync``); a window allocates per
unit with its own fences (see [Note: streamed plans] in ``window_allocator.py``); packed
slots share a slot's ``freed`` among its units (see [Note: packed slots]).
Waiting on a never-recorded event is a no-op, which covers fresh buffers.
tests/test_stream_order.py checks this order on the CPU with a recording stand-in for the
streams, and that dropping either wait is caught, for every provider.

[Note: schedule]
The scheduler prefetches in ``schedule`` order, cyclically: when the last units of one
forward are released, the first ones of the next forward start copying (sampling repeats the
forward). The schedule starts as the declared order and is replaced by the order actually
observed in a forward whenever that forward had to load something that was not prefetched
(the first forward always does this for interleaved VACE). A unit that is wanted but not
prefetched is loaded on demand, so a wrong schedule costs time, never correctness. A fixed
slot keeps its contents after release; a unit still cached in a free slot is reused without
a copy.

[Note: compressed copies]
A unit with a :class:`CompressedTransfer` arrives in pieces. Raw pieces are copied into the
buffer on X as above. A packed chunk goes to a staging buffer on X (fixed slots: one of the
pool's few; a window: one of the unit's own), then a third stream D decodes it into place:
  X waits ``consumed[k]`` (D finished decoding staging buffer k's last chunk), copies the
      chunk into k, records ``landed[k]``;
  D waits ``freed`` once per unit and ``landed[k]`` per chunk, decodes k into the buffer,
      records ``consumed[k]``; after the last piece D waits ``copied`` (X's raw pieces), runs
      the transform and records ``ready``.
So the copy engine streams chunk after chunk while D decodes the previous ones, and C still
waits on nothing but ``ready``. Writes into a buffer now come from two streams, so before
writing it, X and D also wait for ``ready`` of its previous occupant: ``freed`` alone does
not cover an occupant that was prefetched but never used (dropped, evicted by a model
sharing the pool), whose decodes or transform may still be running on the other stream.
Decode temporaries come from the caching allocator on D and are reused on D only.
"""

from __future__ import annotations

import weakref
from collections import deque
from typing import Any, Sequence

import torch

from . import bf16_codec, slot_pool
from .errors import BlockSwapError
from .memory_provider import InFlight, MemoryProvider
from .stats import SwapStats, UnitTiming
from .stored_unit import StoredUnit
from .streams import DeviceStreams


class PrefetchScheduler:
    """Copies ``units`` into ``provider``'s memory ahead of use, in the learned order."""

    def __init__(
        self,
        streams: DeviceStreams,
        units: Sequence[StoredUnit],
        provider: MemoryProvider,
        non_blocking: bool,
        stats: SwapStats,
        debug: bool = False,
    ) -> None:
        self.streams = streams
        self.units = list(units)
        self.provider = provider
        self.non_blocking = non_blocking
        self.stats = stats
        self.debug = debug
        self.ahead: deque[InFlight] = deque()  # prefetched, in expected order of use
        self.in_use: dict[int, InFlight] = {}  # unit index -> its record
        # units in use for a layer of a part called on its own, kept until another unit is
        # waited for (hooks.inner_layer_hooks: consecutive calls reuse one copy)
        self.lingering: set[int] = set()
        self.pending: set[int] = set()  # units prefetched or in use
        self.set_schedule(list(range(len(self.units))))
        self.observed: list[int] = []
        self.misses_this_forward = 0
        self.transform = None  # see BlockSwap.set_transform
        self.transformed: frozenset[str] | None = None  # the units it runs on; None: all
        # When a list: (start, end, bytes) of each unit's copies on the copy stream (the
        # link's real rate, for transfer_compression="auto")
        self.copy_clock: list | None = None
        self.inference = False  # see [Note: inference tensors]
        # [Note: holding copies at a forward's edge] From the prefetch of the next forward's
        # first unit until that forward waits on it, no further unit is queued. A model's
        # preamble (MiniMax H3's) copies small pageable tensors to the GPU and waits for them;
        # the copy engine runs host-to-device copies in the order queued, so such a copy
        # waited behind the second unit's whole copy (23 ms of 1.3 GB on the H100, with the
        # GPU idle) on every forward: 1.048x all-on-GPU. Chunking that copy did not help: its
        # pieces were all queued first. Holding them: 1.003x, every other family and plan
        # unchanged and bit-identical (benchmarks/results/architectures_h100.json, run4;
        # engine_refactor_h100.json, hold). On by default; a False here restores the old order.
        self.hold_at_forward_edge = True
        self._before_first_wait = True  # no unit of the coming forward waited on yet
        # A scheduler collected without close() (its model dropped unremoved) frees its slot
        # pool then; not at interpreter exit, when CUDA may be gone and pools die anyway.
        weakref.finalize(self, slot_pool.prune).atexit = False

    # -- schedule -------------------------------------------------------------------------

    def set_schedule(self, order: list[int]) -> None:
        self.schedule = order
        self.positions: dict[int, list[int]] = {}
        for position, index in enumerate(order):
            self.positions.setdefault(index, []).append(position)
        self.cursor = 0  # schedule position of the next unit to prefetch

    def pool_key(self) -> tuple | None:
        """The key of the slot pool the provider uses (equal keys share their slots); None
        where nothing fixed is shared."""
        return self.provider.pool_key(self._units_are_inference())

    def _units_are_inference(self) -> bool:
        # [Note: inference tensors] A Parameter created under inference mode (ComfyUI builds
        # models inside torch.inference_mode()) breaks once its .data points at a normal
        # tensor ("Inference tensors do not track version counter"), while a normal Parameter
        # accepts either kind. So GPU buffers and their views are made in the parameters'
        # mode, and writes into inference buffers happen in inference mode.
        first = next((u.tensors[0] for u in self.units if u.tensors), None)
        return bool(first is not None and first.is_inference())

    def allocate(self) -> None:
        """Let the provider take its memory and make its records (once per holding)."""
        if self.provider.flights:
            return
        self.inference = self._units_are_inference()
        self.provider.allocate(self, self.inference)

    def evict(self) -> None:
        """Forget what the provider's memory holds (another model took the shared slots
        over, or the memory is being let go)."""
        if self.in_use:
            raise BlockSwapError(
                "two swapped models ran interleaved inside one forward on shared slots; "
                "give them different prefetch_blocks to keep their slots apart"
            )
        if self.ahead and self.schedule:  # they are copied again first, in order
            self.cursor = (self.cursor - len(self.ahead)) % len(self.schedule)
        self.ahead.clear()
        self.pending.clear()
        self.provider.forget()

    def release_memory(self) -> None:
        """Give the provider's memory up (freed if no other model shares it); taken again on
        next use."""
        if not self.provider.holds_memory:
            return
        self.end_forward(completed=False)
        self.streams.synchronize()  # nothing in flight: every buffer can go
        self.evict()
        self.provider.let_go(self)

    def begin_forward(self) -> None:
        self.allocate()
        self._before_first_wait = True
        self.observed = []
        self.misses_this_forward = 0
        self._pump()

    def end_forward(self, completed: bool) -> None:
        """Release what an interrupted forward left in use; adopt the observed order if the
        schedule mispredicted."""
        for index in list(self.in_use):
            self.release(index)
        if completed and self.observed and self.misses_this_forward:
            self.stats.relearned += 1
            while self.ahead:
                self._drop(self.ahead.pop())
            self.set_schedule(self.observed)
            self._pump()
        self.observed = []

    # -- the protocol ---------------------------------------------------------------------

    def prefetch(self, index: int) -> InFlight:
        """Start copying unit ``index`` into a free record (no copy if still cached there)."""
        self.allocate()
        flight = self.provider.take(index)
        self.pending.add(index)
        if flight.index == index:
            self.stats.cache_hits += 1
            return flight
        stored = self.units[index]
        try:
            if stored.compress and stored.transfer is None:  # filled after apply (a loader)
                stored.seal(self.streams.device)
            flight.index = index
            self._start_copy(flight, stored)
        except BaseException:
            self._abandon(flight, index)
            raise
        self.stats.copies += 1
        self.stats.bytes_copied += stored.copy_nbytes
        self.stats.raw_bytes_copied += stored.nbytes
        return flight

    def wait(self, index: int) -> None:
        """Make unit ``index``'s weights usable by work queued next on the compute stream."""
        if index in self.lingering:  # still bound from a call of one of its part's layers
            self.lingering.discard(index)
            return
        for other in list(self.lingering):
            self.release(other)
        flight = self._take(index)
        compute = self.streams.compute_stream()
        timing = flight.timing if self.debug else None
        if timing is not None:
            timing.reached = self._mark(compute)
        self.streams.wait(compute, flight.ready)
        if timing is not None:
            timing.began = self._mark(compute)
        self.in_use[index] = flight
        self.units[index].bind(_as_left(self.provider.views(flight, index), flight.view_dtypes))
        if not self.observed:  # the forward's first unit: queue the ones after it
            self._before_first_wait = False
        self.observed.append(index)
        self.provider.bound(flight)
        self._pump()

    def release(self, index: int) -> None:
        """Let unit ``index``'s memory be reused once the compute stream has finished with it."""
        self.lingering.discard(index)
        flight = self.in_use.pop(index, None)
        if flight is None:
            return
        compute = self.streams.compute_stream()
        if flight.slot is not None:
            # packed slots share ``freed`` among a slot's units: chained, a release on another
            # compute stream than the last one's still orders the next copy after both
            self.streams.wait(compute, flight.freed)
        self.streams.record(flight.freed, compute)
        if self.debug:
            timing, flight.timing = flight.timing, None
            if timing is not None:
                timing.released = self._mark(compute)
                self.stats.pending.append(timing)
        self.units[index].unbind()
        self.pending.discard(index)
        self.provider.released(flight)
        self._pump()

    # -- internals ------------------------------------------------------------------------

    def invalidate(self) -> None:
        """Forget what free and prefetched memory holds, so every unit is copied again."""
        self.provider.invalidate()  # a unit's pieces may have changed (re-sealed)
        while self.ahead:
            self._drop(self.ahead.pop())
        in_use = set(map(id, self.in_use.values()))
        for flight in self.provider.flights:
            if id(flight) not in in_use:
                flight.index = None

    def _take(self, index: int) -> InFlight:
        """The record holding unit ``index``: the next prefetched one, or loaded now on a miss."""
        ahead = self.ahead
        if ahead and ahead[0].index == index:
            return ahead.popleft()
        self.stats.misses += 1
        self.misses_this_forward += 1
        skipped = next((i for i, f in enumerate(ahead) if f.index == index), None)
        if skipped is not None:  # units in between were skipped; their copies stay cached
            for _ in range(skipped):
                self._drop(ahead.popleft())
            return ahead.popleft()
        consumed = (self.cursor - len(ahead)) % max(1, len(self.schedule))
        while ahead:
            self._drop(ahead.pop())
        position = self._position_of(index, consumed)
        self.cursor = consumed if position is None else (position + 1) % len(self.schedule)
        return self.prefetch(index)

    def _position_of(self, index: int, start: int) -> int | None:
        positions = self.positions.get(index)
        if not positions:
            return None
        return next((p for p in positions if p >= start), positions[0])

    def _pump(self) -> None:
        """Prefetch the next units of the schedule while the provider has room."""
        length = len(self.schedule)
        provider = self.provider
        while provider.free and length:
            index = self.schedule[self.cursor]
            if index in self.pending:  # wrapped: everything ahead is already here
                break
            if not provider.admits(self.units[index], self.ahead):
                break
            if self.hold_at_forward_edge and self._before_first_wait and self.ahead:
                break  # see [Note: holding copies at a forward's edge]
            self.ahead.append(self.prefetch(index))
            if self.cursor == 0 and self.observed:  # the next forward's first unit
                self._before_first_wait = True
            self.cursor = (self.cursor + 1) % length

    def _start_copy(self, flight: InFlight, stored: StoredUnit) -> None:
        """Queue ``stored``'s copy (and transform) into ``flight`` and record its ready event."""
        self.provider.prepare(flight, stored)
        timing = UnitTiming(stored.name) if self.debug else None
        streams = self.streams
        copy_stream = streams.copy_stream
        with streams.on_copy_stream(), torch.inference_mode(self.inference):
            streams.wait(copy_stream, flight.freed)
            # The previous occupant's last writes may be on the decode stream (a compressed
            # unit's decodes, or its transform), and a unit prefetched but never used leaves
            # no newer ``freed``: wait for them too (see [Note: compressed copies]).
            streams.wait(copy_stream, flight.ready)
            if timing is not None:
                timing.copy_start = self._mark(copy_stream)
            clock = self._mark(copy_stream) if self.copy_clock is not None else None
            if stored.transfer is None:
                flight.buffer[: stored.nbytes].copy_(
                    stored.host.tensor[: stored.nbytes], non_blocking=self.non_blocking
                )
                last = copy_stream
            else:
                last = self._copy_compressed(flight, stored)
            if clock is not None:
                self.copy_clock.append((clock, self._mark(copy_stream), stored.copy_nbytes))
        with streams.on(last), torch.inference_mode(self.inference):
            transform = self.transform  # after the copy, before the ready event
            flight.view_dtypes = None
            if transform is not None and (
                self.transformed is None or stored.name in self.transformed
            ):
                views = self.provider.views(flight, flight.index)  # one per piece
                left = transform(stored.name, stored.as_tensors(views))
                flight.view_dtypes = _piece_dtypes(stored, views, left)
            streams.record(flight.ready, last)
            if timing is not None:
                timing.copy_end = self._mark(last)
                flight.timing = timing

    def _copy_compressed(self, flight: InFlight, stored: StoredUnit) -> object:
        """Queue ``stored``'s pieces into ``flight`` (see [Note: compressed copies]); returns
        the stream on which the buffer is complete."""
        transfer = stored.transfer
        assert transfer is not None
        streams, provider = self.streams, self.provider
        copy_stream, decode_stream = streams.copy_stream, streams.decode_stream
        targets = provider.targets(flight, stored)
        streams.wait(decode_stream, flight.freed)
        streams.wait(decode_stream, flight.ready)  # the previous occupant's last writes
        for piece, source, destination in zip(transfer.pieces, transfer.sources, targets):
            if not piece.packed:
                destination.copy_(source, non_blocking=self.non_blocking)  # on X
                continue
            staged, consumed, landed = provider.staging(flight, piece.host_nbytes)
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
        streams.record(flight.copied, copy_stream)
        streams.wait(decode_stream, flight.copied)
        return decode_stream

    def _abandon(self, flight: InFlight, index: int) -> None:
        """A copy into ``flight`` failed half-way (out of memory, a failing transform): wait
        for what was queued, then hand the record back empty."""
        self.streams.synchronize()
        flight.index = None
        flight.timing = None
        self.pending.discard(index)
        self.provider.abandoned(flight)

    def _drop(self, flight: InFlight) -> None:
        """Hand back a prefetched-but-unused record; its contents stay valid for its unit."""
        self.pending.discard(flight.index)
        flight.timing = None
        self.provider.dropped(flight)

    def _mark(self, stream: object) -> object:
        event = self.streams.new_event(timing=True)
        self.streams.record(event, stream)
        return event

    def close(self) -> None:
        """Wait for in-flight copies and let go of the memory."""
        self.release_memory()
        self.in_use.clear()
        self.lingering.clear()
        self.stats.pending.clear()


# [Note: a transform may change a view's dtype]
# A transform may leave a tensor in another dtype of the same element size, in its own bytes
# (a weight patch kept in the dtype its model computes in, where the slot holds a bf16 file's
# weights for the bf16 codec: [Note: patched weights in the model dtype] in the ComfyUI
# callbacks). It returns one dtype or None per tensor; the scheduler binds that tensor's slot
# view reinterpreted as that dtype, for this copy only: the next copy into the slot starts
# from the layout's dtypes again.


def _piece_dtypes(stored: StoredUnit, views: list[torch.Tensor], left: Any) -> list | None:
    """Per piece, the dtype a transform said it left each of ``stored``'s tensors in."""
    if left is None:
        return None
    if len(left) != len(stored.counts):
        raise BlockSwapError(
            f"the transform of {stored.name} returned {len(left)} dtypes for "
            f"{len(stored.counts)} tensors"
        )
    out: list = []
    for dtype, count in zip(left, stored.counts):
        if dtype is not None and count != 1:
            raise BlockSwapError(
                f"a transform cannot change a wrapper tensor's dtype in {stored.name}"
            )
        out.extend([dtype] if count == 1 else [None] * count)
    for view, dtype in zip(views, out):
        if dtype is not None and torch.empty((), dtype=dtype).element_size() != view.element_size():
            raise BlockSwapError(
                f"the transform of {stored.name} left a {view.dtype} tensor as {dtype}, "
                "of another element size"
            )
    return out


def _as_left(views: list[torch.Tensor], dtypes: list | None) -> list[torch.Tensor]:
    if dtypes is None:
        return views
    return [view if dtype is None else view.view(dtype) for view, dtype in zip(views, dtypes)]
