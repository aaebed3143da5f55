"""A deeper look-ahead for preset "auto"'s compressed layer plans: more fixed slots where they
cost few bytes.

[Note: look-ahead of compressed layer plans]
Layer units in fixed slots pack several to a slot when they travel raw ([Note: packed
slots] in wan_blockswap/packed_slots.py), so the copies run ahead by the slots' bytes. Units
with compressed transfers do not pack: each takes a slot of its own, and the copies run
ahead by ``num_slots - 1`` units. At 1 frame transfer compression stays on (the copies are
exposed), and there that look-ahead is too short. Auto's plans keep Wan 14B's FFN layers
resident and stream the 50 MiB attention projections (the interleaved plan, ``plan.py``): while
a block's resident FFN computes, the copy engine fills the one free slot and then idles. On
an H100 with 40 Wan-14B blocks at 1 frame (a batch of both conditionings), ours ran at
0.388, 0.344 and 0.321 s/it with 4, 7 and 12 GiB free, against core's 0.506, 0.440 and 0.359
(session 28, ``benchmark_run18``): 0.77x and 0.78x where copies dominate, but 0.90x at 12
GiB, where each step should take about max(compute, copies). A model of the two streams
(``benchmarks/lookahead_model.py``: compute in proportion to each layer's FLOPs, 5.4 ms a
block as 8 blocks at 0.0436 s/it imply; compressed copies at 80 GB/s; a copy waits for a
free slot) gives, for Wan 14B's real sizes:

| weights GiB | 2 slots | 3 slots | 4 slots |
|---|---|---|---|
| 2.23 (4 GiB free) | 362 ms | 334 | 336 |
| 5.04 (7 GiB free) | 325 | 296 | 298 |
| 10.05 (12 GiB free) | 319 | 298 | 243 |

and at 10.05 GiB the planner kept 14 whole blocks with 2 and 3 slots (see
``PREFER_SPREAD_WITHIN`` in ``plan.py``); with the interleaved plan there, 3 slots model at
261 ms. Where 3 and 4 slots differ by 2 ms the fourth costs nothing measurable, so the rule
takes as many as pass. So where the plan auto picks is fixed slots of
compressed layer units, auto gives it more slots, up to MAX_SLOTS, while the deeper plan moves
at most MORE_BYTES_ALLOWED more bytes per forward than the plan with the slots asked for
(each slot holds the largest streamed layer, so fewer layers stay resident). Streamed plans
(the least VRAM) and raw plans are left as they are: the floor does not move, and packing
already looks ahead. A user's ``prefetch_blocks`` other than the default stays as it is.
Once auto drops compression the deeper plan stays until the budget moves enough to re-plan
(its extra bytes then hide behind compute, which is why compression was dropped); a swap
applied anew after a failed re-plan in place starts with the slots asked for.

Measured in session 29 (H100, ``benchmark_run19``), the two flags together against the
node as it was, in one command each: at 1 frame with 12 GiB free 0.342 s/it against 0.366
(core's two arms 0.380 and 0.364), auto's timed forwards 309-314 ms against 323-342; at 81
frames with 12 GiB free, where auto drops compression and this rule no longer applies, the
same prompt times (0.992-0.996x core's against 0.995x) and peak RSS. The gain is the deeper
look-ahead's: at the budget that run planned (10.01 GiB) ``PREFER_SPREAD_WITHIN`` picks the
same plan either way, so that one is modelled only (at 9.98 GiB with four slots it avoids
13 whole blocks: 287 against 244 ms). Both are on by default; the 4 and 7 GiB rows the
model predicts gains for are not yet measured with them (the benchmark's
``ours_no_lookahead`` arm turns both off).
"""

from __future__ import annotations

import dataclasses

from ..wan_blockswap import (
    InsufficientMemoryError,
    ModelSizes,
    SwapConfig,
    SwapPlan,
    plan_swap,
)

# On since session 29's server run (see the note)
DEEPEN_COMPRESSED_LOOKAHEAD = True
MAX_SLOTS = 4  # the model's gain stops at 3-4 slots
MORE_BYTES_ALLOWED = 0.02  # of the bytes the plan with the slots asked for moves per forward
# Only a look-ahead left at its default is deepened: a user's prefetch_blocks (0 to save VRAM,
# or another value to keep two models' slots apart) stays
DEFAULT_PREFETCH_BLOCKS = SwapConfig().prefetch_blocks


def deepen(
    sizes: ModelSizes, config: SwapConfig, compressing: bool, asked: SwapPlan | None = None
) -> SwapConfig:
    """``config``, with more fixed slots where its plan (``asked``, where the caller has it)
    is fixed slots of compressed layer units and ``compressing`` (the swap's units still
    travel compressed, or a new swap's will) ([Note: look-ahead of compressed layer
    plans])."""
    if not DEEPEN_COMPRESSED_LOOKAHEAD or not compressing:
        return config
    if config.prefetch_blocks != DEFAULT_PREFETCH_BLOCKS:  # the user's own choice stays
        return config
    asked = asked if asked is not None else plan_swap(sizes, config)
    if not _compressed_layer_slots(asked):
        return config
    chosen = config
    for prefetch in range(config.prefetch_blocks + 1, MAX_SLOTS):
        deeper = dataclasses.replace(config, prefetch_blocks=prefetch)
        try:
            plan = plan_swap(sizes, deeper)
        except InsufficientMemoryError:
            break
        if not _compressed_layer_slots(plan) or plan.swapped_bytes > asked.swapped_bytes * (
            1 + MORE_BYTES_ALLOWED
        ):
            break
        chosen = deeper
    return chosen


def _compressed_layer_slots(plan: SwapPlan) -> bool:
    return plan.kind == "slots" and plan.swap_unit == "layer" and plan.compressed
