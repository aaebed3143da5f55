"""Block swap on a ComfyUI ModelPatcher, cooperating with core's memory management instead of
working around it. With :mod:`callbacks.comfy_weight_patches` and :mod:`callbacks.comfy_private`,
the only code that imports core.

- The swap goes on a private model that shares the loader's weights, never on the loader's
  own model ([Note: private model] in ``comfy_private``): a prompt without the node finds core's
  model as core left it, whatever ran before.
- The engine is applied *before* core loads the private model, with ``move_resident=False``:
  swapped blocks already hold 0-element placeholders and live in our pinned host buffers, so
  core loads, moves and counts only the resident part (no VRAM spike, true accounting). The
  slot ring is added to the patcher's size so core keeps room for it, and counted as loaded by
  one model at a time where models share it (Wan 2.2 A14B).
- Core's loader never sees the swapped modules: a per-instance ``_load_list`` filter, re-installed
  on every clone (``ON_CLONE``), keeps core from patching or moving them.
- LoRA and other weight patches on swapped keys are applied to each slot right after its copy,
  with core's own recipe (``comfy_weight_patches``), so outputs equal core's.
- ``ON_CLEANUP`` (run in a ``finally`` after sampling, also on interrupts) releases whatever an
  interrupted forward left bound.
- Preset "auto" packs nothing until the first sampling run: it then knows the latent, and
  plans for the VRAM that latent leaves (:func:`_fit_to_latent`; [Note: auto plans] in
  ``comfy_auto``).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
from .. import model_configs
from ..wan_blockswap import (
    BlockSwap,
    BlockSwapConfigError,
    BlockSwapStateError,
    InsufficientHostMemoryError,
    InsufficientMemoryError,
    ModelLayout,
    SwapConfig,
    get_block_swap,
)
from ..wan_blockswap.engine import measure_model
from ..wan_blockswap.plan import min_streamed_budget, plan_swap
from ..wan_blockswap.units import register_fused_weights

from . import comfy_auto, compressed_lookahead, copy_headroom
from .comfy_private import (
    clone_onto,
    existing_private,
    file_page_dropper,
    file_pages_dropped_as_modules_move,
    is_dynamic,
    origin_lookup,
    private_model,
    rebind_unloaded,
    release_file_pages,
    resident_weights_unload_onto_origins,
    shares_loader_memory,
    unload_everywhere,
)
from .comfy_weight_patches import (
    attach_gguf_patches,
    set_patch_transform,
    swapped_hook_patches,
    swapped_tensor_at,
)

logger = logging.getLogger("wan_blockswap")

KEY = "wan_blockswap"
CallbacksMP = comfy.patcher_extension.CallbacksMP
WrappersMP = comfy.patcher_extension.WrappersMP
GIB = 2**30


def _core_runs_fused(weight: torch.Tensor) -> bool:
    """Whether core's ``comfy.ops.linear_input_act`` runs a layer with ``weight`` in its fused
    kernel, reading the weight without calling the layer ([Note: fused parts] in
    ``wan_blockswap.units``): comfy-kitchen's INT8 tensors, not transposed."""
    return getattr(weight, "_layout_cls", None) == "TensorWiseINT8Layout" and not getattr(
        getattr(weight, "_params", None), "transposed", False
    )


register_fused_weights(_core_runs_fused)


@dataclass
class _State:
    """What one diffusion model carries while swapped."""

    swap: BlockSwap
    config: SwapConfig
    swapped_modules: set = field(default_factory=set)
    arch: str = ""  # the architecture record's name
    patches_uuid: Any = None
    hooks: Any = None  # the hook group whose patches the slot transform applies
    auto: bool = False  # re-plan for each latent's memory estimate (see _fit_to_latent)
    counts_ring: bool = False  # see [Note: shared slots, counted once]
    base_model: Any = None  # weakref to the BaseModel core counts this model's memory on
    # What auto's plan kept free for both conditionings in one batch (None: it kept no such
    # room), and the last pass core ran alone: see _note_split_batch
    cond_batch_room: "_BatchRoom | None" = None
    lone_pass: "_LonePass | None" = None

    @property
    def ring_bytes(self) -> int:
        assert self.swap.plan is not None
        return self.swap.plan.ring_bytes


_states: "weakref.WeakKeyDictionary[torch.nn.Module, _State]" = weakref.WeakKeyDictionary()


class _BatchRoom(NamedTuple):
    """Room a plan kept for both conditionings in one batch: see _note_split_batch."""

    reserve: float  # bytes the plan kept for the forward
    # bytes the plan left beside its resident weights: its reserve, what whole units did not
    # fill, a streamed plan's window and fixed slots (the step takes off what slots hold)
    left: float
    shape: Any  # the latent planned for


class _LonePass(NamedTuple):
    """A conditioning pass core ran alone, as things stood before its forward: see
    _note_split_batch."""

    index: int  # its place in ``cond_or_uncond`` (0 conditional, 1 unconditional)
    free: float  # free VRAM as core's batching rule read it
    slots: int  # bytes the swap's fixed slots held on the device
    call: Any  # core's ``sigmas`` at that step: one object for all the step's batches


def apply_to_patcher(patcher: Any, config: SwapConfig, auto: bool = False) -> Any:
    """A clone of ``patcher`` whose model, a private one sharing its weights, streams its
    blocks per ``config``; ``patcher`` and its model are left as they are.

    ``auto``: ``config`` carries every option but the plan; before each sampling run the plan
    is fitted to the free VRAM left by that latent's memory estimate (:func:`_fit_to_latent`).
    """
    _refuse_a_swapped_input(patcher)
    upstream_kind = "dynamic VRAM" if is_dynamic(patcher) else "static"
    private = private_model(patcher)
    comfy_auto.calibrate(private)  # core's estimates: measured ones once a forward ran
    diffusion_model = private.diffusion_model
    state = _states.get(diffusion_model)
    if auto:
        if state is not None and not (state.auto and _same_options(state.config, config)):
            remove_swap(private)
        _auto_options[diffusion_model] = config
    elif state is None or state.config != config or state.auto:
        if state is not None or get_block_swap(diffusion_model) is not None:
            remove_swap(private)
        _auto_options.pop(diffusion_model, None)
        state = _swap_loaded_weights(private, config, patcher.load_device, auto=False)
    clone = clone_onto(patcher, private)
    install_callbacks(clone)
    if auto:
        clone.add_wrapper_with_key(WrappersMP.PREPARE_SAMPLING, KEY, _fit_to_latent)
        clone.add_wrapper_with_key(WrappersMP.APPLY_MODEL, KEY, _measure_need)
    clone.size = _reported_size(clone)
    logger.info(
        "wan_blockswap: input model is %s (%s patcher); the swapped copy loads as a static "
        "model%s",
        type(patcher.model).__name__,
        upstream_kind,
        ", planned at the first sampling run (preset auto)" if auto else "",
    )
    return clone


