"""Deciding which blocks live where: a pure function from sizes and options to a plan.

Presets, ``vram_budget_gb``, the CLI's advice and ComfyUI's "auto" mode all go through
:func:`plan_swap`, so it takes plain numbers and needs no GPU.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from .compressed_transfer import staging_bytes
from .config import SwapConfig
from .errors import BlockSwapConfigError, InsufficientMemoryError
from .layout import MAIN_ROLE, TXT_EMB_ROLE

# BlockSizes too: callers import the plan's types from here
from .swap_plan import GIB, BlockSizes, ModelSizes, SwapPlan  # noqa: F401

# The window of the least-VRAM streamed plan: smaller than any layer worth streaming, so
# layers stream one at a time
MIN_STREAM_WINDOW = 1024
# With compressed transfers the interleaved plan is taken where it moves at most this share
# more bytes than the best plan of whole blocks (0: fewest bytes decides); see
# :func:`_interleaved`
PREFER_SPREAD_WITHIN = 0.01


def plan_swap(sizes: ModelSizes, config: SwapConfig) -> SwapPlan:
    """Decide which blocks stay on the GPU and which stream from host memory.

    Raises:
        BlockSwapConfigError: an option does not fit this model (names the option, the
            allowed range and the model's block count).
        InsufficientMemoryError: ``vram_budget_gb`` is below what any plan needs.
    """
    main = sizes.with_role(MAIN_ROLE)
    _check_against_model(config, sizes)
    units = ("layer",) if config.swap_unit == "layer" else ("block",)
    if config.vram_budget_gb is None:
        swapped_main = _swapped_main(config, len(main))
        return _build(
            sizes, config, swapped_main, _swapped_others(config, swapped_main, sizes), units[0]
        )
    if config.swap_unit == "auto":
        units = ("block", "layer")
    budget = int(config.vram_budget_gb * GIB)
    smallest: SwapPlan | None = None
    best: SwapPlan | None = None
    for unit in units:
        # Most resident blocks that fit; in layer mode the budget left over keeps single
        # layers of swapped blocks on the GPU too, so the whole budget cuts transfers.
        for swapped_count in range(len(main) + 1):
            swapped_main = spread(swapped_count, len(main))
            others = _swapped_others(config, swapped_main, sizes)
            plan = _build(sizes, config, swapped_main, others, unit)
            if plan.gpu_weight_bytes <= budget:
                plan = _fill_with_layers(sizes, plan, budget) if unit == "layer" else plan
                # Fewest bytes copied per forward wins; at a tie whole blocks (fewer copies).
                if best is None or plan.swapped_bytes < best.swapped_bytes:
                    best = plan
                break
            if smallest is None or plan.gpu_weight_bytes < smallest.gpu_weight_bytes:
                smallest = plan
        if unit == "layer" and swapped_count > 0:
            interleaved = _interleaved(sizes, config, budget)
            if interleaved is not None and (best is None or _spread_wins(interleaved, best)):
                best = interleaved
    if best is not None:
        return best
    streamed = streamed_plan(sizes, config, budget) if config.swap_unit != "block" else None
    if streamed is not None:
        return streamed
    assert smallest is not None
    floor = streamed_plan(sizes, config, None)
    raise InsufficientMemoryError(
        f"vram_budget_gb={config.vram_budget_gb} is below what this model needs on the GPU: at "
        f"least {smallest.gpu_weight_bytes / GIB:.2f} GiB with fixed slots (non-block weights "
        f"and {smallest.num_slots} slots of {smallest.slot_bytes / 2**20:.0f} MiB with every "
        f"block swapped)"
        + (
            f", or more than {floor.resident_bytes / GIB:.3f} GiB streaming layer by layer "
            f"(the small tensors that stay; one layer of up to "
            f"{floor.slot_bytes / 2**20:.0f} MiB then sits beside them at a time)"
            if floor is not None and config.swap_unit != "block"
            else ""
        )
        + f". Raise vram_budget_gb, lower prefetch_blocks (now {config.prefetch_blocks}), "
        f"or set offload_txt_emb/offload_img_emb."
    )


def _check_against_model(config: SwapConfig, sizes: ModelSizes) -> None:
    n_main = len(sizes.with_role(MAIN_ROLE))
    if config.blocks_to_swap is not None and config.blocks_to_swap > n_main:
        raise BlockSwapConfigError(
            f"blocks_to_swap must be in 0..{n_main} for this model ({n_main} blocks), "
            f"got {config.blocks_to_swap}"
        )
    if config.resident_blocks is not None:
        bad = [i for i in config.resident_blocks if i >= n_main]
        if bad:
            raise BlockSwapConfigError(
                f"resident_blocks entries must be in 0..{n_main - 1} for this model "
                f"({n_main} blocks), got {bad}"
            )
    for role, count in config.role_counts.items():
        n = len(sizes.with_role(role))
        if count > n:
            raise BlockSwapConfigError(
                f"{config.role_option(role)} must be in 0..{n} for this model ({n} {role} "
                f"blocks; 0 means automatic), got {count}"
            )


def _swapped_main(config: SwapConfig, n_main: int) -> set[int]:
    if config.resident_blocks is not None:
        return set(range(n_main)) - set(config.resident_blocks)
    count = n_main if config.blocks_to_swap is None else config.blocks_to_swap
    return spread(count, n_main)


def spread(count: int, n: int) -> set[int]:
    """``count`` of ``n`` block indices, evenly spaced, the last block always among them.

    Why not the last ``count``: the slots hold only a few units, so while a run of resident
    blocks computes the copy engine idles once the slots are full. Spread out, every resident
    block's compute hides the copy of the next swapped unit (on the H100 with 3 of 8 blocks
    swapped at 1,560 tokens the last-blocks layout left about 11 ms of copy time exposed
    per forward). The last block is swapped so prefetching wraps into the next forward early.
    """
    return {(i + 1) * n // count - 1 for i in range(count)} if count else set()


def _swapped_others(
    config: SwapConfig, swapped_main: set[int], sizes: ModelSizes
) -> dict[str, set[int]]:
    """Indices swapped in each role's lists besides main and txt_emb (VACE): as many as
    ``config`` counts for the role, or automatically the same share as of main blocks."""
    counts = config.role_counts
    main = len(sizes.with_role(MAIN_ROLE))
    swapped = {}
    for role in sizes.other_roles():
        n = len(sizes.with_role(role))
        count = counts.get(role, 0)
        if count == 0:  # automatic
            share = len(swapped_main) / main if main else 1.0
            count = round(share * n)
        swapped[role] = spread(count, n)
    return swapped


def _build(
    sizes: ModelSizes,
    config: SwapConfig,
    swapped_main: set[int],
    swapped_others: dict[str, set[int]],
    unit: Literal["block", "layer"],
) -> SwapPlan:
    swapped_names = {b.name for i, b in enumerate(sizes.with_role(MAIN_ROLE)) if i in swapped_main}
    for role, indices in swapped_others.items():
        swapped_names |= {b.name for i, b in enumerate(sizes.with_role(role)) if i in indices}
    txt_blocks = sizes.with_role(TXT_EMB_ROLE)
    if config.offload_txt_emb:
        swapped_names |= {b.name for b in txt_blocks}
    swapped = [b for b in sizes.blocks if b.name in swapped_names]
    resident = [b for b in sizes.blocks if b.name not in swapped_names]
    embeddings = _offloaded_embeddings(sizes, config.offload_txt_emb, config.offload_img_emb)

    resident_bytes = sizes.other_bytes - sum(embeddings) + sum(b.nbytes for b in resident)
    swapped_bytes = sum(embeddings)
    unit_sizes: list[int] = list(embeddings)
    for block in swapped:
        if unit == "layer":
            resident_bytes += block.nbytes - sum(block.layer_bytes)
            swapped_bytes += sum(block.layer_bytes)
            unit_sizes.extend(block.layer_bytes)
        else:
            swapped_bytes += block.nbytes
            unit_sizes.append(block.nbytes)
    num_slots = config.num_slots if unit_sizes else 0
    packable = sum(b.packable_bytes for b in swapped)
    packable += sizes.txt_emb_packable_bytes if config.offload_txt_emb else 0
    packable += sizes.img_emb_packable_bytes if config.offload_img_emb else 0
    compressed = bool(config.transfer_compression and unit_sizes and packable)
    return SwapPlan(
        swapped=tuple(b.name for b in swapped),
        resident=tuple(b.name for b in resident),
        offload_txt_emb=config.offload_txt_emb and bool(sizes.txt_emb_bytes or txt_blocks),
        offload_img_emb=config.offload_img_emb and bool(sizes.img_emb_bytes),
        swap_unit=unit,
        num_slots=num_slots,
        slot_bytes=max(unit_sizes, default=0),
        resident_bytes=resident_bytes,
        swapped_bytes=swapped_bytes,
        block_order=tuple((b.list_path, b.name) for b in sizes.blocks),
        staging_bytes=staging_bytes() if compressed else 0,
        compressed=compressed,
    )


def streamed_plan(sizes: ModelSizes, config: SwapConfig, budget: int | None) -> SwapPlan | None:
    """Every large layer streamed, with ``budget`` minus what stays resident as the window of
    layers on the GPU at once; None if nothing is left for the window. Without a budget: the
    least-VRAM plan, whose window of :data:`MIN_STREAM_WINDOW` holds one layer at a time.

    Why: fixed slots must each fit the largest unit and non-block weights stay resident, so
    their floor is well above what streaming one layer at a time needs (Wan 14B: 0.61 GiB
    against 0.3). ComfyUI core at a zero weight budget works that way, and below the slot
    plans so do we.
    """
    layers = [n for block in sizes.blocks for n in block.layer_bytes] + list(
        sizes.stream_layer_bytes
    )
    if not layers:
        return None
    resident = (
        sizes.other_bytes
        - sum(sizes.stream_layer_bytes)
        + sum(block.nbytes - sum(block.layer_bytes) for block in sizes.blocks)
    )
    window = MIN_STREAM_WINDOW if budget is None else budget - resident
    if window <= 0:
        return None
    packable = sum(b.packable_bytes for b in sizes.blocks) + sizes.stream_layer_packable_bytes
    return SwapPlan(
        swapped=tuple(b.name for b in sizes.blocks),
        resident=(),
        offload_txt_emb=False,
        offload_img_emb=False,
        swap_unit="layer",
        num_slots=1,
        slot_bytes=max(window, max(layers)),
        resident_bytes=resident,
        swapped_bytes=sum(layers),
        block_order=tuple((b.list_path, b.name) for b in sizes.blocks),
        compressed=bool(config.transfer_compression and packable),
        window_bytes=window,
    )


def min_streamed_budget(sizes: ModelSizes) -> int | None:
    """The least budget any plan accepts: what stays resident when every layer streams, plus
    a window of :data:`MIN_STREAM_WINDOW` (one layer at a time); None without layers."""
    floor = streamed_plan(sizes, SwapConfig(), None)
    return None if floor is None else floor.resident_bytes + MIN_STREAM_WINDOW


def _interleaved(sizes: ModelSizes, config: SwapConfig, budget: int) -> SwapPlan | None:
    """Every block streams a few of its layers, instead of some blocks streaming all of theirs.

    Why: with whole blocks swapped, a run of resident blocks computes while the slots are
    already full, so the copy engine idles, and a swapped block's copies then cost more than
    its compute can hide (H100, Wan-14B shapes, 3 of 8 blocks swapped at 1,560 tokens: about
    9 ms of copies exposed per forward). Spread over every block, each block's compute hides
    its own few copies. Keeping every large layer resident also shrinks the slots to the
    largest layer still streamed, which leaves room for more resident layers.

    With raw transfers fewest bytes decides between the two (raw layer units pack into the
    slots and look ahead by their bytes). With compressed ones that let a plan of whole
    blocks that moves a few MiB less win, and its resident runs left the copy engine idle
    all the same: with Wan 14B's sizes
    at 1 frame (compressed transfers, two slots, 10.05 GiB for weights) auto kept 14 whole
    blocks for 16.88 GiB moved per forward against the interleaved plan's 16.90, and a
    model of the two streams (compute as the FLOPs share of a block's 5.4 ms, copies at
    80 GB/s; ``benchmarks/lookahead_model.py``) puts them at 319 and 296 ms.
    So a compressed interleaved plan wins within PREFER_SPREAD_WITHIN (1%) more bytes. This
    is modelled, not measured on its own: in the one server run with it (session 29, with
    ComfyUI auto's deeper look-ahead) the budget gave the same plan either way; at 9.98 GiB
    with four slots it avoids 13 whole blocks (modelled 287 against 244 ms). See [Note:
    look-ahead of compressed layer plans] in ``callbacks/compressed_lookahead.py``.
    """
    every = set(range(len(sizes.with_role(MAIN_ROLE))))
    plan = _build(sizes, config, every, _swapped_others(config, every, sizes), "layer")
    if not plan.swapped or plan.gpu_weight_bytes > budget:
        return None
    return _fill_with_layers(sizes, plan, budget)


def _spread_wins(interleaved: SwapPlan, best: SwapPlan) -> bool:
    """Whether the interleaved plan beats ``best``: fewer bytes, or (PREFER_SPREAD_WITHIN
    set, compressed transfers) at most that share more, a tie included. Raw layer units pack
    into the slots and look ahead by their bytes ([Note: packed slots]), so for them fewest
    bytes still decides."""
    more = interleaved.swapped_bytes - best.swapped_bytes
    within = PREFER_SPREAD_WITHIN > 0 and best.compressed and interleaved.compressed
    return more < 0 or (within and more <= best.swapped_bytes * PREFER_SPREAD_WITHIN)


def _offloaded_embeddings(sizes: ModelSizes, txt: bool, img: bool) -> list[int]:
    """Bytes of each embedding that streams through the slots."""
    return [
        nbytes
        for nbytes, offloaded in ((sizes.txt_emb_bytes, txt), (sizes.img_emb_bytes, img))
        if offloaded and nbytes
    ]


def _fill_with_layers(sizes: ModelSizes, plan: SwapPlan, budget: int) -> SwapPlan:
    """Keep the largest layers of swapped blocks resident while they fit in ``budget``.

    Layers of equal size are kept round-robin over the blocks, even-numbered layers first, so
    the layers left streaming are spread over every block and through each block (no long
    stretch of resident compute with nothing to copy). Once every layer of some size is
    kept, the slots shrink to the largest layer still streamed and the bytes that frees keep
    more layers.
    """
    swapped = set(plan.swapped)
    candidates = sorted(
        (
            (-nbytes, index % 2, index, position, block.name)
            for position, block in enumerate(sizes.blocks)
            if block.name in swapped
            for index, nbytes in enumerate(block.layer_bytes)
        )
    )
    # The slots also carry offloaded embeddings, which are never kept.
    floor = max(_offloaded_embeddings(sizes, plan.offload_txt_emb, plan.offload_img_emb), default=0)
    room = budget - plan.gpu_weight_bytes
    slot_bytes = plan.slot_bytes
    kept: dict[tuple[str, int], int] = {}
    while True:
        for negative, _, index, _, name in candidates:
            if (name, index) not in kept and -negative <= room:
                kept[(name, index)] = -negative
                room += negative
        streamed = [-c[0] for c in candidates if (c[4], c[2]) not in kept]
        if not streamed:  # keeping every layer: the slots still need a unit
            return plan
        smaller = max(max(streamed), floor)
        if smaller >= slot_bytes:
            break
        room += plan.num_slots * (slot_bytes - smaller)
        slot_bytes = smaller
    if not kept:
        return plan
    kept_bytes = sum(kept.values())
    return replace(
        plan,
        kept_layers=tuple(sorted(kept)),
        slot_bytes=slot_bytes,
        resident_bytes=plan.resident_bytes + kept_bytes,
        swapped_bytes=plan.swapped_bytes - kept_bytes,
    )
