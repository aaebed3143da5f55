"""Applying a swap plan to a module, and undoing it.

``BlockSwap.apply`` works in phases so that a failure leaves the module as it was:
measure (units and sizes) -> plan -> check memory -> place (pack swapped units, move
resident tensors, create the scheduler) -> hook. ``remove`` undoes every phase (see [Note:
apply is a transaction]). Fixed slots are taken at the first forward, not here: running out
of VRAM for them is reported there (``FixedSlots.allocate``), with the model unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from . import memory, packed_slots, slot_pool
from .compression_switch import CompressionAutoSwitch
from .config import SwapConfig
from .donor_allocation import StoragePlan
from .donor_storage import plan_donor_storage, storage_devices
from .errors import (
    BlockSwapError,
    BlockSwapStateError,
    InsufficientHostMemoryError,
    InsufficientMemoryError,
)
from .fixed_slots import FixedSlots
from .packed_slots import PackedSlots
from .hooks import inner_layer_hooks, register_state_dict_hook, unit_post_hook, unit_pre_hook
from .layout import ModelLayout
from .model_sizes import (
    choose_units,
    every_candidate,
    measure_model,
    packed_bytes,
    unit_layout,
)
from .plan import plan_swap
from .swap_plan import ModelSizes, SwapPlan
from .scheduler import PrefetchScheduler
from .stats import SwapStats
from .storage import return_freed_host_memory
from .stored_unit import Placeholders, StoredUnit, allocate_empty, drop_compression_of
from .streams import DeviceStreams
from .swapped_weights import SwappedWeights
from .token_chunks import FirstChunkObserver, TokenChunkedForward
from .units import (
    SwapUnit,
    TensorRef,
    find_blocks,
    inner_layers,
    kept_strides,
    move_tensor,
    tensor_refs,
    token_wise_modules,
)
from .window_allocator import WindowAllocator, block_lookahead_bytes

logger = logging.getLogger("wan_blockswap")

# [Note: no strong path to the model]
# Nothing global may reach a swapped model strongly, or dropping the model without remove()
# (ComfyUI does this when a workflow switches models) would keep it and its pinned host
# buffers alive forever: this registry's values and a BlockSwap's ``model`` are weak. The
# model keeps its BlockSwap alive through its forward hooks, and nothing of ours points back
# (the hooks on swapped blocks hold the scheduler weakly; a ``TensorRef`` holds its owning
# module weakly, and the model itself owns some tensors a swap moves), so dropping the last
# reference to the model frees it at once, with its host buffers and slots, without waiting
# for the cycle collector.
_active: "weakref.WeakKeyDictionary[nn.Module, BlockSwap]" = weakref.WeakKeyDictionary()

# The options :meth:`BlockSwap.replan` may change: the plan's size, not how units are cut,
# stored or sent.
REPLAN_FIELDS = (
    "blocks_to_swap",
    "vace_blocks_to_swap",
    "role_blocks_to_swap",
    "resident_blocks",
    "vram_budget_gb",
    "swap_unit",
    "offload_txt_emb",
    "offload_img_emb",
    "prefetch_blocks",
)


class ReplanCounts(NamedTuple):
    """What :meth:`BlockSwap.replan` did with the units: ``kept`` packed as they were,
    ``packed`` anew, ``restored`` (kept on the GPU from now on) given their weights back."""

    kept: int
    packed: int
    restored: int


# [Note: re-planning in place]
# A new budget (ComfyUI's "auto" fits one to each latent) mostly moves a few units between
# the GPU and host memory. Removing the swap and applying it again would copy every swapped
# weight back and pack it again: on an H100 with 40 Wan-14B blocks (23 GB swapped), each such
# re-plan left 13.7-18.1 s outside the sampling steps of an 81-frame prompt that core ran in
# 16.4 s (benchmarks/results/comfyui_dynamic_h100/session23_40blocks_81f_12_4gib_fused_rope.json),
# and it threw away what transfer_compression="auto" had decided. ``replan`` keeps each unit
# the new plan swaps too as it is (host buffer, packed copy, pinned pages), gives the units
# it keeps on the GPU their weights back where they were (the host loads them, as after
# remove()), packs only the units it swaps anew, and builds a new scheduler and hooks over
# the new list. It is a transaction the way apply is ([Note: apply is a transaction]): the
# checks only read; after them, whatever stops it removes the whole swap, since every unit,
# kept, restored or half-packed, knows how to give its weights back ([Note: unit states]).


def active_swap(module: nn.Module) -> "BlockSwap | None":
    """The block swap applied to ``module``, if any."""
    return _active.get(module)


class BlockSwap(SwappedWeights):
    """A module with some of its blocks streamed from pinned host memory.

    Create with :meth:`apply` (or :func:`wan_blockswap.apply_block_swap`); undo with
    :meth:`remove`. Attributes ``plan`` and ``stats`` describe what happens.
    """

    def __init__(self) -> None:  # use BlockSwap.apply
        self._model: "weakref.ref[nn.Module] | None" = None  # [Note: no strong path to the model]
        self.plan: SwapPlan | None = None
        # where swapped units are stored when some go to a donor GPU; None: all in host memory
        self.storage: StoragePlan | None = None
        # What the planner saw at apply time; placeholders hide the sizes afterwards, and
        # re-planning for a new budget (ComfyUI's "auto") needs them.
        self.sizes: ModelSizes | None = None
        self.stats = SwapStats()
        self.units: list[StoredUnit] = []
        self.scheduler: PrefetchScheduler | None = None
        # resident tensors we moved: where from, and the strides to give back
        self._moved: list[tuple[TensorRef, torch.device, tuple[int, ...] | None]] = []
        self._hooks: list[Any] = []
        self._swapped_index: dict[str, tuple[StoredUnit, int]] = {}
        self.move_resident = True
        self.allocate_empty = True
        self._after_weights_read: Any = None
        self._auto: CompressionAutoSwitch | None = None
        # Every candidate unit as measured at apply (``measure_model``), and the placeholders
        # swapped tensors point at: what :meth:`replan` chooses from and binds to
        self._candidates: dict[str, Any] = {}
        self._unit_bytes: dict[str, int] = {}  # each candidate's packed bytes, by name
        self._placeholders = Placeholders()
        # ``transfer_compression="auto"`` dropped the packed copies: units swapped from now on
        # travel raw too
        self._compression_dropped = False

    @classmethod
    def apply(
        cls,
        model: nn.Module,
        config: SwapConfig,
        layout: ModelLayout,
        device: torch.device,
        move_resident: bool = True,
        allocate_empty: bool = True,
        after_weights_read: Any = None,
    ) -> "BlockSwap":
        """Apply ``config`` to ``model``. With ``move_resident=False`` weights that stay on the
        GPU are left where they are, for a host (ComfyUI core) that places them itself; the
        VRAM check is then the host's business too. With ``allocate_empty=False`` units of a
        meta skeleton get their host buffers only when a loader fills them
        (``StoredUnit.allocate``), so page-locking overlaps reading the file.
        ``after_weights_read()`` runs after each unit is packed, and after each batch of raw
        copies is made when transfer compression is dropped (a host whose weights are a
        mapped file drops the pages that reading faulted in, so RAM holds one copy, not
        two)."""
        if model in _active:
            raise BlockSwapStateError(
                f"{type(model).__name__} already has a block swap applied; call "
                f"remove_block_swap(model) first (or pass replace=True)"
            )
        swap = cls()
        swap._model = weakref.ref(model)
        swap.device = device
        swap.layout = layout = unit_layout(layout, config.chunk_tokens)
        units, sizes = measure_model(model, layout)
        swap.sizes, swap._candidates = sizes, units
        swap._unit_bytes = {unit.name: packed_bytes(unit) for unit in every_candidate(units)}
        try:
            chosen = swap._plan_and_check(model, units, config, move_resident)
        except InsufficientHostMemoryError as error:
            if not (config.transfer_compression == "auto" and swap.plan and swap.plan.compressed):
                raise
            # "auto" is a choice of speed, not a demand: where the packed copies do not fit
            # in host RAM beside the weights, the swap runs raw (every prompt still works)
            logger.warning(
                "transfer_compression auto: %s Sending every swapped weight raw instead.",
                str(error).split(". ")[0] + ".",
            )
            config = dataclasses.replace(config, transfer_compression=False)
            chosen = swap._plan_and_check(model, units, config, move_resident)
        swap.move_resident = move_resident
        swap.allocate_empty = allocate_empty
        swap._after_weights_read = after_weights_read
        # [Note: apply is a transaction]
        # Everything up to here only reads the model. From here on, whatever stops apply (a
        # failed allocation, Ctrl-C between any two lines) is undone before it propagates:
        # the model gets its weights back bit for bit and nothing stays registered. Each unit
        # knows how far it got ([Note: unit states]); a resident tensor is recorded before it
        # moves and moved back only if it did; registering in ``_active`` is the last step,
        # so a swap is either found there whole or not at all. tests/test_transactional_apply.py
        # interrupts every line of this path.
        try:
            swap._place(chosen)
            swap._attach_hooks()
            swap._watch_compression()
            _active[model] = swap
        except torch.cuda.OutOfMemoryError as error:
            swap._undo()
            raise InsufficientMemoryError(
                f"ran out of memory placing the plan ({swap.plan.resident_bytes / 2**30:.2f} GiB "
                f"resident on {device}, {swap.plan.swapped_bytes / 2**30:.2f} GiB in host "
                f"memory): swap more blocks or lower vram_budget_gb. Nothing was changed."
            ) from error
        except BaseException:
            swap._undo()
            raise
        return swap

    def _plan_and_check(
        self, model: nn.Module, units: list[SwapUnit], config: SwapConfig, move_resident: bool
    ) -> list[SwapUnit]:
        """Plan ``config`` for ``model`` and check that it fits; the units to swap. Only reads
        the model."""
        self.config = config
        self.plan = plan_swap(self.sizes, config)
        chosen = choose_units(units, self.plan)
        self.storage = plan_donor_storage(
            config, [memory.unit_bytes(u) for u in chosen], self.device
        )
        level = logging.INFO if config.debug else logging.DEBUG
        logger.log(
            level,
            "block swap plan for %s (%s):\n%s",
            type(model).__name__,
            self.layout.name,
            self.describe(),
        )
        on_donors = [u for u, d in zip(chosen, storage_devices(self.storage, len(chosen))) if d]
        memory.check_fits(
            model, chosen, self.plan, self.device, check_vram=move_resident, on_donors=on_donors
        )
        return chosen

    @property
    def model(self) -> nn.Module | None:
        """The swapped module; None after :meth:`remove` or once the module was collected."""
        return self._model() if self._model is not None else None

    def describe(self) -> str:
        """Where the plan puts each block, named by the device this swap computes on."""
        assert self.plan is not None, "describe() of a swap that was never applied"
        text = self.plan.describe(self.device)
        if self.storage is not None:
            text += f"\nswapped blocks stored as {self.storage.describe()}"
        return text

    # -- place ----------------------------------------------------------------------------

    def _place(self, chosen: list[SwapUnit]) -> None:
        assert self.model is not None and self.plan is not None
        swapped_ids: set[int] = set()
        stores = storage_devices(self.storage, len(chosen))
        with torch.no_grad():
            sizes = [self._unit_bytes[unit.name] for unit in chosen]  # measured in apply
            self._pack(chosen, self._packing(sizes, self.plan), stores)
            for stored in self.units:
                swapped_ids.update(id(ref.get()) for ref in stored.unit.tensors)
            for ref in tensor_refs(self.model, "", set()) if self.move_resident else ():
                tensor = ref.get()
                if id(tensor) in swapped_ids or tensor.device == self.device:
                    continue
                self._moved.append((ref, tensor.device, kept_strides(tensor)))
                if tensor.device.type == "meta":  # a skeleton: the loader fills it
                    ref.replace(torch.empty(tensor.size(), dtype=tensor.dtype, device=self.device))
                else:
                    move_tensor(ref, self.device)
        self._start_scheduler()

    def _pack(
        self,
        units: list[SwapUnit],
        compress: list[bool],
        stores: "list[torch.device | None]",
    ) -> None:
        """Store ``units`` (appended to ``self.units``) in host buffers, or on ``stores``, and
        leave placeholders; ``compress``: whether each travels packed."""
        pin = self.device.type == "cuda"
        new = []
        for unit, packed, store in zip(units, compress, stores):
            stored = StoredUnit(unit, self.device, self._placeholders, packed, store)
            self.units.append(stored)  # before pack, so _undo restores a half-packed unit
            new.append(stored)
        if self.allocate_empty:
            allocate_empty(new, pin, self.device)
        for stored in new:
            if stored.is_empty and not self.allocate_empty:
                stored.unbind()  # placeholders now; the loader allocates and fills it
            else:
                stored.pack(pin)
                if not stored.awaits_data:  # else a loader fills it; sealed at first use
                    stored.seal(self.device)
                if self._after_weights_read is not None:
                    self._after_weights_read()

    def _start_scheduler(self) -> None:
        """The memory provider the plan asks for, and the scheduler over ``self.units``."""
        assert self.plan is not None
        streams = DeviceStreams(self.device, timing=self.config.debug)
        provider: FixedSlots | PackedSlots | WindowAllocator
        if self.plan.kind == "streamed":
            assert self.sizes is not None
            lookahead = block_lookahead_bytes(self.sizes, self.plan, self.config.prefetch_blocks)
            provider = WindowAllocator(streams, self.units, self.plan.window_bytes, lookahead)
        elif packed_slots.packs(self.plan, len(self.units)):
            provider = self._packed_slots(streams)
        else:
            provider = FixedSlots(
                streams,
                self.units,
                self.plan.num_slots,
                self.plan.slot_bytes,
                staging_bytes=self.plan.staging_bytes,
            )
        self.scheduler = PrefetchScheduler(
            streams,
            self.units,
            provider,
            self.config.non_blocking,
            self.stats,
            debug=self.config.debug,
        )

    def _packed_slots(self, streams: DeviceStreams) -> PackedSlots:
        plan = self.plan
        assert plan is not None
        return PackedSlots(
            streams, self.units, plan.num_slots, plan.slot_bytes, staging_bytes=plan.staging_bytes
        )

    def _pack_slots_once_raw(self) -> None:
        """Every unit travels raw now ("auto" dropped compression): fixed slots of layer units
        pack from this forward on, in a pool of the same key (the same pool where another
        model shares it) ([Note: packed slots])."""
        scheduler, plan = self.scheduler, self.plan
        # a unit not sealed yet (a loader fills it) still travels packed once sealed
        if scheduler is None or plan is None or self._packs_any:
            return
        raw = dataclasses.replace(plan, compressed=False)
        if isinstance(scheduler.provider, FixedSlots) and packed_slots.packs(raw, len(self.units)):
            scheduler.release_memory()  # at a forward's start: nothing in use
            scheduler.provider = self._packed_slots(scheduler.streams)
            logger.info(
                "wan_blockswap: every unit travels raw now; layer units pack into the %d "
                "fixed slots from this forward on",
                plan.num_slots,
            )

    def _packing(self, sizes: list[int], plan: SwapPlan) -> list[bool]:
        """Whether each unit of the plan, of ``sizes`` bytes in the plan's order, travels
        packed. In a streamed plan its packed bytes take GPU memory too while it is in flight,
        so it travels packed only if it still fits in the window beside the unit before it (as
        far as the model's declared order tells; the first one's is the last one's: copies
        wrap round to the next forward): one that cannot be prefetched while that unit runs
        stalls the link for longer than packing saves (H100, Wan 14B at 1,560 tokens: packing
        the first projection of each block, which follows a 135 MiB FFN layer, cost time)."""
        if not plan.compressed:
            return [False] * len(sizes)
        window = plan.window_bytes
        return [
            not window or previous + nbytes * (1 + memory.PACKED_SHARE) <= window
            for previous, nbytes in zip(sizes[-1:] + sizes[:-1], sizes)
        ]

    def _attach_hooks(self) -> None:
        assert self.model is not None and self.scheduler is not None
        scheduler = self.scheduler
        # One registration per line, its handle kept in the same line ([Note: apply is a
        # transaction]): a statement over several lines gives an interrupt a place between
        # registering a hook and keeping its handle, and the hook would outlive the undo.
        for index, stored in enumerate(self.units):
            module = stored.unit.module
            before, after = unit_pre_hook(scheduler, index), unit_post_hook(scheduler, index)
            self._hooks.append(module.register_forward_pre_hook(before))
            self._hooks.append(module.register_forward_hook(after, always_call=True))
            self._hooks.append(register_state_dict_hook(module, stored.state_dict_hook))
            for inner in inner_layers(stored.unit):  # a part's layers called on their own
                before, after = inner_layer_hooks(scheduler, index)
                self._hooks.append(inner.register_forward_pre_hook(before))
                self._hooks.append(inner.register_forward_hook(after, always_call=True))
        for block in find_blocks(self.model, self.layout) if self.config.chunk_tokens else ():
            for part in token_wise_modules(block):  # [Note: token chunks]
                self._hooks.append(TokenChunkedForward(part, self.config.chunk_tokens))
                self._hooks[-1].install()  # recorded first: the undo can always take it back
        self._hooks.append(self.model.register_forward_pre_hook(self._begin_forward))
        self._hooks.append(self.model.register_forward_hook(self._end_forward, always_call=True))

    @property
    def swapped_modules(self) -> set[nn.Module]:
        """Every module whose tensors (or whose descendants' tensors) this swap streams."""
        return {m for stored in self.units for m in stored.unit.module.modules()}

    def slot_pool_key(self) -> tuple | None:
        """Swaps with equal keys share one set of GPU slots (see [Note: shared slots]); a host
        that counts VRAM per model should count those slots once. None without slots."""
        return self.scheduler.pool_key() if self.scheduler is not None else None

    @property
    def compression_dropped(self) -> bool:
        """Whether every unit was sent raw for good (``drop_compression``): re-plans in place
        keep their units raw."""
        return self._compression_dropped

    @property
    def compressed(self) -> bool:
        """Whether any unit still travels compressed."""
        return any(u.transfer is not None for u in self.units)

    def drop_compression(self) -> None:
        """Send every unit raw from now on, from pinned memory (see ``compression_switch``).
        Slots keep their contents: the weights are the same."""
        if self.scheduler is not None:
            self.scheduler.streams.synchronize()  # no copy may still read a packed buffer
        try:
            # after each batch: its raw weights were just read to make the pinned copies,
            # and a mapped file's pages stayed beside them (H100, 81 frames: 11.3 GiB RSS
            # against 7.4)
            compressed = [stored for stored in self.units if stored.transfer is not None]
            drop_compression_of(compressed, self._after_weights_read, self.device)
        except BlockSwapError as error:  # pinning failed: the rest stay compressed (correct)
            logger.warning("transfer_compression: could not switch every unit to raw: %s", error)
        self._compression_dropped = True
        return_freed_host_memory()

    def set_window(self, plan: SwapPlan, config: SwapConfig) -> None:
        """Adopt ``plan``, a streamed plan that differs from the current one only in its
        window (a new budget), without repacking anything. Whether each layer travels
        packed stays as decided at apply time."""
        current = self.plan
        assert current is not None and self.scheduler is not None
        provider = self.scheduler.provider
        if (
            plan.kind != "streamed"
            or plan.swapped != current.swapped
            or not isinstance(provider, WindowAllocator)
        ):
            raise BlockSwapStateError("set_window takes a streamed plan of the same layers")
        # compression stays as apply left it (raw where "auto" gave way to RAM, see apply)
        config = dataclasses.replace(config, transfer_compression=self.config.transfer_compression)
        plan = dataclasses.replace(
            plan, compressed=current.compressed, staging_bytes=current.staging_bytes
        )
        self.plan, self.config = plan, config
        provider.window_bytes = plan.window_bytes

    def replan(
        self,
        config: SwapConfig,
        origin: Callable[[str], torch.Tensor | None] | None = None,
    ) -> ReplanCounts:
        """Adopt the plan ``config`` makes for this model, which may differ from the applied
        config only in the plan's size (``REPLAN_FIELDS``), without packing again what stays
        swapped. See [Note: re-planning in place]. A weight transform (:meth:`set_transform`)
        is dropped: set it again for the new units. ``origin``: by a tensor's qualified name,
        memory that already holds its weights (a host's own copy), which units the new plan
        keeps on the device point at instead of a copy out of host memory (see
        :meth:`StoredUnit.restore`): no transient copy of them in host RAM.

        Raises :class:`BlockSwapStateError`, having changed nothing, for a swap that moved
        resident weights to the device itself or stores blocks on a donor GPU, or for other
        changed options: remove the swap and apply again. Host RAM too short for the
        units it swaps anew is :class:`InsufficientHostMemoryError`, nothing changed either.
        Whatever stops it later (an interrupt, a failed allocation) removes the swap: the
        model has every weight back, bit for bit, and nothing is registered."""
        model = self.model
        if model is None or _active.get(model) is not self:
            raise BlockSwapStateError("replan() of a swap that was removed: apply a new one")
        self._check_replannable(config)
        # compression stays as apply left it (raw where "auto" gave way to RAM, see apply)
        config = dataclasses.replace(config, transfer_compression=self.config.transfer_compression)
        assert self.sizes is not None
        plan = plan_swap(self.sizes, config)
        chosen = choose_units(self._candidates, plan)
        wanted = {unit.name for unit in chosen}
        kept = {stored.name: stored for stored in self.units if stored.name in wanted}
        leaving = [stored for stored in self.units if stored.name not in wanted]
        new = [unit for unit in chosen if unit.name not in kept]
        # units swapped anew travel raw once "auto" dropped the packed copies
        raw = self._compression_dropped or not plan.compressed
        raw = self._check_host_for(model, new, plan, raw)
        # as measured at apply: swapped tensors hold placeholders now
        sizes = [self._unit_bytes[unit.name] for unit in chosen]
        names = [unit.name for unit in chosen]
        packed = dict(zip(names, self._packing(sizes, plan))) if not raw else {}
        new_packed, stores = [packed.get(u.name, False) for u in new], [None] * len(new)
        # No comprehension below in this frame: Python 3.12 inlines them, and an exception that
        # a trace function raises inside one (tests/test_replan.py's interrupts, on 3.12.1)
        # skipped this frame's handlers, leaving the swap half re-planned.
        try:  # [Note: re-planning in place]
            self._detach()
            self.plan, self.config = plan, config
            with torch.no_grad():
                for stored in leaving:
                    stored.restore(origin)
                self._pack(new, new_packed, stores)
            self.units = self._in_order(chosen)
            if plan.compressed and not self._packs_any:  # no unit travels packed
                self.plan = dataclasses.replace(plan, compressed=False, staging_bytes=0)
            self._swapped_index.clear()
            self._start_scheduler()
            self._attach_hooks()
            self._watch_compression()
        except torch.cuda.OutOfMemoryError as error:
            self.remove()
            raise InsufficientMemoryError(
                f"ran out of VRAM packing the re-planned swap ({error}); the swap was removed "
                f"and the model has its weights back: apply a swap again"
            ) from error
        except BaseException:
            self.remove()
            raise
        return_freed_host_memory()  # what restoring and freeing buffers left in the heap
        logger.debug("re-planned %s in place:\n%s", type(model).__name__, self.describe())
        return ReplanCounts(kept=len(kept), packed=len(new), restored=len(leaving))

    def _in_order(self, chosen: list[SwapUnit]) -> list[StoredUnit]:
        """The stored units of ``chosen``, in its order (the schedule's)."""
        by_name = {stored.name: stored for stored in self.units}
        return [by_name[unit.name] for unit in chosen]

    def _check_replannable(self, config: SwapConfig) -> None:
        # Units the new plan keeps come back where they were before apply: right where the
        # swap moved no resident weight itself (a host places them, or they were there).
        if self._moved or self.storage is not None:
            raise BlockSwapStateError(
                "replan() works on a swap that moved no resident weight to the device itself "
                "(apply with move_resident=False, or a model already on its device) and keeps "
                "swapped blocks in host memory; remove this swap and apply the new config"
            )
        free = set(REPLAN_FIELDS) | {"transfer_compression"}  # the latter kept as applied
        changed = [
            f.name
            for f in dataclasses.fields(config)
            if f.name not in free and getattr(config, f.name) != getattr(self.config, f.name)
        ]
        if changed:
            raise BlockSwapStateError(
                f"replan() changes only the plan's size ({', '.join(REPLAN_FIELDS)}), but "
                f"{', '.join(changed)} changed too; remove this swap and apply the new config"
            )

    def _check_host_for(
        self, model: nn.Module, new: list[SwapUnit], plan: SwapPlan, raw: bool
    ) -> bool:
        """Check that host RAM holds the units ``new`` swaps anew (raw: no packed copies);
        whether they travel raw. Under ``transfer_compression="auto"`` they do where their
        packed copies would not fit, as in apply. Reads only. The units leaving still hold
        their memory here, so this asks for more than the re-plan will take."""
        nbytes = sum(map(memory.unit_bytes, new))
        try:
            arriving = dataclasses.replace(plan, swapped_bytes=nbytes, compressed=not raw)
            memory.check_fits(model, new, arriving, self.device, check_vram=False)
            return raw
        except InsufficientHostMemoryError as error:
            if raw or self.config.transfer_compression != "auto":
                raise
            logger.warning(
                "transfer_compression auto: %s Sending the units swapped anew raw.",
                str(error).split(". ")[0] + ".",
            )
        arriving = dataclasses.replace(plan, swapped_bytes=nbytes, compressed=False)
        memory.check_fits(model, new, arriving, self.device, check_vram=False)
        return True

    @property
    def copy_rate(self) -> float:
        """Bytes per millisecond that the copies timed by ``transfer_compression="auto"`` ran
        at (the fastest timed forward's); 0 where none was timed."""
        return self._auto.bytes_per_ms if self._auto is not None else 0.0

    @property
    def _packs_any(self) -> bool:
        """Whether some unit travels packed, or will once a loader fills it and it is sealed."""
        return any(stored.compress for stored in self.units)

    def _watch_compression(self) -> None:
        """``transfer_compression="auto"`` on a GPU: time forwards to decide whether the
        packed copies pay (``compression_switch``), once some unit travels packed. An
        undecided switch goes once none does: with no packed copy to time it would read every
        forward as compute-bound and drop compression for the units of later plans too."""
        if self._auto is not None and not self._auto.decided and not self._packs_any:
            self._auto = None
        if (
            self._auto is None
            and self.config.transfer_compression == "auto"
            and self._packs_any
            and _times_forwards(self.device)
        ):
            self._auto = CompressionAutoSwitch(self.device)

    def _detach(self) -> None:
        """Stop streaming: close the scheduler (its GPU memory goes) and take the hooks off.
        The units keep their storage."""
        if self.scheduler is not None:
            self.scheduler.end_forward(completed=False)
            self.scheduler.close()
            self.scheduler = None
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _chunkers(self) -> list[TokenChunkedForward]:
        return [h for h in self._hooks if isinstance(h, TokenChunkedForward)]

    @property
    def cuts_token_wise(self) -> bool:
        """Whether this swap runs token-wise parts in chunks ([Note: token chunks])."""
        return bool(self._chunkers())

    def observe_first_chunks(self, observer: FirstChunkObserver | None) -> None:
        """Tell ``observer`` (None: no one) around the first chunk of every cut call of a
        token-wise part from now on ([Note: token chunks])."""
        for chunker in self._chunkers():
            chunker.observer = observer

    def chunked_calls(self) -> int:
        """How many calls of token-wise parts ran in chunks so far ([Note: token chunks])."""
        return sum(chunker.chunked_calls for chunker in self._chunkers())

    def ring_bytes_held(self) -> int:
        """GPU bytes swapped units take now: fixed slots once taken, or a streamed plan's
        layers in flight."""
        return self.scheduler.provider.held_bytes if self.scheduler is not None else 0

    def ring_bytes_on_device(self) -> int:
        """GPU bytes the swapped units' memory takes now: fixed slots with their staging while
        their pool exists, whichever model sharing it holds it ([Note: shared slots]), or a
        streamed plan's layers in flight."""
        key = self.slot_pool_key()
        if key is not None:
            return slot_pool.bytes_of(key)
        return self.ring_bytes_held()

    def release_vram(self) -> None:
        """Free the GPU memory of swapped units until the next forward (e.g. when a host
        unloads the model)."""
        if self.scheduler is not None:
            self.scheduler.release_memory()

    def release_all(self) -> None:
        """Release whatever an interrupted forward left bound (idempotent)."""
        if self.scheduler is not None:
            self.scheduler.end_forward(completed=False)

    @torch.compiler.disable
    def _begin_forward(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():  # only then: the check costs a pass over every tensor
            needs_grad = next(
                (r.qualname for u in self.units for r in u.unit.tensors if r.get().requires_grad),
                None,
            )
            if needs_grad is not None:
                raise BlockSwapStateError(
                    f"block swap is for inference, but {needs_grad} (swapped) requires grad: "
                    f"run the model under torch.no_grad() or torch.inference_mode(), or call "
                    f"model.requires_grad_(False)"
                )
        scheduler = self.scheduler
        assert scheduler is not None
        if self._auto is not None:
            if self._auto.keep_compression() is False:
                self.drop_compression()
                self._pack_slots_once_raw()
            self._auto.begin(self.stats.raw_bytes_copied, scheduler)
        scheduler.begin_forward()

    @torch.compiler.disable
    def _end_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        scheduler = self.scheduler
        assert scheduler is not None
        scheduler.end_forward(completed=output is not None)
        if self._auto is not None:
            self._auto.end(self.stats.raw_bytes_copied, output is not None, scheduler)
        self.stats.forwards += 1
        if self.config.debug:
            self.stats.finish_forward(scheduler.streams.synchronize)

    # -- remove ---------------------------------------------------------------------------

    def remove(self, restore: bool = True) -> None:
        """Detach hooks, give every tensor its memory back where it was, free host and slots.

        With ``restore=False`` the weights are dropped instead and every tensor is left on the
        meta device (what a failed load wants: free everything, copy nothing). Idempotent.
        """
        model = self.model
        if model is None:
            if self._model is not None:  # the module was collected: free what this handle holds
                self._undo(restore=False)
                self._model = None
            return
        self._undo(restore)
        _active.pop(model, None)
        self._model = None
        return_freed_host_memory()

    def _undo(self, restore: bool = True) -> None:
        self._detach()
        with torch.no_grad():
            for stored in self.units:
                stored.restore() if restore else stored.discard()
            for ref, device, strides in self._moved:
                if ref.owner_ref() is None:  # freed with its module: nothing to give back
                    continue
                tensor = ref.get()
                if tensor.device == device:  # recorded, but apply stopped before it moved
                    continue
                if not restore:
                    tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
                else:  # a lazily loaded skeleton's weights come back on the CPU
                    move_tensor(
                        ref, torch.device("cpu") if device.type == "meta" else device, strides
                    )
        self.units.clear()
        self._moved.clear()
        self._swapped_index.clear()


def _times_forwards(device: torch.device) -> bool:
    """Whether forwards on ``device`` can be timed for ``transfer_compression="auto"``."""
    return device.type == "cuda"