def _refuse_a_swapped_input(patcher: Any) -> None:
    """The node swaps a private copy that shares the input's weights; an input whose blocks
    some other swap already holds (WAN BlockSwap Model Loader's, or the library's on a model
    handed in) has placeholders where those weights belong, which a copy would share."""
    base_model = patcher.model
    if existing_private(base_model) is not None:  # one of ours: re-planned as it is
        return
    diffusion_model = getattr(base_model, "diffusion_model", None)
    if diffusion_model is None or get_block_swap(diffusion_model) is None:
        return
    raise BlockSwapConfigError(
        f"WAN BlockSwap got a {type(base_model).__name__} whose blocks are swapped already "
        f"(by WAN BlockSwap Model Loader, which keeps them out of RAM until they are used, or "
        f"by apply_block_swap), so it has no weights to share with a swapped copy. Set the "
        f"plan on the loader (its preset and block widgets) and leave this node out, or load "
        f"the model with core's Load Diffusion Model node to swap it here."
    )


# Options of an "auto" node whose plan is not made yet (it is made at the first sampling run)
_auto_options: "weakref.WeakKeyDictionary[torch.nn.Module, SwapConfig]" = (
    weakref.WeakKeyDictionary()
)


def _same_options(a: SwapConfig, b: SwapConfig) -> bool:
    """Equal but for the plan's size (what "auto" chooses itself)."""
    plan_fields = dict(
        vram_budget_gb=None, blocks_to_swap=None, resident_blocks=None, swap_unit="auto"
    )
    return dataclasses.replace(a, **plan_fields) == dataclasses.replace(b, **plan_fields)


def resident_bytes(model: torch.nn.Module, swap: BlockSwap) -> int:
    """What core's ``module_size`` would count if it saw only what stays on the GPU.

    ``module_size`` sums ``state_dict()``, where our state-dict hook puts the swapped weights
    back (so saving and merging see real weights); subtract those.
    """
    return comfy.model_management.module_size(model) - swap.swapped_host_bytes()


def _reported_size(patcher: Any) -> int:
    """The size core should count for ``patcher``: what stays on the GPU plus the slot ring,
    or, with no swap applied yet, the whole model (0 lets core measure it)."""
    state = _states.get(patcher.model.diffusion_model)
    if state is None:
        return 0
    return resident_bytes(patcher.model, state.swap) + state.ring_bytes


def _swap_loaded_weights(
    base_model: Any,
    config: SwapConfig,
    device: torch.device,
    auto: bool,
    layout: ModelLayout | None = None,
) -> _State:
    """Apply the engine to a (private) model whose weights exist, not a skeleton being loaded;
    ``layout``: the architecture's own unless given."""
    # Core may hold this model loaded: give its weights back to the offload device first,
    # so packing reads them from there and core's accounting starts again from zero.
    unload_everywhere(base_model)
    diffusion_model = base_model.diffusion_model
    arch = model_configs.detect(diffusion_model)
    swap = BlockSwap.apply(
        diffusion_model,
        config,
        layout or arch.layout,
        device,
        move_resident=False,
        after_weights_read=file_page_dropper(base_model),
    )
    release_file_pages(base_model)
    return register_swap(diffusion_model, swap, config, arch.name, auto)


def _replan_loaded_weights(base_model: Any, state: _State, config: SwapConfig) -> _State | None:
    """Re-plan the private model's swap in place ([Note: re-planning in place] in the
    engine): units swapped under both plans stay packed. None where the engine cannot (blocks
    on a donor GPU, host RAM short for what it would add), having removed the swap for the
    caller to apply again; whatever else stops it leaves the model unswapped, every weight
    back, and propagates."""
    unload_everywhere(base_model)  # core must not hold placeholders, nor weights to be packed
    swap = state.swap
    started = time.perf_counter()
    try:
        counts = swap.replan(config, origin_lookup(base_model))
    except (BlockSwapStateError, InsufficientHostMemoryError) as error:
        logger.info("wan_blockswap auto: packing the model again (%s)", error)
        remove_swap(base_model)
        return None
    except BaseException:
        remove_swap(base_model)  # the engine removed the swap; our records go too
        raise
    try:
        # first: a state whose records (swapped modules, patches) are the new plan's
        replanned = register_swap(base_model.diffusion_model, swap, config, state.arch, auto=True)
        # units the plan keeps on the GPU point at the shared memory (the engine's replan
        # took it from origin_lookup); core's unload moved the resident weights back as
        # copies, and a unit it could not point so came back as one: the shared memory again
        rebind_unloaded(base_model, swap.swapped_tensor_ids())
        release_file_pages(base_model)
    except BaseException:
        remove_swap(base_model)
        raise
    logger.info(
        "wan_blockswap auto: re-planned in place in %.2f s: %d units stayed packed, %d were "
        "packed, %d went back to the GPU's share",
        time.perf_counter() - started,
        counts.kept,
        counts.packed,
        counts.restored,
    )
    return replanned


def register_swap(
    diffusion_model: torch.nn.Module,
    swap: BlockSwap,
    config: SwapConfig,
    arch: str,
    auto: bool = False,
) -> _State:
    state = _State(swap, config, swap.swapped_modules, arch=arch, auto=auto)
    _states[diffusion_model] = state
    comfy_auto.note_cutting(diffusion_model, swap.cuts_token_wise)
    logger.info(
        "wan_blockswap on %s (%s):\n%s",
        type(diffusion_model).__name__,
        arch,
        swap.describe(),
    )
    return state


def remove_from_model(patcher: Any) -> None:
    """Undo the swap made for ``patcher`` (the node's input or one of its outputs): the
    private model's weights go back where they were. The loader's model was never changed."""
    private = existing_private(patcher.model)
    if private is not None:
        remove_swap(private)


def remove_swap(base_model: Any) -> None:
    """Undo the swap on the private model ``base_model``, if any."""
    unload_everywhere(base_model)
    diffusion_model = base_model.diffusion_model
    _auto_options.pop(diffusion_model, None)
    state = _states.pop(diffusion_model, None)
    swap = state.swap if state is not None else get_block_swap(diffusion_model)
    if swap is not None:
        swap.remove()
        rebind_unloaded(base_model, set())  # the restored copies: the shared memory again


