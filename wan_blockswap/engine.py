"""Applying a swap plan to a module, and undoing it.

``BlockSwap.apply`` works in phases so that a failure leaves the module as it was:
measure (units and sizes) -> plan -> check memory -> place (pack swapped units, move
resident tensors, create the scheduler) -> hook. ``remove`` undoes every phase (see [Note:
apply is a transaction]). Fixed slots are taken at the first forward, not here: running out
of VRAM for them is reported there (``FixedSlots.allocate``), with the model unchanged.
"""

from __future__ import annotations

import logging
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from . import compressed_transfer, memory
from .compression_switch import CompressionAutoSwitch
from .config import SwapConfig
from .layout import ModelLayout
from .errors import (
    BlockSwapConfigError,
    BlockSwapError,
    BlockSwapStateError,
    InsufficientMemoryError,
)
from .plan import BlockSizes, ModelSizes, SwapPlan, plan_swap
from .scheduler import PrefetchScheduler
from .fixed_slots import FixedSlots
from .stats import SwapStats
from .storage import PackedLayout, return_freed_host_memory
from .stored_unit import Placeholders, StoredUnit
from .streams import DeviceStreams
from .units import (
    LAYER_UNIT_MIN_SHARE,
    SwapUnit,
    TensorRef,
    block_unit,
    copy_with_strides,
    embedding_unit,
    find_blocks,
    kept_strides,
    layer_units,
    leaves,
    resolve,
    shared_tensor_ids,
    stream_layer_units,
    tensor_refs,
)
from .window_allocator import WindowAllocator

logger = logging.getLogger("wan_blockswap")

# [Note: no strong path to the model]
# Nothing global may reach a swapped model strongly, or dropping the model without remove()
# (ComfyUI does this when a workflow switches models) would keep it and its pinned host
# buffers alive forever: this registry's values and a BlockSwap's ``model`` are weak. The
# model keeps its BlockSwap alive through its forward hooks, and nothing of ours points back
# (the hooks on swapped blocks hold the scheduler weakly), so dropping the last reference to the
# model frees it at once, with its host buffers and slots, without waiting for the cycle
# collector.
_active: "weakref.WeakKeyDictionary[nn.Module, BlockSwap]" = weakref.WeakKeyDictionary()


def active_swap(module: nn.Module) -> "BlockSwap | None":
    """The block swap applied to ``module``, if any."""
    return _active.get(module)


