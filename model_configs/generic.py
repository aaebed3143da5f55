"""The fallback for transformers we have no record for: the largest lists of alike blocks.

A container (``ModuleList``/``ModuleDict``/``Sequential``) qualifies when it has at least two
children of one class that hold parameters. Lists nested inside another qualifying list, and
lists too small to matter, are left out. Declaration order is only a first guess: the engine
learns the real execution order on the first forward.
"""

from __future__ import annotations

import logging

from torch import nn

from ..wan_blockswap.errors import BlockSwapConfigError
from .base import ArchConfig, BlockListLayout, ModelLayout

logger = logging.getLogger("wan_blockswap")

# A list must hold at least this share of the model's bytes to be worth swapping.
MIN_LIST_SHARE = 0.05


def generic_config(model: nn.Module) -> ArchConfig:
    """An :class:`ArchConfig` for ``model`` built from its structure alone."""
    total = _nbytes(model)
    candidates = []
    for path, container in model.named_modules():
        if not path or not isinstance(container, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            continue
        children = [c for c in container._modules.values() if c is not None]
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        size = _nbytes(container)
        if size == 0 or size < MIN_LIST_SHARE * total:
            continue
        candidates.append((path, len(children), size))
    chosen = [
        (path, count, size)
        for path, count, size in candidates
        if not any(path.startswith(other + ".") for other, _, _ in candidates)
    ]
    if not chosen:
        raise BlockSwapConfigError(
            f"found no block list in {type(model).__name__}: no architecture record matches "
            f"it, and the generic rule (a ModuleList, ModuleDict or Sequential of at least "
            f"two modules of one class holding at least {MIN_LIST_SHARE:.0%} of the weights) "
            f"found none. Pass layout=ModelLayout(name=..., block_lists="
            f"(BlockListLayout('path.to.blocks'),)) naming its block lists"
        )
    logger.info(
        "no model config matches %s; generic rule found block lists: %s",
        type(model).__name__,
        ", ".join(
            f"{path} ({count} blocks, {size / 2**30:.2f} GiB)" for path, count, size in chosen
        ),
    )
    layout = ModelLayout(
        name="generic", block_lists=tuple(BlockListLayout(path) for path, _, _ in chosen)
    )
    return ArchConfig(
        name="generic",
        family="generic",
        layout_kind="generic",
        class_names=(type(model).__name__,),
        layout=layout,
    )


def _nbytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total
