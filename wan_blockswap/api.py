"""The public entry points."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn


from .config import DEFAULT_CHUNK_TOKENS, SwapConfig
from .engine import BlockSwap, active_swap, measure_model
from .model_sizes import unit_layout
from .errors import BlockSwapConfigError, BlockSwapStateError
from .layout import ModelLayout, detect_layout
from .plan import GIB, ModelSizes, SwapPlan, min_streamed_budget, plan_swap

logger = logging.getLogger("wan_blockswap")


def apply_block_swap(
    model: nn.Module,
    config: SwapConfig | None = None,
    *,
    layout: ModelLayout | None = None,
    device: torch.device | str | None = None,
    replace: bool = False,
    **options: Any,
) -> BlockSwap:
    """Stream some of ``model``'s transformer blocks from pinned host memory during forward.

    Blocks the plan keeps on the GPU, and every weight outside the blocks, are moved to
    ``device``; swapped blocks are packed into one page-locked host buffer each and copied
    into a small ring of GPU slots just ahead of use, on a separate copy stream. A
    ``vram_budget_gb`` below what slots need streams every large layer instead, outside the
    blocks too, each into GPU memory of its own size (see :func:`min_vram_budget_gb`). Outputs are
    bit-identical to the unswapped model. Inference only (run under ``torch.no_grad()`` or
    ``torch.inference_mode()``).

    Args:
        model: the transformer (a ComfyUI ``diffusion_model``, a diffusers transformer, or any
            module with lists of blocks).
        config: the options; ``None`` means ``SwapConfig(**options)``.
        layout: where the blocks are; ``None`` detects it through the architecture records (known
            architectures by class and structure, others by the generic rule).
        device: where compute runs; ``None`` picks ``cuda`` when available, else ``cpu`` (where
            the engine still runs the whole mechanism, useful for tests).
        replace: if ``model`` already has a block swap, remove it first instead of raising.
        **options: :class:`SwapConfig` fields, when ``config`` is not given.

    Returns:
        A :class:`BlockSwap` handle: ``.plan`` says what went where, ``.stats`` counts copies,
        ``.remove()`` restores the model.

    Raises:
        BlockSwapConfigError: bad or contradictory options, or options that do not fit the
            model; nothing is changed.
        InsufficientMemoryError: the plan does not fit in host RAM or VRAM; nothing changed.
        BlockSwapStateError: ``model`` already has a block swap and ``replace`` is false.

    Example:
        >>> import torch
        >>> from wan_blockswap import apply_block_swap
        >>> swap = apply_block_swap(transformer, blocks_to_swap=20, prefetch_blocks=1)
        >>> with torch.inference_mode():
        ...     out = transformer(**inputs)
        >>> swap.remove()
    """
    if config is None:
        config = SwapConfig.from_options(**options)
    elif options:
        raise BlockSwapConfigError(
            f"pass either config or keyword options, not both (got {sorted(options)})"
        )
    if replace:
        remove_block_swap(model)
    if layout is None:
        layout = detect_layout(model)
    return BlockSwap.apply(model, config, layout, resolve_device(device))


def remove_block_swap(model: nn.Module) -> bool:
    """Undo :func:`apply_block_swap` on ``model``; returns whether there was one."""
    swap = active_swap(model)
    if swap is None:
        return False
    swap.remove()
    return True


def get_block_swap(model: nn.Module) -> BlockSwap | None:
    """The active :class:`BlockSwap` of ``model``, or ``None``."""
    return active_swap(model)


def plan_for(model: nn.Module, config: SwapConfig, layout: ModelLayout | None = None) -> SwapPlan:
    """The plan :func:`apply_block_swap` would use, without changing anything (for a model
    already swapped: the sizes it had before)."""
    return plan_swap(_sizes_of(model, layout, config.chunk_tokens), config)


def min_vram_budget_gb(model: nn.Module, layout: ModelLayout | None = None) -> float:
    """The smallest ``vram_budget_gb`` any plan accepts for ``model``: every large layer
    streamed one at a time, so only the small tensors (norms, biases, modulation) stay on the
    GPU, plus a 1 KiB window. The GPU then briefly holds one layer beside them.

    Raises:
        BlockSwapConfigError: the model has no layers to stream.
    """
    least = min_streamed_budget(_sizes_of(model, layout))
    if least is None:
        raise BlockSwapConfigError(f"{type(model).__name__} has no layers to stream")
    return least / GIB


def _sizes_of(
    model: nn.Module, layout: ModelLayout | None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> ModelSizes:
    """The planner's sizes, the units cut as a swap with ``chunk_tokens`` cuts them."""
    swap = active_swap(model)
    if swap is not None and swap.sizes is not None:  # placeholders hide the sizes now
        return swap.sizes
    if layout is None:
        layout = detect_layout(model)
    return measure_model(model, unit_layout(layout, chunk_tokens))[1]


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None`` -> the current CUDA device if there is one, else the CPU; names checked."""
    if device is None:
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise BlockSwapConfigError(
            f"device {device!r} is not a device name: use 'cuda', 'cuda:N' or 'cpu'"
        ) from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BlockSwapConfigError(
                "device='cuda' was requested but this torch has no CUDA device; "
                "use device='cpu' or install a CUDA build of torch"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif not 0 <= device.index < torch.cuda.device_count():
            raise BlockSwapConfigError(
                f"device {str(device)!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type != "cpu":
        raise BlockSwapConfigError(f"device type {device.type!r} is not supported (cuda or cpu)")
    return device