class BlockSwap:
    """A module with some of its blocks streamed from pinned host memory.

    Create with :meth:`apply` (or :func:`wan_blockswap.apply_block_swap`); undo with
    :meth:`remove`. Attributes ``plan`` and ``stats`` describe what happens.
    """

    def __init__(self) -> None:  # use BlockSwap.apply
        self._model: "weakref.ref[nn.Module] | None" = None  # [Note: no strong path to the model]
        self.plan: SwapPlan | None = None
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
        self._on_packed: Any = None
        self._auto: CompressionAutoSwitch | None = None

    @classmethod
    def apply(
        cls,
        model: nn.Module,
        config: SwapConfig,
        layout: ModelLayout,
        device: torch.device,
        move_resident: bool = True,
        allocate_empty: bool = True,
        on_packed: Any = None,
    ) -> "BlockSwap":
        """Apply ``config`` to ``model``. With ``move_resident=False`` weights that stay on the
        GPU are left where they are, for a host (ComfyUI core) that places them itself; the
        VRAM check is then the host's business too. With ``allocate_empty=False`` units of a
        meta skeleton get their host buffers only when a loader fills them
        (``StoredUnit.allocate``), so page-locking overlaps reading the file.
        ``on_packed()`` runs after each unit is packed (a host whose weights are a mapped file
        drops the pages packing read, so RAM holds one copy, not two)."""
        if model in _active:
            raise BlockSwapStateError(
                f"{type(model).__name__} already has a block swap applied; call "
                f"remove_block_swap(model) first (or pass replace=True)"
            )
        swap = cls()
        swap._model = weakref.ref(model)
        swap.device = device
        swap.config = config
        swap.layout = layout
        units, sizes = measure_model(model, layout)
        swap.sizes = sizes
        swap.plan = plan_swap(sizes, config)
        chosen = _choose_units(units, swap.plan)
        level = logging.INFO if config.debug else logging.DEBUG
        logger.log(
            level,
            "block swap plan for %s (%s):\n%s",
            type(model).__name__,
            layout.name,
            swap.describe(),
        )
        memory.check_fits(model, chosen, swap.plan, device, check_vram=move_resident)
        swap.move_resident = move_resident
        swap.allocate_empty = allocate_empty
        swap._on_packed = on_packed
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
            if (
                config.transfer_compression == "auto"
                and swap.plan.compressed
                and device.type == "cuda"
            ):
                swap._auto = CompressionAutoSwitch(device)
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

    @property
    def model(self) -> nn.Module | None:
        """The swapped module; None after :meth:`remove` or once the module was collected."""
        return self._model() if self._model is not None else None

    def describe(self) -> str:
        """Where the plan puts each block, named by the device this swap computes on."""
        assert self.plan is not None, "describe() of a swap that was never applied"
        return self.plan.describe(self.device)

    # -- place ----------------------------------------------------------------------------

    def _place(self, chosen: list[SwapUnit]) -> None:
        assert self.model is not None and self.plan is not None
        placeholders = Placeholders()
        pin = self.device.type == "cuda"
        swapped_ids: set[int] = set()
        with torch.no_grad():
            for previous, unit in zip(chosen[-1:] + chosen[:-1], chosen):
                compress = self._compresses(unit, previous)
                stored = StoredUnit(unit, self.device, placeholders, compress)
                self.units.append(stored)  # before pack, so _undo restores a half-packed unit
            if self.allocate_empty:
                _allocate_empty_units(self.units, pin)
            for stored in self.units:
                if stored.is_empty and not self.allocate_empty:
                    stored.unbind()  # placeholders now; the loader allocates and fills it
                else:
                    stored.pack(pin)
                    if not stored.awaits_data:  # else a loader fills it; sealed at first use
                        stored.seal(self.device)
                    if self._on_packed is not None:
                        self._on_packed()
                swapped_ids.update(id(ref.get()) for ref in stored.unit.tensors)
            for ref in tensor_refs(self.model, "", set()) if self.move_resident else ():
                tensor = ref.get()
                if id(tensor) in swapped_ids or tensor.device == self.device:
                    continue
                self._moved.append((ref, tensor.device, kept_strides(tensor)))
                if tensor.device.type == "meta":  # a skeleton: the loader fills it
                    ref.replace(torch.empty(tensor.size(), dtype=tensor.dtype, device=self.device))
                else:
                    _move(ref, self.device)
        streams = DeviceStreams(self.device, timing=self.config.debug)
        provider: FixedSlots | WindowAllocator
        if self.plan.kind == "streamed":
            provider = WindowAllocator(
                streams, self.units, self.plan.window_bytes, self.config.prefetch_blocks
            )
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

    def _compresses(self, unit: SwapUnit, previous: SwapUnit) -> bool:
        """Whether ``unit`` travels packed (``previous`` runs before it, as far as the model's
        declared order tells). In a streamed plan its packed bytes take GPU memory too while
        it is in flight, so it travels packed only if it still fits in the window beside the
        unit before it: one that cannot be prefetched while that unit runs stalls the link
        for longer than packing saves (H100, Wan 14B at 1,560 tokens: packing the first
        projection of each block, which follows a 135 MiB FFN layer, cost time)."""
        assert self.plan is not None
        if not self.plan.compressed:
            return False
        window = self.plan.window_bytes
        needed = _packed(previous) + _packed(unit) * (1 + memory.PACKED_SHARE)
        return not window or needed <= window

    def _attach_hooks(self) -> None:
        assert self.model is not None and self.scheduler is not None
        scheduler = self.scheduler
        # One registration per line, its handle kept in the same line ([Note: apply is a
        # transaction]): a statement over several lines gives an interrupt a place between
        # registering a hook and keeping its handle, and the hook would outlive the undo.
        for index, stored in enumerate(self.units):
            module = stored.unit.module
            before, after = _unit_pre_hook(scheduler, index), _unit_post_hook(scheduler, index)
            self._hooks.append(module.register_forward_pre_hook(before))
            self._hooks.append(module.register_forward_hook(after, always_call=True))
            self._hooks.append(_register_state_dict_hook(module, stored.state_dict_hook))
        self._hooks.append(self.model.register_forward_pre_hook(self._begin_forward))
        self._hooks.append(self.model.register_forward_hook(self._end_forward, always_call=True))

    @property
    def ring(self) -> PrefetchScheduler | None:
        """The former name of :attr:`scheduler` (benchmarks read it)."""
        return self.scheduler

    @property
    def swapped_modules(self) -> set[nn.Module]:
        """Every module whose tensors (or whose descendants' tensors) this swap streams."""
        return {m for stored in self.units for m in stored.unit.module.modules()}

    def set_transform(self, transform: Any) -> None:
        """Run ``transform(unit_name, views)`` on the copy stream after each unit is copied
        to the GPU (e.g. to apply LoRA patches to the weights there). Clears what fixed slots
        cache, which was made under the previous transform."""
        assert self.scheduler is not None
        self.scheduler.transform = transform
        self.scheduler.invalidate()

    def slot_pool_key(self) -> tuple | None:
        """Swaps with equal keys share one set of GPU slots (see [Note: shared slots]); a host
        that counts VRAM per model should count those slots once. None without slots."""
        return self.scheduler.pool_key() if self.scheduler is not None else None

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
            for stored in self.units:
                stored.drop_compression()
        except BlockSwapError as error:  # pinning failed: the rest stay compressed (correct)
            logger.warning("transfer_compression: could not switch every unit to raw: %s", error)
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
        self.plan, self.config = plan, config
        provider.window_bytes = plan.window_bytes

    def ring_bytes_held(self) -> int:
        """GPU bytes swapped units take now: fixed slots once taken, or a streamed plan's
        layers in flight."""
        return self.scheduler.provider.held_bytes if self.scheduler is not None else 0

    def release_vram(self) -> None:
        """Free the GPU memory of swapped units until the next forward (e.g. when a host
        unloads the model)."""
        if self.scheduler is not None:
            self.scheduler.release_memory()

    def release_all(self) -> None:
        """Release whatever an interrupted forward left bound (idempotent)."""
        if self.scheduler is not None:
            self.scheduler.end_forward(completed=False)

    def swapped_tensor(self, name: str) -> "tuple[StoredUnit, int] | None":
        """The unit holding the parameter or buffer ``name`` and its index there, if swapped."""
        if not self._swapped_index:
            self._swapped_index = {
                ref.qualname: (stored, index)
                for stored in self.units
                for index, ref in enumerate(stored.unit.tensors)
            }
        return self._swapped_index.get(name)

    def destination(self, name: str) -> torch.Tensor:
        """Where the weights of the parameter or buffer ``name`` live now: its host-buffer view
        if swapped, else the tensor itself. Loaders write checkpoint data here."""
        assert self.model is not None
        found = self.swapped_tensor(name)
        if found is not None:
            stored, index = found
            if not stored.host_views:
                raise BlockSwapStateError(f"{stored.name} has no host buffer yet (allocate it)")
            if stored.transfer is not None:  # the caller writes: the packed copy goes stale
                if self.scheduler is not None:
                    self.scheduler.streams.synchronize()  # no copy may still read it
                    self.scheduler.invalidate()
                stored.unseal()
            return stored.host_views[index]
        module_path, _, attr = name.rpartition(".")
        owner = self.model.get_submodule(module_path) if module_path else self.model
        tensor = owner._parameters.get(attr)
        return tensor if tensor is not None else owner._buffers[attr]

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
        if self.scheduler is not None:
            self.scheduler.end_forward(completed=False)
            self.scheduler.close()
            self.scheduler = None
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        with torch.no_grad():
            for stored in self.units:
                stored.restore() if restore else stored.discard()
            for ref, device, strides in self._moved:
                tensor = ref.get()
                if tensor.device == device:  # recorded, but apply stopped before it moved
                    continue
                if not restore:
                    tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
                else:  # a lazily loaded skeleton's weights come back on the CPU
                    _move(ref, torch.device("cpu") if device.type == "meta" else device, strides)
        self.units.clear()
        self._moved.clear()
        self._swapped_index.clear()


