"""Swap units: the groups of tensors that move to the GPU together, and the module whose
forward hooks fetch and release them.

A unit is a whole block (``swap_unit="block"``), one large leaf layer of a block
(``"layer"``), or an offloaded embedding module. Parameters and buffers that sit directly on
a block (Wan's ``modulation``) belong to the block's unit; in layer mode they stay resident
with the block's other small tensors.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .layout import BlockListLayout, ModelLayout

from .errors import BlockSwapConfigError, BlockSwapStateError

# In layer mode a leaf becomes its own unit when it holds at least this share of its block.
LAYER_UNIT_MIN_SHARE = 1 / 32


@dataclass(frozen=True)
class TensorRef:
    """A parameter or buffer, addressed through its owning module so it can be rebound.

    The owner is held weakly ([Note: no strong path to the model] in ``engine``): a swap
    keeps refs to resident tensors it moved, some owned by the model itself (Wan's
    ``scale_shift_table``), and a strong owner would keep a dropped model and all its
    pinned and device memory alive through the swap registry.
    """

    owner_ref: "weakref.ref[nn.Module]"
    attr: str
    qualname: str
    is_param: bool

    @classmethod
    def of(cls, owner: nn.Module, attr: str, qualname: str, is_param: bool) -> "TensorRef":
        return cls(weakref.ref(owner), attr, qualname, is_param)

    @property
    def owner(self) -> nn.Module:
        owner = self.owner_ref()
        if owner is None:
            raise BlockSwapStateError(f"the module that held {self.qualname} was freed")
        return owner

    def _table(self) -> dict:
        owner = self.owner
        return owner._parameters if self.is_param else owner._buffers

    def get(self) -> torch.Tensor:
        return self._table()[self.attr]

    def replace(self, value: torch.Tensor) -> torch.Tensor:
        """Put a new tensor object in the owner (a meta tensor cannot be rebound to real
        memory through ``.data``); returns the object now registered."""
        table = self._table()
        if self.is_param:
            value = nn.Parameter(value, requires_grad=table[self.attr].requires_grad)
        table[self.attr] = value
        return value


@dataclass(frozen=True)
class BlockRef:
    """One block of one block list."""

    list_layout: BlockListLayout
    key: str
    position: int
    module: nn.Module
    qualname: str

    @property
    def role(self) -> str:
        return self.list_layout.role


@dataclass(frozen=True)
class SwapUnit:
    """Tensors that travel together, fetched before ``module`` runs and released after."""

    name: str
    module: nn.Module
    tensors: tuple[TensorRef, ...]
    kind: str  # "block", "layer" or "embedding"

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(ref.get()) for ref in self.tensors)


def resolve(root: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path``, with an error naming the missing part."""
    module = root
    for part in path.split("."):
        child = module._modules.get(part) if hasattr(module, "_modules") else None
        if child is None:
            raise BlockSwapConfigError(
                f"{type(root).__name__} has no submodule {path!r} (missing {part!r}); "
                f"the model layout does not fit this model"
            )
        module = child
    return module