def install_callbacks(patcher: Any) -> None:
    """Our callbacks and method overrides on ``patcher`` (clones get them again)."""
    _install_overrides(patcher)
    patcher.add_callback_with_key(CallbacksMP.ON_CLONE, KEY, _on_clone)
    patcher.add_callback_with_key(CallbacksMP.ON_LOAD, KEY, _on_load)
    patcher.add_callback_with_key(CallbacksMP.ON_CLEANUP, KEY, _on_cleanup)
    patcher.add_callback_with_key(CallbacksMP.ON_DETACH, KEY, _on_detach)


def _filtered_load_list(self: Any, *args: Any, **kwargs: Any) -> list:
    """Core's load list without the modules we stream (entries end in ``(module, params)``)."""
    entries = type(self)._load_list(self, *args, **kwargs)
    state = _states.get(self.model.diffusion_model)
    if state is None:
        return entries
    return [entry for entry in entries if entry[-2] not in state.swapped_modules]


def _hook_patch_skipping_swapped(
    self: Any,
    hooks: Any,
    combined_patches: dict,
    key: str,
    original_weights: Any,
    memory_counter: Any,
) -> None:
    """Core's hook (scheduled LoRA) patching of one weight, skipped for swapped weights: core
    would copy the patched weight into a 0-element placeholder; the slot transform patches
    those instead (:func:`_patch_hooks`)."""
    state = _states.get(self.model.diffusion_model)
    if state is not None and key in combined_patches:
        if swapped_tensor_at(state.swap, key) is not None:
            return None
    return type(self).patch_hook_weight_to_device(
        self, hooks, combined_patches, key, original_weights, memory_counter
    )


def _patch_hooks(self: Any, hooks: Any) -> None:
    """Core switches hook groups (scheduled LoRA keyframes) here, between model calls: core
    patches the resident weights, the slot transform takes the swapped weights' patches (the
    next copies apply them; prefetched copies are dropped)."""
    state = _states.get(self.model.diffusion_model)
    if state is None:
        return type(self).patch_hooks(self, hooks)
    hook_patches = swapped_hook_patches(self, state.swap, hooks)  # refuses before patching
    type(self).patch_hooks(self, hooks)
    _set_transform(self, state, hooks, hook_patches)


def _set_transform(patcher: Any, state: _State, hooks: Any, hook_patches: dict) -> None:
    set_patch_transform(patcher, state.swap, hook_patches)
    state.patches_uuid = patcher.patches_uuid
    state.hooks = hooks


def _install_overrides(patcher: Any) -> None:
    """Per-instance method overrides; clones copy callbacks but not these, see _on_clone."""
    patcher._load_list = _WeaklyBound(_filtered_load_list, patcher)
    patcher.patch_hook_weight_to_device = _WeaklyBound(_hook_patch_skipping_swapped, patcher)
    patcher.patch_hooks = _WeaklyBound(_patch_hooks, patcher)
    patcher.partially_load = _WeaklyBound(_load_as_planned, patcher)
    patcher.unpatch_model = _WeaklyBound(_unload_onto_shared_memory, patcher)
    patcher.partially_unload = _WeaklyBound(_partially_unload_onto_shared_memory, patcher)
    if hasattr(type(patcher), "pin_weight_to_device"):
        patcher.pin_weight_to_device = _WeaklyBound(_pin_unless_shared, patcher)


def _pin_unless_shared(self: Any, key: str) -> Any:
    """Core's page-locking of a weight it moved off the GPU or left on the CPU, unless it is
    the loader's memory ([Note: unloading onto the shared memory] in ``comfy_private``):
    ours to lock only where it is a copy of our own."""
    weight = comfy.model_patcher.get_key_weight(self.model, key)[0]
    if shares_loader_memory(self.model, key, weight):
        return None
    return type(self).pin_weight_to_device(self, key)


def _resident_modules(
    model: torch.nn.Module, state: "_State | None", buffers: bool = False
) -> Iterator[tuple[str, torch.nn.Module]]:
    """``model``'s modules that are not swapped and hold parameters of their own (or
    buffers, where ``buffers``), by name."""
    swapped = state.swapped_modules if state is not None else set()
    for name, module in model.named_modules():
        if module in swapped:
            continue
        tables = (module._parameters, module._buffers) if buffers else (module._parameters,)
        if any(t is not None for table in tables for t in table.values()):
            yield name, module


def _unload_onto_shared_memory(
    self: Any, device_to: Any = None, unpatch_weights: bool = True
) -> Any:
    """Core's unpatch, but a whole unload points the resident weights at the loader's memory
    as they leave the GPU instead of copying them into RAM ([Note: unloading onto the shared
    memory] in ``comfy_private``)."""
    if not unpatch_weights or device_to is None:
        return type(self).unpatch_model(self, device_to, unpatch_weights)
    with _moving_onto_shared_memory(self, device_to):
        return type(self).unpatch_model(self, device_to, unpatch_weights)


def _partially_unload_onto_shared_memory(
    self: Any, device_to: Any, *args: Any, **kwargs: Any
) -> Any:
    """Core's partial unload (room for another model), but resident weights it moves point
    at the loader's memory instead of staying in RAM as copies until the next load ([Note:
    unloading onto the shared memory] in ``comfy_private``)."""
    if device_to is None:
        return type(self).partially_unload(self, device_to, *args, **kwargs)
    with _moving_onto_shared_memory(self, device_to):
        return type(self).partially_unload(self, device_to, *args, **kwargs)


def _moving_onto_shared_memory(patcher: Any, device_to: Any) -> Any:
    """The watch under which core's unloads of ``patcher``'s (private) model move resident
    weights onto the loader's memory; never while hook patches are in the weights."""
    state = _states.get(patcher.model.diffusion_model)
    skip = state.swap.swapped_tensor_ids() if state is not None else set()
    resident = _resident_modules(patcher.model, state, buffers=True)
    # an object patch on a tensor of its own: core puts it back after the move
    object_patched = set(getattr(patcher, "object_patches_backup", ()))
    return resident_weights_unload_onto_origins(
        patcher.model,
        resident,
        device_to,
        skip,
        lambda: not getattr(patcher, "hook_backup", None),
        object_patched,
    )


def _load_as_planned(
    self: Any, device_to: Any, extra_memory: float = 0, force_patch_weights: bool = False
) -> Any:
    """Core's partial load, but a swapped model loads all it keeps on the GPU: its plan
    already budgeted that VRAM, and core's own budget (free VRAM minus its estimate for the
    latent, which on Wan is about twice what the forward uses) would leave resident blocks
    on the CPU for core to stream a second, slower way. Shrinking (negative) passes through."""
    state = _states.get(self.model.diffusion_model)
    if state is None:
        return type(self).partially_load(self, device_to, extra_memory, force_patch_weights)
    if extra_memory > 0:
        extra_memory = 1e32
    # walked only where weights are mapped: see [Note: file pages while core loads]
    resident = (module for _, module in _resident_modules(self.model.diffusion_model, state))
    with file_pages_dropped_as_modules_move(self.model, resident, self):
        return type(self).partially_load(self, device_to, extra_memory, force_patch_weights)


