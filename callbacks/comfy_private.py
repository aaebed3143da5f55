"""The model our node swaps: a private alias of the loader's model, never the loader's own.

[Note: private model]
Every clone of a ComfyUI loader's output shares one ``BaseModel``: whatever a node changes on
it, every other workflow and prompt sees. Swapping changes modules (hooks) and parameters
(placeholders), so the node never swaps that model. It swaps a *private model* instead: an
alias of the loader's model (``module_alias``) with its own module and parameter objects over
the same weight memory. Nothing is copied when it is made; the swap then packs the swapped
weights into our host buffers, and the resident ones stay shared with the loader's model
until core moves them to the GPU.

- The node's MODEL is a clone of the input patcher (its patches, options, callbacks, wrappers)
  on the private model, a plain ``ModelPatcher`` even when the input is core's dynamic-VRAM
  patcher: the swap streams its own blocks, and core loads the rest as it loads any static
  model. Containers a clone shares with its source by identity (weight backups, hook backups,
  pinned keys) are per model: the private model gets its own, shared by its clones.
- Core sees two models: loading ours never touches the loader's, and a prompt without the node
  finds the loader's model exactly as core left it.
- One private model per loader model, held weakly: it lives while a MODEL of ours does, and is
  freed with its host buffers when the workflow drops the node.
- Core moves a static model's weights back to its offload device as copies when it unloads
  it; the private model's resident tensors are then pointed at the shared memory again
  (:func:`rebind_unloaded`), so an unload does not leave a second copy in RAM.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

import comfy.float
import comfy.model_management
import comfy.model_patcher

from .module_alias import alias_module, is_copy_elsewhere, point_at, rebind_to_origins

logger = logging.getLogger("wan_blockswap")

# State core's loaders hang on a model's modules while it is loaded (casting flags and weight
# functions of low-VRAM streaming, dynamic VRAM's VBAR allocations and pins). The private
# model starts as a constructed model does; core sets them again when it loads it.
MODULE_LOAD_STATE = (
    "_v",
    "_v_signature",
    "_v_block",
    "_pins",
    "_pin_state",
    "_prefetch",
    "seed_key",
    "comfy_cast_weights",
    "prev_comfy_cast_weights",
    "comfy_patched_weights",
    "weight_function",
    "bias_function",
    "weight_lowvram_function",
    "bias_lowvram_function",
)
# The same on the BaseModel: loaded sizes, patch identity, dynamic VRAM's per-model state.
MODEL_LOAD_STATE = (
    "device",
    "model_loaded_weight_memory",
    "lowvram_patch_counter",
    "model_lowvram",
    "current_weight_patches_uuid",
    "model_offload_buffer_memory",
    "dynamic_vbars",
    "dynamic_pins",
    "dynamic_patchers",
)


@dataclass
class _Private:
    """What one private model carries beside itself."""

    model: "weakref.ref[torch.nn.Module]"
    origins: dict[str, torch.Tensor]  # the shared memory of every tensor, by name
    # containers a clone shares with its source by identity, ours for this model, by name
    shared: dict[str, Any] = field(default_factory=dict)
    # core's clone(model_override=...) containers (the model itself is never held here: the
    # entry is a weak dictionary's value, which must not reach its key)
    override: tuple | None = None
    # the private model's own modules and their names as made: an object patch (a sampling
    # schedule's module, say) puts another module under a name while it is applied
    module_names: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = field(
        default_factory=weakref.WeakKeyDictionary
    )


# loader's BaseModel -> its private model (weakly on both sides: [Note: private model])
_privates: "weakref.WeakKeyDictionary[Any, _Private]" = weakref.WeakKeyDictionary()
# private BaseModel -> its entry, for the callbacks that only see the private model
_by_private: "weakref.WeakKeyDictionary[Any, _Private]" = weakref.WeakKeyDictionary()


def is_dynamic(patcher: Any) -> bool:
    """Whether ``patcher`` is core's dynamic-VRAM patcher (by its API, not a version)."""
    method = getattr(patcher, "is_dynamic", None)
    return bool(method()) if callable(method) else False


