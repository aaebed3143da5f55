"""Weight patches (LoRA and other core patches) on swapped weights, the way core applies
them to weights it loads itself.

Core patches a weight when it moves it to the GPU; it never moves our swapped weights, so
:func:`set_patch_transform` gives the engine a slot transform it runs on the copy stream right
after each unit with patches lands in a slot. ComfyUI-GGUF patches quantized weights while dequantizing
them instead, from an attribute on the weight: :func:`attach_gguf_patches` sets it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

import comfy.float
import comfy.lora
import comfy.model_management
import comfy.model_patcher
from ..wan_blockswap import BlockSwap, BlockSwapConfigError
from .comfy_private import is_model_dtype_function, model_dtype_of
from ..wan_blockswap.units import leaves

logger = logging.getLogger("wan_blockswap")

MODEL_PREFIX = "diffusion_model."
FP32 = torch.float32


def set_patch_transform(
    patcher: Any, swap: BlockSwap, hook_patches: dict[str, list] | None = None
) -> None:
    """Apply ``patcher``'s weight patches to swapped weights as they land in a slot, with the
    recipe core uses for weights it patches at load time; then ``hook_patches`` (scheduled
    LoRA hooks active now, see :func:`swapped_hook_patches`) with core's hook recipe, which
    patches the already patched weight again. Sets (or clears) ``swap``'s slot transform."""
    hook_patches = hook_patches or {}
    wanted: dict[str, list[tuple[int, str]]] = {}
    # keys kept in another dtype than their model computes in (a bf16 file's, in host
    # memory): rewritten and patched in the model dtype in their slot, see [Note: patched
    # weights in the model dtype]
    model_dtypes: dict[str, torch.dtype] = {}
    root = patcher.model.diffusion_model
    for unit_name, index, qualname, tensor in swap.swapped_parameters():
        key = MODEL_PREFIX + qualname
        if key not in patcher.patches and key not in hook_patches:
            continue
        if not _is_gguf_quantized(tensor):  # those: attach_gguf_patches
            wanted.setdefault(unit_name, []).append((index, key))
            owner, _, name = qualname.rpartition(".")
            dtype = model_dtype_of(root.get_submodule(owner), name, tensor)
            if dtype is not None:
                model_dtypes[key] = dtype
    if not wanted:
        swap.set_transform(None)
        return
    # (patches, the dtype core computes them in): a regular patch in core's LoRA compute
    # dtype for the device (fp16 on most GPUs in current core, fp32 in older ones), a hook's
    # in fp32, as core's two recipes do
    stages = {
        key: [
            (p, dtype)
            for p, dtype in ((patcher.patches.get(key), None), (hook_patches.get(key), FP32))
            if p
        ]
        for entries in wanted.values()
        for _, key in entries
    }
    # Ops that store weights scaled (core's scaled-fp8 Linear) give core a convert function
    # (stored -> real weight) and a set function (real -> stored); core patches with them.
    # (Ours for the model dtype are left out: ``patch`` rewrites such a weight in the model
    # dtype in its slot before patching it, see [Note: patched weights in the model dtype].)
    funcs = {
        key: tuple(
            None if is_model_dtype_function(f) else f
            for f in comfy.model_patcher.get_key_weight(patcher.model, key)[1:]
        )
        for entries in wanted.values()
        for _, key in entries
    }
    # Units whose patched ops read their own tensors (their scale): bound to the slot meanwhile.
    scaled = {
        unit_name
        for unit_name, entries in wanted.items()
        if any(funcs[key] != (None, None) for _, key in entries)
    }
    bound = swap.unit_binder() if scaled else None  # holds the units, not the swap

    def patch(entries: list[tuple[int, str]], tensors: list[torch.Tensor]) -> list | None:
        left: list | None = None
        for index, key in entries:
            view = tensors[index]
            target = model_dtypes.get(key)
            if target is not None:  # the weight as the model dtype holds it, in its own bytes
                as_model = view.to(target)
                view = view.view(target)
                view.copy_(as_model)
                left = left or [None] * len(tensors)
                left[index] = target
            for patches, dtype in stages[key]:
                _patch_view(view, key, patches, dtype, *funcs[key])
        return left

    def transform(unit_name: str, tensors: list[torch.Tensor]) -> list | None:
        entries = wanted[unit_name]  # the engine calls it for these units only
        if unit_name in scaled:
            with bound(unit_name, tensors):
                return patch(entries, tensors)
        return patch(entries, tensors)

    logger.info("wan_blockswap: applying patches to %d swapped weights per copy", len(stages))
    swap.set_transform(transform, wanted)