class _WeaklyBound:
    """``function`` bound to ``patcher`` without keeping it alive. A method bound the usual
    way and stored on its own instance is a reference cycle: core's patchers, freed by
    reference counting otherwise, would wait for the cycle collector, and so would the model
    and its loaded-model entry (whose finalizer, firing inside core's free_memory loop, makes
    that loop pop past the end of its list)."""

    def __init__(self, function: Any, patcher: Any) -> None:
        self.function = function
        self.patcher = weakref.ref(patcher)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(self.patcher(), *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> "_WeaklyBound":
        # a deep-copied patcher is in ``memo`` by the time its attributes are copied
        patcher = self.patcher()
        return _WeaklyBound(self.function, memo.get(id(patcher), patcher))


def _on_clone(source: Any, clone: Any) -> None:
    _install_overrides(clone)


def _on_load(
    patcher: Any,
    device_to: Any,
    lowvram_model_memory: int,
    force_patch_weights: bool,
    full_load: bool,
) -> None:
    # The file pages core's load just read are on the GPU now: drop them at once rather than
    # at the end of the node, so RAM holds our pinned blocks and not the resident ones too.
    drop = file_page_dropper(patcher.model)
    if drop is not None:
        drop()
    release_file_pages(patcher.model)
    state = _states.get(patcher.model.diffusion_model)
    if state is None:
        return
    # the hooks core believes are applied (it skips re-applying them while unchanged)
    hooks = patcher.current_hooks
    if patcher.patches_uuid != state.patches_uuid or hooks is not state.hooks:
        _set_transform(patcher, state, hooks, swapped_hook_patches(patcher, state.swap, hooks))
    attach_gguf_patches(patcher, state.swap)
    # On a full load core counted model_size(), ring included; on a partial one, none of it.
    counted_by_core = full_load
    state.base_model = weakref.ref(patcher.model)
    state.counts_ring = not any(other.counts_ring for other in _loaded_sharers(state))
    if state.counts_ring and not counted_by_core:
        patcher.model.model_loaded_weight_memory += state.ring_bytes
    elif counted_by_core and not state.counts_ring:
        patcher.model.model_loaded_weight_memory -= state.ring_bytes


# [Note: shared slots, counted once]
# Wan 2.2 A14B's two models share one set of GPU slots (wan_blockswap.slot_pool), while core
# keeps a loaded size per model. So one loaded model counts the slots: the first to load.
# When it unloads and the other stays loaded, the count moves to the other. model_size()
# keeps the slots in both: what loading a model may need when the other is gone.


def _loaded_sharers(state: _State) -> list[_State]:
    """Loaded models, other than ``state``'s, whose swaps share its slots."""
    key = state.swap.slot_pool_key()
    if key is None:
        return []
    return [
        other
        for other in list(_states.values())
        if other is not state and _is_loaded(other) and other.swap.slot_pool_key() == key
    ]


def _is_loaded(state: _State) -> bool:
    base_model = state.base_model() if state.base_model is not None else None
    return base_model is not None and getattr(base_model, "model_loaded_weight_memory", 0) > 0


def _pass_ring_count_on(state: _State) -> None:
    """``state``'s model was unloaded: a loaded model sharing its slots counts them now."""
    if not state.counts_ring:
        return
    state.counts_ring = False
    for heir in _loaded_sharers(state)[:1]:
        heir.counts_ring = True
        heir.base_model().model_loaded_weight_memory += heir.ring_bytes


def _on_cleanup(patcher: Any) -> None:
    state = _states.get(patcher.model.diffusion_model)
    if state is not None:
        state.swap.release_all()


def _on_detach(patcher: Any, unpatch_all: bool) -> None:
    # Core unloaded the model: give the slots back too (shared slots stay while another model
    # uses them), and point resident weights core moved back as copies at the shared memory.
    # A garbage-collected clone detaches with unpatch_all=False: leave it be.
    if not unpatch_all:
        return
    state = _states.get(patcher.model.diffusion_model)
    swapped: set[int] = set()
    if state is not None:
        state.swap.release_vram()
        _pass_ring_count_on(state)
        swapped = state.swap.swapped_tensor_ids()
    rebind_unloaded(patcher.model, swapped)
    _report_left_on_gpu(patcher.model)


def _counted_not_held(device: torch.device) -> int:
    """Bytes that core counts as loaded for our models on ``device`` but that the GPU does not
    hold now, so free VRAM has them already: a streamed window between forwards (its layers
    come and go inside each forward), slots whose pool is not allocated yet. A pool that a
    model sharing it holds (Wan 2.2 A14B) is held, and so is its staging. Counted as loaded
    and as free, they were counted twice: on an H100 at 81 frames (8 Wan-14B blocks, 7 GiB
    free) a 0.80 GiB window made auto see 7.03 GiB where 6.23 could be had, plan for 1.97 GiB
    of weights, then for 1.17 at the next prompt, and repack the model at every prompt, at
    1.45x core's s/it (benchmarks/results/comfyui_dynamic_h100/session18_8blocks.json)."""
    return sum(
        max(0, state.ring_bytes - state.swap.ring_bytes_on_device())
        for state in list(_states.values())
        if state.counts_ring and _is_loaded(state) and state.swap.device == torch.device(device)
    )


def _report_left_on_gpu(model: torch.nn.Module) -> None:
    """A warning when weights stay on a GPU after core unloaded the model. On the H200 a server
    that ran the node kept about 5 GiB of VRAM after /free (benchmarks/results/
    comfyui_dynamic_h200.json, session_8); this says whether our model's tensors are what
    kept it."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    left = sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")
    if left:
        logger.warning(
            "wan_blockswap: %.2f GiB of %s's weights are still on the GPU after core unloaded it",
            left / GIB,
            type(model).__name__,
        )


def _fit_to_latent(executor: Any, patcher: Any, noise_shape: Any, conds: dict, **kwargs: Any):
    """Preset "auto", before core loads the model for sampling: see [Note: auto plans] in
    ``comfy_auto``. Of the reserves core's rules ask for, the plan that moves the fewest bytes
    per sampling step."""
    base_model = patcher.model
    options = _auto_options.get(base_model.diffusion_model)
    if options is not None:
        available = comfy_auto.available_vram(patcher) - _counted_not_held(patcher.load_device)
        diffusion_model = base_model.diffusion_model
        unswapped = _unswapped_of(base_model)
        wanted = comfy_auto.planning_layout(diffusion_model, noise_shape, unswapped.layout, options)
        cutting = _has_token_wise(wanted)
        reserve, plan = _least_moving(
            patcher, noise_shape, conds, unswapped.sizes[wanted], available, cutting
        )
        need = comfy_auto.measured(diffusion_model, noise_shape)
        runs_whole, why_whole = False, ""
        if (
            cutting
            and need is not None
            and need.chunked
            and need.whole_per_sample
            and not unswapped.keeps_token_wise  # they stay: see _layout_to_plan
        ):  # run whole where that moves no more: [Note: the need without chunks]
            whole = wanted.without_token_wise()
            whole_reserve, whole_plan = _least_moving(
                patcher, noise_shape, conds, unswapped.sizes[whole], available, False
            )
            hidden = _copies_hide(diffusion_model, noise_shape, whole_plan, plan)
            why_whole = _runs_whole(
                whole_reserve, whole_plan, reserve, plan, unswapped.sizes[whole], hidden
            )
            if why_whole:
                wanted, reserve, runs_whole = whole, whole_reserve, True
        logger.info(
            "wan_blockswap auto: %.2f GiB of VRAM can be had, %.2f GiB kept for the forward "
            "(%s%s)",
            available / GIB,
            reserve.bytes / GIB,
            reserve.why,
            f"; token-wise parts run whole, {why_whole}" if runs_whole else "",
        )
        comfy_auto.new_plan(diffusion_model)
        _fit(patcher, options, unswapped, wanted, available, reserve.bytes, runs_whole)
        state = _states.get(diffusion_model)
        if state is not None:  # see _note_split_batch
            applied = state.swap.plan
            swaps = applied is not None and applied.swapped_bytes > 0
            state.cond_batch_room = None
            if reserve.cond_batch and swaps:
                left = available - applied.resident_bytes
                state.cond_batch_room = _BatchRoom(reserve.bytes, left, noise_shape)
            state.lone_pass = None
    return executor(patcher, noise_shape, conds, **kwargs)


def _least_moving(
    patcher: Any, noise_shape: Any, conds: dict, sizes: Any, available: float, cutting: bool
) -> tuple[comfy_auto.Reserve, Any]:
    """Of the reserves core's rules ask for (``comfy_auto.reserves``), the one whose plan for
    ``sizes`` moves the fewest bytes per sampling step, and that plan (None below every plan:
    then the smallest reserve)."""
    options = _auto_options[patcher.model.diffusion_model]
    choices = comfy_auto.reserves(patcher, noise_shape, conds, cutting)
    best, best_plan, least_moved = choices[-1], None, None
    for choice in choices:
        plan = _plan_within(sizes, options, available - choice.bytes)
        if plan is None:
            continue
        moved = _moved(choice, plan)
        if least_moved is None or moved < least_moved:
            best, best_plan, least_moved = choice, plan, moved
    return best, best_plan


def _moved(reserve: comfy_auto.Reserve, plan: Any) -> int:
    """Bytes ``plan`` moves per sampling step with ``reserve`` kept for the forward."""
    return plan.swapped_bytes * reserve.forwards_per_step


def _copies_hide(
    diffusion_model: torch.nn.Module, noise_shape: Any, whole_plan: Any, cut_plan: Any
) -> bool:
    """Whether the whole need's plan, two fixed slots or more like the cut one's, moves bytes
    that hide behind the forward timed for this latent ([Note: copies hidden behind compute]
    in ``copy_headroom``). A forward is counted as the latent's batch alone, as if core ran
    the two conditionings apart (it may, whatever was kept for them): the least compute."""
    if whole_plan is None or cut_plan is None or not whole_plan.swapped_bytes:
        return False
    if any(plan.kind != "slots" or plan.num_slots < 2 for plan in (whole_plan, cut_plan)):
        return False
    return copy_headroom.copies_hide(
        diffusion_model,
        comfy_auto.shape_key(noise_shape),
        int(noise_shape[0]),
        whole_plan.swapped_bytes,
        _meter,
    )


def _runs_whole(
    whole_reserve: comfy_auto.Reserve,
    whole_plan: Any,
    cut_reserve: comfy_auto.Reserve,
    cut_plan: Any,
    whole_sizes: Any,
    copies_hide: bool = False,
) -> str:
    """Why a latent that was cut runs its token-wise parts whole ("": it does not): where the
    plan its whole need leaves moves fewer bytes per step, or as many (chunks cost time)
    through a window no smaller, or one that holds its two largest units (a streamed plan
    moves every layer whatever its window; a window that small makes copies wait: [Note: the
    need without chunks]), or more where both plans are fixed slots whose copies hide behind
    compute (``copies_hide``: [Note: copies hidden behind compute] in ``copy_headroom``)."""
    if whole_plan is None:
        return ""
    no_more = "which moves no more"
    if cut_plan is None:
        return no_more
    whole_moved, cut_moved = _moved(whole_reserve, whole_plan), _moved(cut_reserve, cut_plan)
    if (
        copies_hide
        and whole_moved > cut_moved
        and whole_reserve.forwards_per_step == cut_reserve.forwards_per_step
    ):
        return "whose copies hide behind compute"
    # Two streamed plans at as many forwards per step move every layer: a tie, though a
    # grouped part's unit carries its small tensors too ([Note: grouped parts] in units)
    tie = (
        whole_plan.kind == cut_plan.kind == "streamed"
        and whole_reserve.forwards_per_step == cut_reserve.forwards_per_step
    )
    if whole_moved != cut_moved and not tie:
        return no_more if whole_moved < cut_moved else ""
    largest = max((max(b.layer_bytes, default=0) for b in whole_sizes.blocks), default=0)
    wide = whole_plan.window_bytes >= min(cut_plan.window_bytes, 2 * largest)
    return no_more if wide else ""


@dataclass
class _Unswapped:
    """A private model as auto's planner sees it, measured while no swap is applied:
    placeholders hide a swapped block's bytes, from the planner and from the generic
    architecture rule alike (which would then find other block lists, or none)."""

    layout: ModelLayout  # the architecture's
    sizes: dict  # ModelLayout -> ModelSizes, for it and for it without token-wise parts
    # The token-wise units came back after auto had dropped them: latents that are cut and
    # latents that are not take turns, and each turn would repack the model, so they stay
    keeps_token_wise: bool = False
    # The plan in use keeps every weight resident, taken within the block of slack
    # (ALL_RESIDENT_SLACK)
    all_resident_by_slack: bool = False
    # Such a plan had to give way to one that swaps: latents whose budgets lie either side of
    # "everything fits" take turns, and each turn back would repack the model, so from now on
    # growing keeps the block of slack there too. A first plan that had every weight resident
    # because VRAM was to spare does not count.
    left_all_resident: bool = False


_unswapped: "weakref.WeakKeyDictionary[torch.nn.Module, _Unswapped]" = weakref.WeakKeyDictionary()


def _unswapped_of(base_model: Any) -> _Unswapped:
    """``base_model``'s diffusion model as before any swap (measured now if none is applied)."""
    diffusion_model = base_model.diffusion_model
    if diffusion_model not in _states:
        layout = model_configs.detect(diffusion_model).layout
        variants = (layout, layout.without_token_wise())
        sizes = {each: measure_model(diffusion_model, each)[1] for each in variants}
        previous = _unswapped.get(diffusion_model)
        keeps = previous is not None and previous.keeps_token_wise
        left = previous is not None and previous.left_all_resident
        _unswapped[diffusion_model] = _Unswapped(layout, sizes, keeps, left)
    found = _unswapped.get(diffusion_model)
    assert found is not None, "auto measures a model before it swaps it"
    return found


def _has_token_wise(layout: ModelLayout) -> bool:
    return any(bl.token_wise for bl in layout.block_lists)


def _layout_to_plan(
    state: _State | None,
    unswapped: _Unswapped,
    wanted: ModelLayout,
    options: SwapConfig,
    budget: float,
    runs_whole: bool = False,
) -> ModelLayout:
    """The layout to cut the units by: ``wanted`` (see ``comfy_auto.planning_layout``), but a
    swap whose token-wise parts are units keeps them where dropping them would move no fewer
    bytes (nothing streams in layer units, say), or where they came back once already: a
    re-plan repacks the model, and their chunker cuts nothing for a latent that needs none.
    A swap without them always gets them back when wanted: a latent that is cut, or not
    measured yet, needs the lower peak. ``runs_whole``: ``wanted`` drops them for a latent
    that is cut, its plans already weighed with the need each way ([Note: the need without
    chunks]); only their coming back once keeps them then."""
    if state is None or state.swap.layout == wanted:
        return wanted
    if _has_token_wise(wanted):
        unswapped.keeps_token_wise = True
        return wanted
    kept = state.swap.layout
    if unswapped.keeps_token_wise:
        return kept
    if runs_whole:
        return wanted
    with_wanted = _plan_within(unswapped.sizes[wanted], options, budget)
    with_kept = _plan_within(unswapped.sizes[kept], options, budget)
    if with_wanted is None:  # below every plan of either cut: the smaller least window
        return wanted if with_kept is None else kept
    if with_kept is None or with_wanted.swapped_bytes < with_kept.swapped_bytes:
        return wanted
    return kept


def _budget_config(options: SwapConfig, budget: float) -> SwapConfig:
    return dataclasses.replace(
        options, vram_budget_gb=(budget + 0.5) / GIB, blocks_to_swap=None, resident_blocks=None
    )


def _plan_within(sizes: Any, options: SwapConfig, budget: float) -> Any:
    """The plan for ``budget`` bytes of weights, or None below the least plan."""
    if budget <= 0:
        return None
    try:
        return plan_swap(sizes, _budget_config(options, budget))
    except InsufficientMemoryError:
        return None


_meter = comfy_auto.CudaMeter()


def _measure_need(executor: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """Preset "auto": what this forward needed beside the weights, kept per latent shape for
    the next plan and for core's estimates; see [Note: auto plans] in ``comfy_auto``."""
    base_model = executor.class_obj
    diffusion_model = base_model.diffusion_model
    state = _states.get(diffusion_model)
    if state is None or not _meter.applies(x.device):
        return executor(x, *args, **kwargs)
    options = args[4] if len(args) > 4 else kwargs.get("transformer_options")
    uncond = 1 in (options or {}).get("cond_or_uncond", ())
    _note_split_batch(state, base_model, options, x)
    if comfy_auto.is_measured(diffusion_model, x.shape):
        if uncond:
            comfy_auto.note_uncond(diffusion_model, x.shape)
        timed = copy_headroom.RUN_WHOLE_WHERE_COPIES_HIDE
        clock = _meter.start_clock(x.device) if timed else None
        try:
            output = executor(x, *args, **kwargs)
        except (torch.cuda.OutOfMemoryError, InsufficientMemoryError) as error:
            if not comfy_auto.is_vram_oom(error):
                raise
            message = str(error).partition("\n")[0] or type(error).__name__
        else:
            if timed:  # [Note: copies hidden behind compute]
                key = comfy_auto.shape_key(x.shape)
                stopped = _meter.stop_clock(clock)
                copy_headroom.note_forward(diffusion_model, key, int(x.shape[0]), stopped)
                copy_headroom.note_copy_rate(diffusion_model, state.swap.copy_rate)
            return output
        # Out of the except block its traceback, which held the failed forward's frames and
        # their activations, is gone. See [Note: a forward out of memory] in comfy_auto.
        gc.collect()  # frames that traceback held in a reference cycle
        comfy_auto.grow_after_oom(diffusion_model, x.shape)
        logger.warning(
            "wan_blockswap auto: a forward of %s ran out of VRAM (%s); running it again over an "
            "emptied allocator cache, and the next plan keeps %.0f%% more for it",
            comfy_auto.shape_key(x.shape),
            message,
            (comfy_auto.OOM_GROWTH - 1) * 100,
        )
        _meter.release_cached(x.device)
        return executor(x, *args, **kwargs)  # a second failure goes to core as it is
    device = x.device
    held_before = state.swap.ring_bytes_on_device()
    chunked_before = state.swap.chunked_calls()
    _meter.release_cached(device)
    before = _meter.allocated(device)
    _meter.reset_peak(device)
    whole_parts = comfy_auto.WholePartEstimate(_meter, device)
    state.swap.observe_first_chunks(whole_parts)  # [Note: the need without chunks]
    try:
        output = executor(x, *args, **kwargs)
    finally:
        state.swap.observe_first_chunks(None)
        whole_parts.abandon()
    peaks, whole_peaks = whole_parts.peaks(), whole_parts.whole_peaks()
    # Our weights in flight are not the forward's need: a streamed plan's window comes and
    # goes inside the forward; fixed slots that a first forward takes stay.
    plan = state.swap.plan
    assert plan is not None
    ours = plan.ring_bytes if plan.kind == "streamed" else 0
    ours = max(ours, state.swap.ring_bytes_on_device() - held_before)
    need = comfy_auto.forward_need(before, peaks.allocated, peaks.reserved, ours)
    whole: int | None = None  # not known where a first chunk ran unwatched
    if not whole_parts.unwatched:
        whole = comfy_auto.forward_need(before, whole_peaks.allocated, whole_peaks.reserved, ours)
    chunked = state.swap.chunked_calls() > chunked_before
    cutting = state.swap.cuts_token_wise
    if comfy_auto.record(diffusion_model, x.shape, need, uncond, chunked, whole, cutting):
        logger.info(
            "wan_blockswap auto: a forward of %s (batch %d) needed %.2f GiB%s (%.2f GiB "
            "allocated before it; %s)",
            comfy_auto.shape_key(x.shape),
            x.shape[0],
            need / GIB,
            (
                f", {whole / GIB:.2f} GiB had its token-wise parts run whole"
                if chunked and whole is not None
                else ""
            ),
            before / GIB,
            _meter.describe(device, peaks),
        )
    return output


def _note_split_batch(state: _State, base_model: Any, options: dict | None, x: Any) -> None:
    """Say, once per plan, that core ran a step's conditional and unconditional passes (0 and
    1 in ``cond_or_uncond``) as separate forwards though auto kept room for them in one batch:
    each step then moves the swapped weights twice. Core's batching rule reads the free VRAM
    before each batch it runs ([Note: auto plans]); where too little is free it runs the
    unconditional pass first, so the reading that split the step is the one before that
    pass, taken here before its forward runs, with what the fixed slots held then (a plan's
    first forward takes them). The conditional pass first, or the VRAM free, means the cause
    was not memory: conditionings core cannot join, or a guidance node that runs the two
    apart. Only two lone passes of one sampling step count (core's ``sigmas``, one object for
    the step's calls): not a cfg-1 run. The figures are for one conditioning of each kind.
    Where memory split the step, later plans of the latent keep, beside the batch's need,
    what was taken since the plan plus BATCH_SHORTFALL_SLACK
    (``comfy_auto.note_batch_shortfall``)."""
    if state.cond_batch_room is None:  # every forward comes here: the common case first
        return
    options = options or {}
    passes = set(options.get("cond_or_uncond", ()))
    if len(passes) > 1:
        state.lone_pass = None  # a batch of several: this step was not split
    if len(passes) != 1 or not passes <= {0, 1}:
        return
    (this,) = passes
    call, first = options.get("sigmas"), state.lone_pass
    if first is None or first.index == this or first.call is not call:
        patcher = getattr(base_model, "current_patcher", None)
        free = comfy_auto.free_vram(patcher, x.device)
        state.lone_pass = _LonePass(this, free, state.swap.ring_bytes_on_device(), call)
        return
    free = first.free
    room, state.cond_batch_room = state.cond_batch_room, None
    both = (2 * x.shape[0], *x.shape[1:])
    # what core's batching rule compares: its factor times our answer for the batch
    need = comfy_auto.COND_BATCH_FACTOR * base_model.memory_required(both)
    if need < free or first.index == 0:  # core's rule splits with the unconditional first
        after = (
            ": not for want of VRAM, so core could not join the two (text of different lengths, "
            "or a ControlNet or hooks on one side only), or a guidance node ran them apart"
        )
    else:
        # what the plan left between forwards, less what was free: taken since the plan
        taken = room.left - first.slots - free
        beside = comfy_auto.note_batch_shortfall(base_model.diffusion_model, room.shape, taken)
        after = "; later plans of this latent keep %.2f GiB free beside the batch's need" % (
            beside / GIB
        )
    logger.info(
        "wan_blockswap auto: core ran a step's conditional and unconditional passes one at a "
        "time, so each step moves the swapped weights twice. The plan kept %.2f GiB free for "
        "them in one batch, whose need core counts as %.2f GiB; %.2f GiB was free when it ran the "
        "first alone%s",
        room.reserve / GIB,
        need / GIB,
        free / GIB,
        after,
    )


def _fit(
    patcher: Any,
    options: SwapConfig,
    unswapped: _Unswapped,
    wanted: ModelLayout,
    available: float,
    reserve: float,
    runs_whole: bool = False,
) -> None:
    """Apply, keep or re-plan the swap of ``patcher``'s model, its units cut by ``wanted``
    (or as they are: :func:`_layout_to_plan`), for ``available - reserve`` bytes of weights;
    below the least plan, a clear error with the numbers."""
    base_model = patcher.model
    diffusion_model = base_model.diffusion_model
    state = _states.get(diffusion_model)
    budget = available - reserve
    layout = _layout_to_plan(state, unswapped, wanted, options, budget, runs_whole)
    sizes = unswapped.sizes[layout]
    # a swap applied anew starts compressed where its options say so; one re-planned in
    # place keeps its units raw once transfer_compression="auto" dropped compression, or
    # where its apply fell back to raw for want of host RAM (its config then says False)
    compressing = (
        state is None
        or state.swap.layout != layout
        or (
            not state.swap.compression_dropped
            and state.swap.config.transfer_compression is not False
        )
    )
    config = _auto_config(sizes, options, budget, available, compressing)
    plan = plan_swap(sizes, config)
    to_all_resident = False
    if state is not None and state.swap.layout != layout:
        logger.info(
            "wan_blockswap auto: re-planning with %s ([Note: token chunks])",
            (
                "token-wise parts as units that run in chunks (this latent was cut into "
                "chunks, or is not measured yet)"
                if _has_token_wise(layout)
                else (
                    "each large layer a unit of its own (token-wise parts run whole for this "
                    "latent; [Note: the need without chunks])"
                    if runs_whole
                    else "each large layer a unit of its own (a forward of this latent cut no "
                    "part into chunks)"
                )
            ),
        )
        remove_swap(base_model)
        _auto_options[diffusion_model] = options
    elif state is not None:
        current = state.swap.plan
        assert current is not None
        if _same_streamed(plan, current):
            if plan.window_bytes != current.window_bytes:  # a streamed plan's new window
                _set_window(patcher, state, plan, config)
            patcher.size = _reported_size(patcher)
            return
        block = max((b.nbytes for b in sizes.blocks), default=0)
        fits = current.budgeted_bytes <= max(budget, plan.budgeted_bytes)
        to_all_resident = (
            bool(current.swapped_bytes)
            and not unswapped.left_all_resident
            and _all_resident(plan, budget)
        )
        if fits and not to_all_resident:
            # Growing keeps a block of slack: the free VRAM seen before each run moves by
            # some hundred MiB (what the allocator keeps), and re-planning at every move
            # would repack the model every other run.
            if budget - block <= current.budgeted_bytes:
                return
            config = _auto_config(sizes, options, budget - block, available, compressing)
            plan = plan_swap(sizes, config)
            if _same_streamed(plan, current):
                # The same layers stream through a wider window: no repack, and copies run
                # further ahead. On an H100 at 81 frames (8 Wan-14B blocks, 7 GiB free) the
                # first plan, from core's estimate, had a 0.15 GiB window (the FFN's 270 MB
                # sits alone beyond one that small, so its copy waits for the layers before
                # it); the measured need then left 1.35 GiB, whose plan (layer slots) the
                # slack kept out, and every prompt ran on that window, at 1.036x core (the
                # window replanned on the CPU from the same sizes; how much of the gap it
                # was is not yet measured).
                if plan.window_bytes > current.window_bytes:
                    _set_window(patcher, state, plan, config)
                    patcher.size = _reported_size(patcher)
                return
            leaves_streaming = bool(current.window_bytes) and not plan.window_bytes
            gain = current.swapped_bytes - plan.swapped_bytes  # a block more, or all of it
            if not leaves_streaming and (gain <= 0 or gain < min(block, current.swapped_bytes)):
                return  # nothing to gain (nothing streams now), or less than a block
        logger.info("wan_blockswap auto: %.2f GiB for weights; re-planning", budget / GIB)
        _note_all_resident(unswapped, state, plan, to_all_resident)
        try:
            replanned = _replan_loaded_weights(base_model, state, config)
        finally:  # a swap removed on the way is applied again, here or at the next run
            _auto_options[diffusion_model] = options
        if replanned is None:
            _swap_loaded_weights(base_model, config, patcher.load_device, auto=True, layout=layout)
        _after_placing(patcher)
        return
    _note_all_resident(unswapped, state, plan, to_all_resident)
    _swap_loaded_weights(base_model, config, patcher.load_device, auto=True, layout=layout)
    _after_placing(patcher)


def _after_placing(patcher: Any) -> None:
    """Once a plan is applied: core's view of the model's size, and room for its load."""
    if _meter.applies(patcher.load_device):
        # Core loads the resident weights next: they get segments of their own, not pieces of
        # cached ones (the last forwards', or what unloading and sealing just left); see
        # [Note: a forward out of memory] in comfy_auto
        _meter.release_cached(patcher.load_device)
    patcher.size = _reported_size(patcher)


# A plan that keeps every weight resident is taken within less than the block of slack that
# growing keeps otherwise (see ``_fit``): it ends all copying, and with nothing left to grow
# into it is left again only when the budget falls below its weights. On an H100 at 81 frames
# (8 Wan-14B blocks, 12 GiB free) the measured need left 5.74-5.79 GiB for 5.67 GiB of weights, but
# the first plan's 0.88 GiB in layer slots stayed, at 1.014x core's s/it; 1.03 GiB in layer
# slots cost 0.75% of a forward outside the server (benchmarks/results/streamed_overhead_h100.json).
# Between prompts after the first, what could be had moved by under 0.05 GiB in every row of
# that run (comfyui_dynamic_h100/session19_8blocks_batch_need.json); the next run re-planned to
# every block resident and stayed (session19_8blocks_all_resident.json). Once a plan taken this
# way had to give way to one that swaps (two latents' budgets either side of it, taking turns:
# a review repacked the model at each of 7 turns), the model grows with the block of slack
# only (``left_all_resident``).
ALL_RESIDENT_SLACK = 64 * 2**20


def _note_all_resident(unswapped: _Unswapped, state: Any, plan: Any, by_slack: bool) -> None:
    """Before ``plan`` replaces the plan in use: whether an all-resident plan taken within the
    slack gives way to one that swaps (``_Unswapped.left_all_resident``)."""
    current = state.swap.plan if state is not None else None
    if (
        current is not None
        and not current.swapped_bytes
        and plan.swapped_bytes
        and unswapped.all_resident_by_slack
    ):
        unswapped.left_all_resident = True
    unswapped.all_resident_by_slack = by_slack


def _all_resident(plan: Any, budget: float) -> bool:
    """Whether ``plan`` swaps nothing, with ALL_RESIDENT_SLACK of ``budget`` to spare."""
    return not plan.swapped_bytes and budget - plan.budgeted_bytes >= ALL_RESIDENT_SLACK


def _same_streamed(plan: Any, current: Any) -> bool:
    """Whether ``plan`` streams the same units as ``current`` (only its window may differ)."""
    return plan.kind == current.kind == "streamed" and plan.swapped == current.swapped


def _set_window(patcher: Any, state: _State, plan: Any, config: SwapConfig) -> None:
    """Give a streamed swap ``plan``'s window; core counts the window as loaded, so it
    unloads the model first."""
    unload_everywhere(patcher.model)
    state.swap.set_window(plan, config)
    state.config = config
    logger.info("wan_blockswap auto: streaming through a %.2f GiB window", plan.window_bytes / GIB)


def _auto_config(
    sizes: Any, options: SwapConfig, budget: float, available: float, compressing: bool = True
) -> SwapConfig:
    """The config "auto" applies for a weight budget of ``budget`` bytes; ``compressing``:
    whether the swap's units still travel compressed (a new swap's, if its options say so)."""
    asked = _plan_within(sizes, options, budget)
    if asked is not None:
        config = _budget_config(options, budget)
        # [Note: look-ahead of compressed layer plans] in compressed_lookahead
        return compressed_lookahead.deepen(sizes, config, compressing, asked)
    least = min_streamed_budget(sizes)
    if least is None:  # nothing to stream layer by layer: every block's layers in slots
        config = dataclasses.replace(
            options, vram_budget_gb=None, blocks_to_swap=None, swap_unit="layer"
        )
    else:
        config = dataclasses.replace(
            options, vram_budget_gb=least / GIB, blocks_to_swap=None, swap_unit="auto"
        )
    needed = plan_swap(sizes, config).gpu_weight_bytes
    extra = comfy.model_management.extra_reserved_memory()
    if needed + extra > available:
        raise InsufficientMemoryError(
            f"preset 'auto': {available / GIB:.2f} GiB of VRAM can be had, but even streaming "
            f"every layer needs {needed / GIB:.2f} GiB for weights plus core's "
            f"{extra / GIB:.2f} GiB reserve, before any activations. Free VRAM (close other "
            f"programs, unload other models) or use a smaller model or quantized weights."
        )
    logger.warning(
        "wan_blockswap auto: %.2f GiB of VRAM can be had and core expects this latent to need "
        "%.2f GiB beside the weights; streaming every layer (%.2f GiB of weights). If it runs "
        "out of memory, lower the resolution or the number of frames.",
        available / GIB,
        (available - budget) / GIB,
        needed / GIB,
    )
    return config