def private_model(patcher: Any) -> Any:
    """The private model for ``patcher``'s model, made on first use. ``patcher`` may also be
    a clone of ours, whose model is already private."""
    base_model = patcher.model
    private = existing_private(base_model)
    if private is None:
        # Weights core moved to the GPU for another clone would be aliased there: have core
        # put them back first (what it does itself when it needs the memory).
        unload_everywhere(base_model)
        private, origins = alias_module(base_model, MODULE_LOAD_STATE, MODEL_LOAD_STATE)
        # core's own constructor sets the per-model state a fresh model starts with
        comfy.model_patcher.ModelPatcher(private, patcher.load_device, patcher.offload_device)
        if "current_patcher" in vars(private):  # the patcher sampling now (core sets it)
            private.current_patcher = None
        _match_model_dtypes(private)
        entry = _Private(weakref.ref(private), origins)
        entry.module_names.update((module, name) for name, module in private.named_modules())
        _privates[base_model] = entry
        _by_private[private] = entry
        logger.info(
            "wan_blockswap: swapping a private copy of %s that shares its weights; the "
            "loader's model stays as core made it",
            type(base_model).__name__,
        )
    return private


def _match_model_dtypes(model: torch.nn.Module) -> None:
    """Give a static load what a dynamic one would: a model loaded for dynamic VRAM keeps its
    weights in the file's dtype and records the dtype it computes in
    (``<name>_comfy_model_dtype``), cast as dynamic VRAM loads each weight; core's static
    loader, which loads the private model, casts nothing. So core's ops cast their weight and
    bias at each use (``comfy_cast_weights``, as core's low-VRAM mode does), and the few other
    tensors (norms, Wan's modulation) get a cast copy here."""
    with torch.no_grad():
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in list(table.items()):
                    dtype = getattr(module, f"{name}_comfy_model_dtype", None)
                    if tensor is None or dtype is None or tensor.dtype == dtype:
                        continue
                    if is_traceable_wrapper_subclass(tensor):  # quantized: ops dequantize
                        continue
                    if hasattr(module, "comfy_cast_weights") and name in ("weight", "bias"):
                        module.comfy_cast_weights = True
                        _patch_in_model_dtype(module, name, dtype)
                    elif table is module._parameters:
                        table[name] = torch.nn.Parameter(tensor.to(dtype), requires_grad=False)
                    else:
                        table[name] = tensor.to(dtype)