def swapped_tensor_at(swap: BlockSwap, key: str) -> torch.Tensor | None:
    """The swapped tensor behind core's key ``key`` (``diffusion_model.…``), or ``None`` for
    a resident or non-model key."""
    if not key.startswith(MODEL_PREFIX):
        return None
    return swap.swapped_parameter(key[len(MODEL_PREFIX) :])


def swapped_hook_patches(patcher: Any, swap: BlockSwap, hooks: Any) -> dict[str, list]:
    """The patches of the hook group ``hooks`` (core's ``get_combined_hook_patches``) that
    fall on swapped weights: core patches resident weights itself, but would write these into
    0-element placeholders.

    Raises:
        BlockSwapConfigError: a hook patches a swapped GGUF-quantized weight (those are
            patched by ComfyUI-GGUF while dequantizing, which knows nothing of hooks).
    """
    if hooks is None:
        return {}
    found = {}
    for key, patches in patcher.get_combined_hook_patches(hooks=hooks).items():
        tensor = swapped_tensor_at(swap, key)
        if tensor is None:
            continue
        if _is_gguf_quantized(tensor):
            raise BlockSwapConfigError(
                f"a scheduled LoRA hook patches {key}, a GGUF-quantized weight that WAN "
                "BlockSwap streams from host memory; hooks on those are not supported. Load "
                "the LoRA with a regular LoRA loader (before or after the node), or keep that "
                "block resident (fewer blocks_to_swap)."
            )
        found[key] = patches
    return found


def _patch_view(
    view: torch.Tensor,
    key: str,
    patches: list,
    dtype: torch.dtype | None,
    set_func: Any,
    convert_func: Any,
) -> None:
    """Core's recipe for patching one weight (``ModelPatcher.patch_weight_to_device``),
    writing the result into the slot view instead of the module. ``dtype``: what the patch is
    computed in (None: core's LoRA compute dtype for the view's device)."""
    if dtype is None:
        compute_dtype = getattr(comfy.model_management, "lora_compute_dtype", None)
        dtype = compute_dtype(view.device) if compute_dtype is not None else FP32
    temp = view.to(dtype, copy=True)
    if convert_func is not None:
        temp = convert_func(temp, inplace=True)
    out = comfy.lora.calculate_weight(patches, temp, key)
    seed = comfy.model_patcher.string_to_seed(key)
    if set_func is None:
        _write(view, comfy.float.stochastic_rounding(out, view.dtype, seed=seed))
    else:
        _write(view, set_func(out, seed=seed, return_weight=True))


def _write(view: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into the slot ``view``; a wrapper tensor (a re-quantized weight with a
    new scale) piece by piece ([Note: wrapper tensors] in ``wan_blockswap.units``)."""
    targets, sources = leaves(view), leaves(value)
    if len(targets) != len(sources):
        raise BlockSwapConfigError(
            f"a patched weight came back as {type(value).__name__} with {len(sources)} parts, "
            f"its slot holds {len(targets)}; keep that block resident (fewer blocks_to_swap)"
        )
    for target, source in zip(targets, sources):
        target.copy_(source)


def attach_gguf_patches(patcher: Any, swap: BlockSwap) -> None:
    """ComfyUI-GGUF patches quantized weights while dequantizing them, from a ``patches``
    attribute its patcher sets on each weight it loads (and clears on unpatch). Core never
    loads our swapped weights, so set it on them at every load; the tensor objects survive
    every slot rebinding."""
    for _, _, qualname, tensor in swap.swapped_parameters():
        key = MODEL_PREFIX + qualname
        if _is_gguf_quantized(tensor):
            tensor.patches = [(patcher.patches[key], key)] if key in patcher.patches else []


def _is_gguf_quantized(tensor: torch.Tensor) -> bool:
    """A ComfyUI-GGUF ``GGMLTensor`` holding quantized bytes (not F16/F32 data)."""
    qtype = getattr(tensor, "tensor_type", None)
    return qtype is not None and int(qtype) not in _GGUF_TORCH_TYPES


# GGML type ids ComfyUI-GGUF treats as plain torch tensors: F32 and F16.
_GGUF_TORCH_TYPES = (0, 1)
