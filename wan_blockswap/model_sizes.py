"""Measuring a model for the planner: its candidate swap units at every granularity and
their sizes, and the units a plan chooses."""

from __future__ import annotations

from typing import Any

from torch import nn

from . import compressed_transfer
from .errors import BlockSwapConfigError
from .layout import ModelLayout
from .swap_plan import BlockSizes, ModelSizes, SwapPlan
from .storage import PackedLayout
from .units import (
    LAYER_UNIT_MIN_SHARE,
    SwapUnit,
    block_unit,
    embedding_unit,
    find_blocks,
    layer_units,
    leaves,
    resolve,
    shared_tensor_ids,
    stream_layer_units,
    tensor_refs,
)


def unit_layout(layout: ModelLayout, chunk_tokens: int) -> ModelLayout:
    """The layout a swap cuts its units by: ``layout``, or without token-wise parts where
    nothing runs in chunks (``SwapConfig.chunk_tokens`` 0), whose parts then need no unit of
    their own ([Note: token chunks])."""
    return layout if chunk_tokens else layout.without_token_wise()


def measure_model(model: nn.Module, layout: ModelLayout) -> tuple[dict[str, Any], ModelSizes]:
    """Candidate units of every granularity, and the sizes the planner needs; each block's
    token-wise parts (see :func:`unit_layout`) are one layer unit each."""
    shared = shared_tensor_ids(model)
    blocks = find_blocks(model, layout)
    block_units = {b.qualname: block_unit(b, shared) for b in blocks}
    layers = {b.qualname: layer_units(b, shared) for b in blocks}
    embeddings = {
        kind: [embedding_unit(model, path, shared) for path in paths if _exists(model, path)]
        for kind, paths in (("txt", layout.txt_emb), ("img", layout.img_emb))
    }
    total = sum(packed_bytes(u) for u in (_whole_model_unit(model),))
    block_bytes = {name: packed_bytes(unit) for name, unit in block_units.items()}
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
        txt_emb_packable_bytes=sum(packable_bytes(u) for u in embeddings["txt"]),
        img_emb_packable_bytes=sum(packable_bytes(u) for u in embeddings["img"]),
        blocks=tuple(
            BlockSizes(
                name=b.qualname,
                list_path=b.list_layout.path,
                role=b.role,
                nbytes=block_bytes[b.qualname],
                layer_bytes=tuple(packed_bytes(u) for u in layers[b.qualname]),
                packable_bytes=packable_bytes(block_units[b.qualname]),
            )
            for b in blocks
        ),
        other_bytes=max(0, total - sum(block_bytes.values())),
        txt_emb_bytes=sum(packed_bytes(u) for u in embeddings["txt"]),
        img_emb_bytes=sum(packed_bytes(u) for u in embeddings["img"]),
        stream_layer_bytes=tuple(packed_bytes(u) for u in stream_layers),
        stream_layer_packable_bytes=sum(packable_bytes(u) for u in stream_layers),
    )
    candidates = {
        "blocks": block_units,
        "layers": layers,
        "embeddings": embeddings,
        "stream_layers": stream_layers,
    }
    return candidates, sizes


def every_candidate(units: dict[str, Any]) -> list[SwapUnit]:
    """Every unit of ``measure_model``'s candidates, of every granularity."""
    return [
        *units["blocks"].values(),
        *(unit for layers in units["layers"].values() for unit in layers),
        *(unit for kind in units["embeddings"].values() for unit in kind),
        *units["stream_layers"],
    ]


def choose_units(units: dict[str, Any], plan: SwapPlan) -> list[SwapUnit]:
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


def packable_bytes(unit: SwapUnit) -> int:
    """bf16 bytes in tensors large enough to travel compressed."""
    tensors = (leaf for ref in unit.tensors for leaf in leaves(ref.get()))
    return sum(2 * t.numel() for t in tensors if compressed_transfer.is_packable(t))


def packed_bytes(unit: SwapUnit) -> int:
    pieces = (leaf for ref in unit.tensors for leaf in leaves(ref.get()))
    return PackedLayout.of((leaf.size(), leaf.dtype) for leaf in pieces).nbytes