def _move(ref: TensorRef, device: torch.device, strides: tuple[int, ...] | None = None) -> None:
    """Move one resident tensor, keeping its object where ``.data`` can be rebound; a wrapper
    tensor, whose device is fixed when it is made, is replaced ([Note: wrapper tensors]).
    ``strides``: the layout to give it there (moving back what apply moved)."""
    tensor = ref.get()
    with torch.inference_mode(tensor.is_inference()):
        if is_traceable_wrapper_subclass(tensor):
            ref.replace(tensor.to(device))
        else:
            tensor.data = copy_with_strides(tensor.data, device, strides, copy=False)


def _allocate_empty_units(units: list[StoredUnit], pin: bool) -> None:
    """Allocate the host buffers of units that have no data yet (a skeleton being loaded) on
    several threads: page-locking faults in and pins every page, which one core does at only
    a few GB/s, and the loader then fills the buffers in parallel too."""
    empty = [u for u in units if u.is_empty and u.host is None]
    if len(empty) < 2:
        return
    workers = min(8, os.cpu_count() or 1, len(empty))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blockswap-alloc") as pool:
        for future in [pool.submit(u.allocate, pin) for u in empty]:
            future.result()


# Hooks on swapped modules reach the scheduler and units weakly: a block holding its
# scheduler strongly would close a cycle (scheduler -> unit -> block -> hook -> scheduler),
# and the model could then only be freed by the cycle collector, late (see [Note: no strong
# path to the model]). The model's own hooks hold the BlockSwap, which holds the scheduler
# and the units.


