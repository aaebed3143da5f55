"""A model of the copy and compute streams of a swap plan, for Wan 14B at 1 frame: how long a
step takes with the look-ahead a plan's fixed slots give ([Note: look-ahead of compressed
layer plans] in callbacks/compressed_lookahead.py).

No GPU: each large layer computes for its share of a block's time (in proportion to its
FLOPs: the cross-attention's k and v see 512 text tokens, the rest every latent token, and the
attention itself a tenth of the block), each streamed layer copies at a fixed rate, and a copy
waits for a free slot (one unit per slot, as compressed units travel). Its input is the
planner's own plan for the real model's sizes (core's WanModel, 40 blocks, bf16, measured on
the meta device). With 5.4 ms a block (8 blocks that fit ran at 0.0436 s/it) and 80 GB/s it
gives 363, 325 and 319 ms for the plans auto made in the session-28 H100 rows (4, 7 and 12 GiB
free), which ran 388, 344 and 321 ms a step: 2-25 ms less, a step being more than its
forward.

    python benchmarks/lookahead_model.py [--block-ms 5.4] [--gbps 80] [--budgets 2.23 5.04 10.05]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _pack  # noqa: E402,F401  (this checkout as comfyui_wan_blockswap)

from comfyui_wan_blockswap.callbacks import compressed_lookahead  # noqa: E402
from comfyui_wan_blockswap.wan_blockswap import (  # noqa: E402
    BlockSizes,
    ModelSizes,
    SwapConfig,
    SwapPlan,
    plan_swap,
)
from comfyui_wan_blockswap.wan_blockswap import plan as plan_module  # noqa: E402

GIB = 2**30
ATTENTION = 5120 * 5120 * 2 + 5120 * 2  # one of a block's eight attention projections
FFN_IN, FFN_OUT = 13824 * 5120 * 2 + 13824 * 2, 5120 * 13824 * 2 + 5120 * 2
LAYERS = (ATTENTION,) * 8 + (FFN_IN, FFN_OUT)
# per layer: the share of latent tokens it sees (cross-attention k and v: 512 text tokens
# against 3,120 latent tokens of a batch of two at 1 frame, about a sixth)
TOKEN_SHARE = (1, 1, 1, 1, 1, 1 / 6, 1 / 6, 1, 1, 1)
ATTENTION_SHARE = 0.1  # of a block's time: the attention itself, after the self-attention's o


def wan14b_sizes() -> ModelSizes:
    """Wan 14B as the planner sees it with each large layer a unit: core's WanModel (40
    blocks, bf16) measured on the meta device."""
    blocks = tuple(
        BlockSizes(f"blocks.{i}", "blocks", "main", 702788608, LAYERS, packable_bytes=702545920)
        for i in range(40)
    )
    return ModelSizes(
        blocks,
        other_bytes=466104576,
        txt_emb_bytes=94392320,
        txt_emb_packable_bytes=94371840,
        stream_layer_bytes=(ATTENTION, 314634240, 41953280, ATTENTION),
        stream_layer_packable_bytes=461373440,
    )


def step_ms(plan: SwapPlan, block_ms: float, gbps: float, steps: int = 4) -> float:
    """Milliseconds per forward of ``plan`` over ``steps`` forwards in a row (the copies of
    the next forward start during this one)."""
    swapped, kept = set(plan.swapped), set(plan.kept_layers)
    weighted = sum(n * share for n, share in zip(LAYERS, TOKEN_SHARE))
    per_byte = block_ms * (1 - ATTENTION_SHARE) / weighted
    units: list[tuple[float, float | None]] = []  # (compute ms, copy ms or None: resident)
    for index in range(40):
        name = f"blocks.{index}"
        for layer, (nbytes, share) in enumerate(zip(LAYERS, TOKEN_SHARE)):
            compute = nbytes * share * per_byte + (block_ms * ATTENTION_SHARE if layer == 3 else 0)
            streamed = name in swapped and (name, layer) not in kept
            units.append((compute, nbytes / (gbps * 1e6) if streamed else None))
    order = units * steps
    streamed_at = [i for i, (_, copy) in enumerate(order) if copy is not None]
    computed = [0.0] * len(order)
    copied: dict[int, float] = {}
    slots, issued, copy_free, compute_free = plan.num_slots, 0, 0.0, 0.0
    for i, (compute, _) in enumerate(order):
        # issue copies in order while a slot is free: the unit ``slots`` copies back has run
        while issued < len(streamed_at):
            holder = streamed_at[issued - slots] if issued >= slots else None
            if holder is not None and holder >= i:
                break
            start = max(copy_free, computed[holder] if holder is not None else 0.0)
            copy_free = start + order[streamed_at[issued]][1]
            copied[streamed_at[issued]] = copy_free
            issued += 1
        compute_free = max(compute_free, copied.get(i, 0.0)) + compute
        computed[i] = compute_free
    return compute_free / steps


def compare(budgets: list[float], block_ms: float, gbps: float) -> list[dict]:
    """For each weight budget: auto's plan without the deeper look-ahead (two slots, fewest
    bytes deciding: the node before session 29) and with it (both flags, today's default),
    their bytes per forward and modelled milliseconds per forward."""
    sizes = wan14b_sizes()
    rows = []
    for budget in budgets:
        config = SwapConfig(vram_budget_gb=budget, swap_unit="auto", transfer_compression=True)
        with _flags(spread=0.0, deepen=False):
            before = plan_swap(sizes, config)
        with _flags(spread=0.01, deepen=True):
            after = plan_swap(sizes, compressed_lookahead.deepen(sizes, config, True))
        rows.append(
            {
                "budget_gib": budget,
                "before": _describe(before, block_ms, gbps),
                "after": _describe(after, block_ms, gbps),
            }
        )
    return rows


@contextlib.contextmanager
def _flags(spread: float, deepen: bool) -> Iterator[None]:
    """The two constants of [Note: look-ahead of compressed layer plans], set for a block."""
    saved = plan_module.PREFER_SPREAD_WITHIN, compressed_lookahead.DEEPEN_COMPRESSED_LOOKAHEAD
    plan_module.PREFER_SPREAD_WITHIN, compressed_lookahead.DEEPEN_COMPRESSED_LOOKAHEAD = (
        spread,
        deepen,
    )
    try:
        yield
    finally:
        plan_module.PREFER_SPREAD_WITHIN, compressed_lookahead.DEEPEN_COMPRESSED_LOOKAHEAD = saved


def _describe(plan: SwapPlan, block_ms: float, gbps: float) -> dict:
    return {
        "slots": plan.num_slots,
        "whole_resident_blocks": len(plan.resident),
        "moved_gib": round(plan.swapped_bytes / GIB, 3),
        "ms": round(step_ms(plan, block_ms, gbps), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--block-ms", type=float, default=5.4)
    parser.add_argument("--gbps", type=float, default=80.0)
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.23, 5.04, 10.05])
    args = parser.parse_args()
    for row in compare(args.budgets, args.block_ms, args.gbps):
        print(row)


if __name__ == "__main__":
    main()