def model_dtype_of(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> Any:
    """The dtype a patched swapped ``tensor`` is rewritten in within its slot: the dtype its
    model computes in where dynamic VRAM recorded one of the same element size (a bf16 file's
    weight computed in fp16), else None (its own). [Note: patched weights in the model
    dtype]"""
    dtype = getattr(module, f"{name}_comfy_model_dtype", None)
    if dtype is None or dtype == tensor.dtype or is_traceable_wrapper_subclass(tensor):
        return None
    same_size = torch.empty((), dtype=dtype).element_size() == tensor.element_size()
    return dtype if same_size else None


# [Note: patched weights in the model dtype]
# Core's static loading casts a model's weights to the dtype it computes in (fp16 for Wan on
# NVIDIA GPUs, even from a bf16 file) and patches a LoRA onto that, storing the result in
# that dtype. Dynamic VRAM keeps the file's dtype and casts at use. The private model (a
# static patcher over the dynamic model's weights) would round a patched weight to the
# file's dtype before the cast: 0.011 away from core in the latent (H100,
# benchmarks/results/reliability_h100.json, lora_under_dynamic_vram_session14). So a
# resident layer gets core's own convert and set functions (``get_key_weight``), which
# start from the weight as the model dtype holds it and keep the patched result in that
# dtype. Swapped layers keep the file's dtype in host memory (which transfer compression,
# bf16 only, needs); a patched one is rewritten in the model dtype in its GPU slot after each
# copy and patched there (``comfy_weight_patches``, ``model_dtype_of``; [Note: a transform
# may change a view's dtype]).
class _ModelDtypeFunction:
    """One of core's per-weight functions, holding its module weakly (a function stored on
    its own module would be a reference cycle, freed only by the cycle collector)."""

    def __init__(self, module: torch.nn.Module, name: str, dtype: torch.dtype) -> None:
        self.module = weakref.ref(module)
        self.name = name
        self.dtype = dtype


class _ConvertThroughModelDtype(_ModelDtypeFunction):
    """``convert_<name>``: the weight, in the dtype core patches in, as the model dtype
    holds it."""

    def __call__(self, weight: torch.Tensor, inplace: bool = False, **kwargs: Any) -> Any:
        if weight.dtype == self.dtype:
            return weight
        return weight.to(self.dtype).to(weight.dtype)


class _SetInModelDtype(_ModelDtypeFunction):
    """``set_<name>``: a patched weight rounded to the model dtype (core's recipe), set on
    the module or returned."""

    def __call__(
        self,
        weight: torch.Tensor,
        inplace_update: bool = False,
        seed: int | None = None,
        return_weight: bool = False,
        **kwargs: Any,
    ) -> Any:
        rounded = comfy.float.stochastic_rounding(weight, self.dtype, seed=seed or 0)
        if return_weight:
            return rounded
        module = self.module()
        if module is not None:  # a new tensor even where core asks in place: another dtype
            setattr(module, self.name, torch.nn.Parameter(rounded, requires_grad=False))
        return None


def _patch_in_model_dtype(module: torch.nn.Module, name: str, dtype: torch.dtype) -> None:
    """[Note: patched weights in the model dtype] for ``module``'s ``name``, unless its class
    has functions of its own (quantized ops)."""
    if hasattr(module, f"set_{name}") or hasattr(module, f"convert_{name}"):
        return
    setattr(module, f"convert_{name}", _ConvertThroughModelDtype(module, name, dtype))
    setattr(module, f"set_{name}", _SetInModelDtype(module, name, dtype))


def is_model_dtype_function(function: Any) -> bool:
    """Whether ``function`` is one of ours from :func:`_patch_in_model_dtype`."""
    return isinstance(function, _ModelDtypeFunction)


def existing_private(base_model: Any) -> Any:
    """The private model made for the loader's ``base_model`` (or ``base_model`` itself if it
    is one), or None."""
    if base_model in _by_private:
        return base_model
    entry = _privates.get(base_model)
    return entry.model() if entry is not None else None


def file_page_dropper(private: Any) -> Any:
    """A function that drops the pages of the files the private model's weights are mapped
    from (dynamic VRAM loads them mapped, ``_comfy_tensor_mmap_refs``), for the swap to call
    after packing each unit: packing reads through the mapping, and without this RAM would
    hold the file's pages beside our pinned copy until core drops them after the node. The
    weights stay valid: the next read faults them in again from the page cache. None where
    nothing is mapped this way."""
    mappings = {}
    for storage in _origin_storages(private):
        refs = getattr(storage, "_comfy_tensor_mmap_refs", None)
        if refs is not None and hasattr(refs[0], "bounce"):
            mappings[id(refs[0])] = refs[0]
    if not mappings:
        return None

    def drop() -> None:
        for mapping in mappings.values():
            mapping.bounce()

    return drop


# [Note: file pages while core loads]
# Core's load moves a static model's resident modules to the GPU one by one (``load`` in
# ``comfy/model_patcher.py``: ``module.to(device)`` per entry of its load list, and before
# that ``patch_weight_to_device`` for each weight with patches, a LoRA's). Under dynamic VRAM
# the private model's weights are a mapped file's pages, so each move reads that module's
# pages into RAM, and they stayed there until the load's end (the ON_LOAD callback dropped
# them). RAM then held our pinned copies of the swapped units and the resident ones' pages
# too: on an H100 at 81 frames (40 Wan-14B blocks, 12 GiB free) a re-planned prompt peaked at
# 28.34 GiB against core's 28.30, steady prompts at 25.23 (session 29). Dropping the mapping's
# pages after every DROP_PAGES_EVERY bytes read bounds that to one batch of them. The watch
# is an instance ``_apply`` on each resident module and an instance ``patch_weight_to_device``
# on the patcher, both removed when the load ends (only if still ours).
DROP_PAGES_EVERY = 256 * 2**20


@contextmanager
def file_pages_dropped_as_modules_move(
    private: Any, modules: Iterable[torch.nn.Module], patcher: Any = None
) -> Iterator[None]:
    """While inside, ``modules`` of the private model (and ``patcher``'s patching of
    weights) drop the mapped file's pages after each DROP_PAGES_EVERY bytes of weights that
    moved device or were read to be patched: see [Note: file pages while core loads].
    Nothing where no weights are mapped."""
    drop = file_page_dropper(private)
    if drop is None:
        yield
        return
    watch = _Watch(drop)
    try:
        for module in modules:
            if "_apply" not in vars(module):  # never stack on another's
                watch.install(module, _MovingApply(module, watch))
        if patcher is not None and _PatchingRead.NAME not in vars(patcher):
            watch.install(patcher, _PatchingRead(patcher, watch))
        yield
    finally:
        watch.remove_all()


def _stored_data(tensor: torch.Tensor) -> torch.Tensor:
    """What ``tensor`` stores: itself, or a comfy-kitchen QuantizedTensor's data."""
    return getattr(tensor, "_qdata", tensor)


def _weight_nbytes(tensor: torch.Tensor) -> int:
    """Bytes ``tensor`` holds (a QuantizedTensor: its stored data's)."""
    data = _stored_data(tensor)
    return data.numel() * data.element_size()


class _Installed:
    """Instance attributes installed on owners for the length of a block: each is removed
    at its end, if still ours."""

    def __init__(self) -> None:
        # (owner, name, the call installed, the instance attribute it covers, if any)
        self.installed: list[tuple[weakref.ref, str, Any, Any]] = []

    def install(self, owner: Any, call: "_WatchedCall") -> None:
        call.covered = vars(owner).get(call.NAME)
        object.__setattr__(owner, call.NAME, call)  # the instance's, before its class's
        self.installed.append((weakref.ref(owner), call.NAME, call, call.covered))

    def remove_all(self) -> None:
        for ref, name, function, covered in reversed(self.installed):
            owner = ref()
            if owner is not None and vars(owner).get(name) is function:
                if covered is None:
                    del vars(owner)[name]
                else:
                    object.__setattr__(owner, name, covered)
        self.installed.clear()


class _Watch(_Installed):
    """Bytes read so far, and the page drop after every DROP_PAGES_EVERY of them."""

    def __init__(self, drop: Callable[[], None]) -> None:
        super().__init__()
        self.drop = drop
        self.pending = 0

    def add(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= DROP_PAGES_EVERY:
            self.pending = 0
            self.drop()


class _WatchedCall:
    """An instance attribute ``NAME`` of one owner (a module or a patcher) that a watch
    installed for the length of a block. A weak reference would deep-copy as the original's,
    so a copy of the owner made inside the watch gets a call of its own, removed with the
    others."""

    NAME = ""

    def __init__(self, owner: Any, watch: _Installed) -> None:
        self.owner = weakref.ref(owner)
        self.watch = watch
        self.covered: Any = None  # the instance attribute this one covers while installed

    def _owner(self) -> Any:
        owner = self.owner()
        assert owner is not None, f"{self.NAME} called through a collected object"
        return owner

    def __deepcopy__(self, memo: dict) -> "_WatchedCall":
        owner = self._owner()
        copy = memo.get(id(owner), owner)
        watching = type(self)(copy, self.watch)
        self.watch.installed.append((weakref.ref(copy), self.NAME, watching, None))
        return watching


class _MovingApply(_WatchedCall):
    """A module's ``_apply`` that counts the bytes of its own parameters that changed device."""

    NAME = "_apply"

    def __call__(self, fn: Callable, recurse: bool = True) -> Any:
        module = self._owner()
        before = [p.device for p in module.parameters(recurse=False)]
        result = type(module)._apply(module, fn, recurse)
        after = module.parameters(recurse=False)
        self.watch.add(sum(_weight_nbytes(p) for p, d in zip(after, before) if p.device != d))
        return result


class _PatchingRead(_WatchedCall):
    """A patcher's ``patch_weight_to_device`` that counts the bytes of a weight with patches
    (core reads it to patch it, then the module's move finds it moved already)."""

    NAME = "patch_weight_to_device"

    def __call__(self, key: str, *args: Any, **kwargs: Any) -> Any:
        patcher = self._owner()
        result = type(patcher).patch_weight_to_device(patcher, key, *args, **kwargs)
        if key in patcher.patches:
            weight = comfy.model_patcher.get_key_weight(patcher.model, key)[0]
            self.watch.add(_weight_nbytes(weight))
        return result


# [Note: unloading onto the shared memory]
# Core unloads a static model by moving its weights to the offload device
# (``unpatch_model``: hooks unpatched and patched weights restored from their backups first,
# then ``model.to(offload_device)``). The private model's resident weights then arrive in RAM
# as copies, and only afterwards (``rebind_unloaded``, from the ON_DETACH callback) point at
# the shared memory again. On an H100 at 81 frames (40 Wan-14B blocks, 12 GiB free) the
# unload before the batch's re-plan so copied 5.59 GiB beside our pinned copies: RSS peaked
# at 28.30 GiB where the prompts around it held 22.9 and 25.3 (session 32). So while core
# unpatches, each resident module's ``_apply`` first points its tensors that are copies of
# their origins on another device at the origin, where that is the device the unload moves
# to; the move then copies nothing. The values are the origin's by then, as
# ``rebind_unloaded`` already relies on: core restored every patched weight before the move.
# A partial unload (``partially_unload``: core makes room for another model, a VAE's decode
# say) moves modules the same way, and the copies stayed in RAM until the next load; it does
# this too, but never while hook patches are in the weights (``hook_backup`` not empty: it
# unpatches hooks only on reaching a module with a backup). Afterwards such a module shares
# the loader's memory, as before core first loaded it, and core does not page-lock it
# (v0.33 pins what a partial unload moved, and what a low-VRAM load leaves on the CPU, for
# its own streaming): that would lock the loader's memory (under dynamic VRAM a file's
# mapping) in our patcher's name. Such a weight streams from pageable memory instead.
# Left alone:
# - a module or tensor an object patch put under a name: core puts object patches back only
#   after the move, and a shifted sampling schedule's ``sigmas`` have the loader's dtype and
#   shape but not its values. Only the private model's own modules, under their own names,
#   are watched;
# - wrapper subclasses (comfy-kitchen's QuantizedTensor), whose ``.data`` would take the
#   wrapper's device and leave the quantized data on the GPU.
# A load that unloads first (new patches) runs this watch over its page-drop watch, which
# then moves what is left.


@contextmanager
def resident_weights_unload_onto_origins(
    private: Any,
    modules: Iterable[tuple[str, torch.nn.Module]],
    device_to: Any,
    skip: set[int],
    may_point: Callable[[], bool] = lambda: True,
    skip_names: Iterable[str] = (),
) -> Iterator[None]:
    """While inside, ``modules`` of the private model, by qualified name, leave the GPU for
    ``device_to`` by pointing at the shared memory where it lies there, not as copies: see
    [Note: unloading onto the shared memory]. ``skip``: ids of tensors the swap owns;
    ``may_point()``: whether the weights hold their origins' values now (asked at each
    move); ``skip_names``: qualified names of tensors to leave alone (an object patch's).
    Nothing for a model that is not ours."""
    entry = _by_private.get(private)
    if entry is None:
        yield
        return
    device_to = torch.device(device_to)
    skip_names = set(skip_names)
    watch = _Installed()
    try:
        for prefix, module in modules:
            if entry.module_names.get(module) != prefix:  # an object patch's: not ours
                continue
            own = {}
            for name in (*module._parameters, *module._buffers):
                qualified = f"{prefix}.{name}" if prefix else name
                origin = entry.origins.get(qualified)
                if qualified in skip_names:
                    continue
                if origin is not None and origin.device == device_to:
                    own[name] = origin
            covered = vars(module).get("_apply")
            if own and (covered is None or isinstance(covered, _MovingApply)):
                # over the page-drop watch of a load that unloads first (new patches), never
                # over another's
                watch.install(module, _ApplyOntoOrigins(module, watch, own, skip, may_point))
        yield
    finally:
        watch.remove_all()


class _ApplyOntoOrigins(_WatchedCall):
    """A resident module's ``_apply`` that first points each of its own tensors that is a
    copy of its origin on another device at the origin ([Note: unloading onto the shared
    memory]): the move to the origin's device then finds it there. A copy of the module made
    inside the watch moves as torch moves it."""

    NAME = "_apply"

    def __init__(
        self,
        owner: torch.nn.Module,
        watch: _Installed,
        origins: dict[str, torch.Tensor] | None = None,
        skip: set[int] = frozenset(),
        may_point: Callable[[], bool] = lambda: False,
    ) -> None:
        super().__init__(owner, watch)
        self.origins, self.skip, self.may_point = origins or {}, skip, may_point

    def __call__(self, fn: Callable, recurse: bool = True) -> Any:
        module = self._owner()
        for table in (module._parameters, module._buffers) if self.may_point() else ():
            for name, tensor in table.items():
                origin = self.origins.get(name)
                if tensor is None or origin is None or id(tensor) in self.skip:
                    continue
                if is_copy_elsewhere(tensor, origin):
                    point_at(tensor, origin)
        if self.covered is not None:  # the page-drop watch's, which then moves it
            return self.covered(fn, recurse)
        return type(module)._apply(module, fn, recurse)


def release_file_pages(private: Any) -> None:
    """Let core drop the file pages our reads mapped: the weights of a model loaded with
    dynamic VRAM live in a mapped file, and packing or loading ours reads them through the
    mapping. Core unmaps the pages of mappings marked dirty after the node (where its version
    has the mechanism); the next read faults them in again from the page cache."""
    mark = getattr(comfy.model_management, "mark_mmap_dirty", None)
    for storage in _origin_storages(private) if mark is not None else ():
        mark(storage)


def _origin_storages(private: Any) -> Iterator[Any]:
    """The storages behind the loader's tensors that ``private`` aliases (a comfy-kitchen
    QuantizedTensor's through its fp8 data)."""
    entry = _by_private.get(private)
    for tensor in entry.origins.values() if entry is not None else ():
        try:
            yield _stored_data(tensor).untyped_storage()
        except (RuntimeError, TypeError):  # a tensor without storage of its own
            continue


def clone_onto(patcher: Any, private: Any) -> Any:
    """A clone of ``patcher`` (patches, options, callbacks, wrappers) whose model is
    ``private``: a plain ``ModelPatcher`` when ``patcher`` is dynamic, since our swap, not
    dynamic VRAM, streams the model."""
    if patcher.model is private:
        return patcher.clone()
    entry = _by_private[private]
    clone = None
    if _accepts_override(patcher):
        if entry.override is None:
            _, containers = patcher.get_clone_model_override()
            entry.override = tuple(type(c)() for c in containers)
        kwargs: dict[str, Any] = {"model_override": (private, entry.override)}
        if is_dynamic(patcher):
            kwargs["disable_dynamic"] = True
        try:
            clone = patcher.clone(**kwargs)
        except TypeError:  # a subclass that forwards **kwargs to an older core
            clone = None
    if clone is None:
        clone = patcher.clone()
        clone.model = private
    # Whatever else the clone still shares with ``patcher`` by identity is the loader
    # model's state (backups, hook backups, pins): give it the private model's own.
    for name, value in list(vars(clone).items()):
        if isinstance(value, (dict, set, list)) and value is getattr(patcher, name, None):
            setattr(clone, name, entry.shared.setdefault(name, type(value)()))
    clone.parent = None  # core's loaded-model entry must not fall back to the loader's patcher
    if hasattr(clone, "cached_patcher_init"):
        clone.cached_patcher_init = None  # re-running the loader would bypass the swap
    clone.weight_inplace_update = False  # never write patches into the shared memory
    return clone


def _accepts_override(patcher: Any) -> bool:
    try:
        parameters = inspect.signature(patcher.clone).parameters
    except (TypeError, ValueError):
        return False
    takes_it = "model_override" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )
    return takes_it and hasattr(patcher, "get_clone_model_override")


def rebind_unloaded(private: Any, skip: set[int]) -> int:
    """Core unloaded the private model and moved its resident weights back as copies: point
    them at the shared memory again. ``skip``: ids of tensors the swap owns."""
    entry = _by_private.get(private)
    if entry is None:
        return 0
    freed = _rebind_set_in_model_dtype(private, entry.origins, skip)
    return freed + rebind_to_origins(private, entry.origins, skip)


def origin_lookup(private: Any) -> Callable[[str], torch.Tensor | None] | None:
    """By a tensor's name inside ``private.diffusion_model``, the shared memory it started
    from (the loader's), or None for a model that is not ours: where the engine points the
    units a re-plan gives back to the GPU's share, so that they are not copied out of pinned
    memory first, only to be rebound here (``BlockSwap.replan``'s ``origin``)."""
    entry = _by_private.get(private)
    if entry is None:
        return None
    origins = entry.origins
    return lambda name: origins.get(f"diffusion_model.{name}")


def shares_loader_memory(private: Any, name: str, tensor: torch.Tensor) -> bool:
    """Whether ``tensor``, the private model's ``name``, is the loader's memory now."""
    entry = _by_private.get(private)
    origin = entry.origins.get(name) if entry is not None else None
    if origin is None or origin.device != tensor.device:
        return False
    try:
        return _stored_data(tensor).data_ptr() == _stored_data(origin).data_ptr()
    except RuntimeError:  # a wrapper subclass without storage of its own
        return False


def _rebind_set_in_model_dtype(private: Any, origins: dict, skip: set[int]) -> int:
    """Weights our ``set_<name>`` replaced with a tensor in the model dtype (core's hook
    recipe asks for an in-place update, which the file's dtype cannot hold), once core put
    the original values back (``copy_to_param``) and moved them off the GPU: the shared
    memory again. [Note: patched weights in the model dtype]"""
    freed = 0
    with torch.no_grad():
        for module_name, module in private.named_modules():
            for name in ("weight", "bias"):
                if not is_model_dtype_function(getattr(module, f"set_{name}", None)):
                    continue
                tensor = getattr(module, name, None)
                origin = origins.get(f"{module_name}.{name}" if module_name else name)
                if tensor is None or origin is None or id(tensor) in skip:
                    continue
                if tensor.dtype == origin.dtype or tensor.device != origin.device:
                    continue  # the file's dtype: rebind_to_origins' business
                if tensor.shape != origin.shape or not torch.equal(tensor.to(origin.dtype), origin):
                    continue  # still patched
                freed += point_at(tensor, origin)
    return freed


def unload_everywhere(base_model: Any) -> None:
    """Have core unload every loaded patcher of ``base_model``."""
    mm = comfy.model_management
    for index in reversed(range(len(mm.current_loaded_models))):
        loaded = mm.current_loaded_models[index]
        patcher = loaded.model
        if patcher is not None and patcher.model is base_model:
            loaded.model_unload()
            mm.current_loaded_models.pop(index)