def find_blocks(root: nn.Module, layout: ModelLayout) -> list[BlockRef]:
    """Every block of every list in ``layout``, lists in layout order."""
    blocks = []
    # Each block is one unit: a block reached twice (a list named twice in the layout, a
    # block repeated in its list, a list inside another) would be packed twice, the second
    # time from placeholders. (A submodule shared by two blocks is fine: its tensors are
    # shared, and shared tensors stay resident.)
    under: dict[int, str] = {}  # every module inside a block found so far -> that block
    found: dict[int, str] = {}  # the blocks found so far
    for list_layout in layout.block_lists:
        container = resolve(root, list_layout.path)
        if not isinstance(container, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            raise BlockSwapConfigError(
                f"{list_layout.path!r} is a {type(container).__name__}, not a list of blocks"
            )
        for position, (key, module) in enumerate(container._modules.items()):
            if module is None:
                continue
            qualname = f"{list_layout.path}.{key}"
            blocks_inside = [found[id(m)] for m in module.modules() if id(m) in found]
            if id(module) in under or blocks_inside:
                other = under.get(id(module)) or blocks_inside[0]
                raise BlockSwapConfigError(
                    f"{qualname} and {other} are the same module, or one holds the other: "
                    f"every block must be a module of its own. If the layout names one block "
                    f"list twice, or one list inside another, name it once; a model that "
                    f"runs one block at several positions cannot be swapped block by block."
                )
            for sub in module.modules():
                under.setdefault(id(sub), qualname)
            found[id(module)] = qualname
            blocks.append(BlockRef(list_layout, key, position, module, qualname))
    return blocks


def shared_tensor_ids(root: nn.Module) -> set[int]:
    """Ids of tensors reachable under more than one name: they are never swapped, since
    rebinding one name would leave the other pointing at the old memory."""
    seen: dict[int, int] = {}
    for _, tensor in _named_tensors(root):
        seen[id(tensor)] = seen.get(id(tensor), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def tensor_refs(module: nn.Module, prefix: str, exclude: set[int]) -> tuple[TensorRef, ...]:
    """All parameters and buffers under ``module`` except the excluded (shared) ones."""
    refs = []
    for name, owner in module.named_modules(remove_duplicate=False):
        for attr, tensor in list(owner._parameters.items()):
            if tensor is not None and id(tensor) not in exclude:
                refs.append(TensorRef.of(owner, attr, _join(prefix, name, attr), True))
        for attr, tensor in list(owner._buffers.items()):
            if tensor is not None and id(tensor) not in exclude:
                refs.append(TensorRef.of(owner, attr, _join(prefix, name, attr), False))
    return _dedupe(refs)


def block_unit(block: BlockRef, exclude: set[int]) -> SwapUnit:
    return SwapUnit(
        block.qualname, block.module, tensor_refs(block.module, block.qualname, exclude), "block"
    )


def layer_units(block: BlockRef, exclude: set[int]) -> list[SwapUnit]:
    """The block's large leaf layers as separate units; smaller tensors stay with the block.

    Only true leaves (no child modules) become units, so a unit never runs inside another
    unit's forward and one slot per unit in use is enough. The block's token-wise parts
    (``BlockListLayout.token_wise``) count as leaves: one unit each, since their layers run
    once per chunk of tokens ([Note: token chunks]); so do its fused parts that hold weights
    read fused ([Note: fused parts]) and its grouped parts ([Note: grouped parts]).
    """
    threshold = max(1, int(_bytes_of(block.module, exclude) * LAYER_UNIT_MIN_SHARE))
    whole = {id(m) for m in (*token_wise_modules(block), *fused_modules(block))}
    grouped = _parts(block, block.list_layout.grouped)
    if grouped:  # [Note: grouped parts]: only where the block's largest unit stays as large
        units = _large_leaves(
            block.module, block.qualname, exclude, threshold, {id(block.module)}, whole
        )
        inside = {id(m) for part in grouped for m in part.modules()}
        largest = max((u.nbytes for u in units if id(u.module) not in inside), default=0)
        whole |= {id(part) for part in grouped if _bytes_of(part, exclude) <= largest}
    return _large_leaves(
        block.module, block.qualname, exclude, threshold, {id(block.module)}, whole
    )


def _bytes_of(module: nn.Module, exclude: set[int]) -> int:
    return sum(_nbytes(ref.get()) for ref in tensor_refs(module, "", exclude))


def _parts(block: BlockRef, paths: tuple[str, ...]) -> list[nn.Module]:
    found = []
    for path in paths:
        try:
            found.append(resolve(block.module, path))
        except BlockSwapConfigError:
            continue  # a part this block lacks
    return found


# [Note: grouped parts]
# A layer unit's copy hides behind the compute of the units before it, and fixed slots look
# ahead by one unit (prefetch_blocks=1: two slots). Some layers compute almost nothing: Wan's
# cross-attention k and v project the 512 text tokens, while their copies (52 MB each at 14B,
# about 1 ms on PCIe Gen5) sit between q and o, which see every video token. As units of
# their own, the GPU idled on copies: on an H100 in the server (40 Wan-14B blocks, 81 frames,
# 7 GiB free, two 270 MiB slots, arms alternated) ours ran at 1.3-1.6% above core's s/it, at a
# higher SM clock than core's for the same power. Records name such parts
# (``BlockListLayout.grouped``) and each travels as one unit, whose copy hides behind the
# self-attention: the same run then gave 1.0025x core's s/it and 0.995x its prompt time,
# at core's clock (session 25, benchmarks/results/comfyui_dynamic_h100.json,
# benchmark_run16). Two limits:
# - A part is grouped only where it is no larger than the block's largest other unit: a
#   larger unit would make every slot larger and keep fewer layers resident (Wan 14B with its
#   FFN layers as units of their own: 200 MiB slots, not 135; i2v's cross-attention, with
#   k_img and v_img, is 300 MiB against the whole FFN's 270). So at 14B t2v the cross-attention
#   is grouped where the FFN runs in token chunks (long videos, where compute hides copies),
#   and not where it runs whole, nor ever for i2v. There, packed slots (session 26: [Note:
#   packed slots]) let the layers apart land together ahead of use instead.
# - A host may call a grouped part's layers itself, not through the part (ComfyUI's
#   CausalWanModel uses its cross-attention's q, k, v and o so): hooks on the layers fetch
#   the unit for such calls, as on a miss, and keep it until another unit is waited for
#   (``hooks.inner_layer_hooks``), so that q, norm_q and o in a row share one copy (on a tiny
#   CausalWanModel no more bytes per step than with the layers apart); through the part they
#   do nothing.


def inner_layers(unit: SwapUnit) -> list[nn.Module]:
    """The modules inside a layer unit's part (a grouped or token-wise part, not a leaf)
    that own tensors: what a host might call on its own ([Note: grouped parts])."""
    if unit.kind != "layer":
        return []
    return [
        m for m in unit.module.modules() if m is not unit.module and (m._parameters or m._buffers)
    ]


def token_wise_modules(block: BlockRef) -> list[nn.Module]:
    """The block's token-wise parts that it has (see ``BlockListLayout.token_wise``)."""
    return _parts(block, block.list_layout.token_wise)


# [Note: fused parts]
# A layer unit's weights arrive when its own forward is called (a pre-hook). Core's FFNs on
# current ComfyUI (Wan's, LTX's, MiniMax's) call comfy.ops.linear_input_act(down, up(x), act),
# which for an INT8 down-projection (comfy-kitchen's QuantizedTensor, TensorWiseINT8Layout)
# reads ``down.weight`` and runs a fused kernel without calling ``down``: as a unit of its
# own, that layer would still hold its 0-element placeholder there ("Input and weight inner
# dimensions must match, got 256 and 0" on the CPU). Records name such parts
# (``BlockListLayout.fused``); where one holds a weight such a kernel reads it is one unit,
# fetched when the part is called. Which weights those are is the host's knowledge
# (:func:`register_fused_weights`; ComfyUI's adapter: INT8 ones); without a host's word, any
# wrapper tensor ([Note: wrapper tensors]). Other weights go through ``down``'s own forward,
# so their layers stay units of their own: smaller units leave more of a budget resident
# (scaled-fp8 FFNs as one unit would double Wan-14B's largest fp8 unit, 71 to 142 MB).

_runs_fused: Callable[[torch.Tensor], bool] = is_traceable_wrapper_subclass


def register_fused_weights(check: Callable[[torch.Tensor], bool]) -> None:
    """Set which weights a fused part's forward may read without calling their layer
    ([Note: fused parts]); a host that runs such kernels registers its own test."""
    global _runs_fused
    _runs_fused = check


def fused_modules(block: BlockRef) -> list[nn.Module]:
    """The block's fused parts that hold weights read fused ([Note: fused parts])."""
    return [
        part
        for part in _parts(block, block.list_layout.fused)
        if any(_runs_fused(t) for t in itertools.chain(part.parameters(), part.buffers()))
    ]


def stream_layer_units(
    root: nn.Module,
    paths: tuple[str, ...],
    blocks: list[BlockRef],
    exclude: set[int],
    min_bytes: int,
) -> list[SwapUnit]:
    """Leaf layers of at least ``min_bytes`` under the modules at ``paths`` (those that exist),
    each its own unit, for streamed plans. A leaf reachable from two paths counts once, and
    one inside a block (HunyuanVideo's token refiner sits inside ``txt_in``) is the block's."""
    units: list[SwapUnit] = []
    seen: set[int] = {id(m) for block in blocks for m in block.module.modules()}
    for path in paths:
        try:
            module = resolve(root, path)
        except BlockSwapConfigError:
            continue  # an optional part this model lacks (img_emb without i2v)
        units.extend(_large_leaves(module, path, exclude, min_bytes, seen))
    return units


def _large_leaves(
    module: nn.Module,
    prefix: str,
    exclude: set[int],
    min_bytes: int,
    skip: set[int],
    whole: set[int] = frozenset(),  # type: ignore[assignment]
) -> list[SwapUnit]:
    """Leaf modules under ``module`` holding at least ``min_bytes``, each a layer unit; those
    in ``skip`` are passed over, and every leaf seen is added to it. A module in ``whole``
    counts as a leaf, its descendants with it."""
    units = []
    for name, leaf in module.named_modules():
        if id(leaf) in skip or (leaf._modules and id(leaf) not in whole):
            continue
        skip.add(id(leaf))
        if id(leaf) in whole:
            skip.update(id(m) for m in leaf.modules())
        qualname = _join(prefix, name)
        refs = tensor_refs(leaf, qualname, exclude)
        if refs and sum(_nbytes(ref.get()) for ref in refs) >= min_bytes:
            units.append(SwapUnit(qualname, leaf, refs, "layer"))
    return units


def embedding_unit(root: nn.Module, path: str, exclude: set[int]) -> SwapUnit:
    module = resolve(root, path)
    return SwapUnit(path, module, tensor_refs(module, path, exclude), "embedding")


def _named_tensors(root: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, owner in root.named_modules(remove_duplicate=False):
        for attr, tensor in owner._parameters.items():
            if tensor is not None:
                yield _join("", name, attr), tensor
        for attr, tensor in owner._buffers.items():
            if tensor is not None:
                yield _join("", name, attr), tensor


def _dedupe(refs: list[TensorRef]) -> tuple[TensorRef, ...]:
    # A module reachable twice inside one unit yields the same tensor twice: keep the first.
    seen: set[int] = set()
    out = []
    for ref in refs:
        key = id(ref.get())
        if key not in seen:
            seen.add(key)
            out.append(ref)
    return tuple(out)


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


# [Note: wrapper tensors]
# A wrapper tensor subclass (comfy-kitchen's QuantizedTensor: fp8 bytes plus a scale, with the
# logical shape and dtype of the real weight) has no storage of its own. It is stored and
# streamed as its inner tensors (``__tensor_flatten__``), each a piece of the unit's packed
# buffer, and rebuilt over their slot views (``__tensor_unflatten__``) when bound; its size is
# what those pieces hold, not its logical numel times its logical dtype's size.


def leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``tensor``'s data: itself, or a wrapper's inner tensors."""
    if not is_traceable_wrapper_subclass(tensor):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [leaf for name in names for leaf in leaves(getattr(tensor, name))]


def rebuild(template: torch.Tensor, pieces: Iterator[torch.Tensor]) -> torch.Tensor:
    """A tensor like ``template`` over the next of ``pieces`` (one per leaf, in
    :func:`leaves` order): the piece itself for a plain tensor, a new wrapper otherwise."""
    if not is_traceable_wrapper_subclass(template):
        return next(pieces)
    names, context = template.__tensor_flatten__()
    inner = {name: rebuild(getattr(template, name), pieces) for name in names}
    return type(template).__tensor_unflatten__(inner, context, template.size(), template.stride())


def _nbytes(tensor: torch.Tensor) -> int:
    return sum(leaf.numel() * leaf.element_size() for leaf in leaves(tensor))


def stored_nbytes(tensor: torch.Tensor) -> int:
    """Bytes ``tensor``'s data takes (see [Note: wrapper tensors])."""
    return _nbytes(tensor)


def kept_strides(tensor: torch.Tensor) -> tuple[int, ...] | None:
    """The strides ``remove()`` must give ``tensor`` back, or None where any contiguous copy
    will do. A transposed, sliced or expanded parameter keeps its strides: code that checks
    them (or relies on an expanded tensor staying small) must see the model as it was."""
    if tensor.device.type == "meta" or tensor.is_contiguous():
        return None
    return tuple(tensor.stride())


def copy_with_strides(
    values: torch.Tensor, device: torch.device, strides: tuple[int, ...] | None, copy: bool
) -> torch.Tensor:
    """``values`` on ``device`` laid out with ``strides`` (storage offset 0). Overlapping
    strides (an expanded tensor) get storage for their distinct elements only."""
    if strides is None or (not copy and values.device == device and values.stride() == strides):
        return values.to(device, copy=copy)
    size = values.size()
    extent = 1 + sum((n - 1) * s for n, s in zip(size, strides)) if values.numel() else 0
    storage = torch.empty(extent, dtype=values.dtype, device=device)
    # An expanded dimension (stride 0) repeats one slice: write that slice once.
    distinct = values[tuple(slice(0, 1) if s == 0 else slice(None) for s in strides)]
    try:
        filled = torch.as_strided_scatter(storage, distinct.to(device), distinct.size(), strides)
    except RuntimeError:  # overlapping in some other way: no layout to keep, a copy will do
        return values.to(device, copy=copy)
    return filled.as_strided(size, strides)


def move_tensor(
    ref: TensorRef, device: torch.device, strides: tuple[int, ...] | None = None
) -> None:
    """Move one resident tensor, keeping its object where ``.data`` can be rebound; a wrapper
    tensor, whose device is fixed when it is made, is replaced ([Note: wrapper tensors]).
    ``strides``: the layout to give it there (moving back what apply moved)."""
    tensor = ref.get()
    with torch.inference_mode(tensor.is_inference()):
        if is_traceable_wrapper_subclass(tensor):
            ref.replace(tensor.to(device))
        else:
            tensor.data = copy_with_strides(tensor.data, device, strides, copy=False)