def _unit_pre_hook(scheduler: PrefetchScheduler, index: int) -> Any:
    scheduler_ref = weakref.ref(scheduler)

    @torch.compiler.disable
    def hook(module: nn.Module, args: Any) -> None:
        scheduler = scheduler_ref()
        if scheduler is not None:
            scheduler.wait(index)

    return hook


def _unit_post_hook(scheduler: PrefetchScheduler, index: int) -> Any:
    scheduler_ref = weakref.ref(scheduler)

    @torch.compiler.disable
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        scheduler = scheduler_ref()
        if scheduler is not None:
            scheduler.release(index)

    return hook


def _register_state_dict_hook(module: nn.Module, hook: Any) -> Any:
    register = getattr(module, "register_state_dict_post_hook", None)
    if register is None:  # torch < 2.5
        register = module._register_state_dict_hook
    method = weakref.WeakMethod(hook)

    def state_dict_hook(*args: Any) -> None:  # a plain function: torch tags it
        bound = method()
        if bound is not None:
            bound(*args)

    return register(state_dict_hook)


def measure_model(model: nn.Module, layout: ModelLayout) -> tuple[dict[str, Any], ModelSizes]:
    """Candidate units of every granularity, and the sizes the planner needs."""
    shared = shared_tensor_ids(model)
    blocks = find_blocks(model, layout)
    block_units = {b.qualname: block_unit(b, shared) for b in blocks}
    layers = {b.qualname: layer_units(b, shared) for b in blocks}
    embeddings = {
        kind: [embedding_unit(model, path, shared) for path in paths if _exists(model, path)]
        for kind, paths in (("txt", layout.txt_emb), ("img", layout.img_emb))
    }
    total = sum(_packed(u) for u in (_whole_model_unit(model),))
    block_bytes = {name: _packed(unit) for name, unit in block_units.items()}
    # Outside the blocks, layers as large as a block's own streamed layers are worth a copy.
    smallest_block = min(block_bytes.values(), default=0)
    stream_layers = stream_layer_units(
        model,
        layout.stream_modules + layout.txt_emb + layout.img_emb,
        blocks,
        shared,
        max(1, int(smallest_block * LAYER_UNIT_MIN_SHARE)),
    )
    sizes = ModelSizes(
        txt_emb_packable_bytes=sum(_packable(u) for u in embeddings["txt"]),
        img_emb_packable_bytes=sum(_packable(u) for u in embeddings["img"]),
        blocks=tuple(
            BlockSizes(
                name=b.qualname,
                list_path=b.list_layout.path,
                role=b.role,
                nbytes=block_bytes[b.qualname],
                layer_bytes=tuple(_packed(u) for u in layers[b.qualname]),
                packable_bytes=_packable(block_units[b.qualname]),
            )
            for b in blocks
        ),
        other_bytes=max(0, total - sum(block_bytes.values())),
        txt_emb_bytes=sum(_packed(u) for u in embeddings["txt"]),
        img_emb_bytes=sum(_packed(u) for u in embeddings["img"]),
        stream_layer_bytes=tuple(_packed(u) for u in stream_layers),
        stream_layer_packable_bytes=sum(_packable(u) for u in stream_layers),
    )
    candidates = {
        "blocks": block_units,
        "layers": layers,
        "embeddings": embeddings,
        "stream_layers": stream_layers,
    }
    return candidates, sizes


def _choose_units(units: dict[str, Any], plan: SwapPlan) -> list[SwapUnit]:
    chosen: list[SwapUnit] = []
    if plan.kind == "streamed":  # the layers outside the blocks too
        chosen.extend(units["stream_layers"])
    if plan.offload_txt_emb:
        chosen.extend(units["embeddings"]["txt"])
    if plan.offload_img_emb:
        chosen.extend(units["embeddings"]["img"])
    kept = set(plan.kept_layers)
    for name in plan.swapped:
        if plan.swap_unit == "layer":
            chosen.extend(
                unit for i, unit in enumerate(units["layers"][name]) if (name, i) not in kept
            )
        else:
            chosen.append(units["blocks"][name])
    return chosen


def _exists(model: nn.Module, path: str) -> bool:
    try:
        resolve(model, path)
    except BlockSwapConfigError:
        return False
    return True


def _whole_model_unit(model: nn.Module) -> SwapUnit:
    return SwapUnit("", model, tensor_refs(model, "", set()), "model")


def _packable(unit: SwapUnit) -> int:
    """bf16 bytes in tensors large enough to travel compressed."""
    tensors = (leaf for ref in unit.tensors for leaf in leaves(ref.get()))
    return sum(2 * t.numel() for t in tensors if compressed_transfer.is_packable(t))


def _packed(unit: SwapUnit) -> int:
    pieces = (leaf for ref in unit.tensors for leaf in leaves(ref.get()))
    return PackedLayout.of((leaf.size(), leaf.dtype) for leaf in pieces).nbytes
