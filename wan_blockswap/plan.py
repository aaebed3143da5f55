"""Deciding which blocks live where: a pure function from sizes and options to a plan.

Presets, ``vram_budget_gb``, the CLI's advice and ComfyUI's "auto" mode all go through
:func:`plan_swap`, so it takes plain numbers and needs no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterable, Literal

if TYPE_CHECKING:
    import torch

from .compressed_transfer import staging_bytes
from .config import SwapConfig
from .errors import BlockSwapConfigError, InsufficientMemoryError

GIB = 2**30
# The window of the least-VRAM streamed plan: smaller than any layer worth streaming, so
# layers stream one at a time
MIN_STREAM_WINDOW = 1024


@dataclass(frozen=True)
class BlockSizes:
    """Bytes of one block, and of its large layers for layer-granularity swapping."""

    name: str
    list_path: str
    role: str
    nbytes: int
    layer_bytes: tuple[int, ...] = ()
    packable_bytes: int = 0  # bf16 bytes that transfer compression would pack


@dataclass(frozen=True)
class ModelSizes:
    """Byte counts of a model's parts, as the planner sees them.

    ``other_bytes`` counts everything outside blocks, embeddings included; an offloaded
    embedding is subtracted from it by the planner.
    """

    blocks: tuple[BlockSizes, ...]
    other_bytes: int
    txt_emb_bytes: int = 0
    img_emb_bytes: int = 0
    # bf16 bytes of the embeddings that transfer compression would pack: where nothing
    # swapped has any, the plan reserves no staging VRAM
    txt_emb_packable_bytes: int = 0
    img_emb_packable_bytes: int = 0
    # Large leaf layers outside the blocks (the layout's stream_modules and embeddings), which
    # a streamed plan streams too, and their bf16 bytes that compression would pack
    stream_layer_bytes: tuple[int, ...] = ()
    stream_layer_packable_bytes: int = 0

    def with_role(self, role: str) -> tuple[BlockSizes, ...]:
        return tuple(block for block in self.blocks if block.role == role)


@dataclass(frozen=True)
class SwapPlan:
    """Where every block goes, and the VRAM that costs.

    ``resident_bytes`` is every weight byte kept on the GPU (non-block weights, resident
    blocks, and in layer mode the small tensors of swapped blocks); ``swapped_bytes`` is what
    lives in host memory; the GPU also holds ``num_slots`` slots of ``slot_bytes``, and with
    transfer compression ``staging_bytes`` of staging buffers.

    A streamed plan (``window_bytes`` > 0) has no fixed slots: every large layer, inside the
    blocks and out, gets its GPU memory when it is prefetched and gives it back when it has
    run, with at most ``window_bytes`` of them on the GPU at once (a larger layer alone). It
    is one slot of ``max(window_bytes, largest layer)`` as far as VRAM is concerned. See
    [Note: streamed plans] in ``window_allocator.py``.
    """

    swapped: tuple[str, ...]
    resident: tuple[str, ...]
    offload_txt_emb: bool
    offload_img_emb: bool
    swap_unit: Literal["block", "layer"]
    num_slots: int
    slot_bytes: int
    resident_bytes: int
    swapped_bytes: int
    block_order: tuple[tuple[str, str], ...] = ()  # (list path, block name) for describe()
    # Layer mode only: (block name, layer index) of layers of swapped blocks kept on the GPU,
    # filling a VRAM budget that whole resident blocks leave partly unused.
    kept_layers: tuple[tuple[str, int], ...] = ()
    staging_bytes: int = 0
    compressed: bool = False  # bf16 weights travel packed (transfer_compression)
    window_bytes: int = 0

    @property
    def kind(self) -> Literal["streamed", "slots", "none"]:
        """``"streamed"``: every large layer (embeddings included, whatever
        ``offload_*_emb`` say) gets GPU memory of its own size within ``window_bytes``;
        ``"slots"``: swapped units take turns in ``num_slots`` fixed slots; ``"none"``:
        nothing is swapped."""
        if self.window_bytes:
            return "streamed"
        return "slots" if self.num_slots else "none"

    @property
    def ring_bytes(self) -> int:
        """VRAM of the fixed slots and (compressed transfers) their staging buffers."""
        return self.num_slots * self.slot_bytes + self.staging_bytes

    @property
    def gpu_weight_bytes(self) -> int:
        """VRAM for weights: everything resident plus the fixed slots."""
        return self.resident_bytes + self.ring_bytes

    @property
    def budgeted_bytes(self) -> int:
        """What the plan counts against ``vram_budget_gb``: its weight VRAM, except that a
        streamed plan counts its window, beside which a larger layer may briefly sit alone."""
        if self.kind == "streamed":
            return self.resident_bytes + self.window_bytes
        return self.gpu_weight_bytes

    def describe(self, device: "torch.device | str | None" = None) -> str:
        """One line per block list: ``blocks 0-27 on cuda:0, 28-39 in host memory`` (swapped
        blocks are spread through the list, so ranges alternate); "GPU" where the plan's
        ``device`` is not given. :meth:`BlockSwap.describe` gives the device it runs on."""
        on = f"on {device}" if device is not None else "on GPU"
        swapped = set(self.swapped)
        partly = {name for name, _ in self.kept_layers}
        lines = []
        lists: dict[str, list[tuple[int, str]]] = {}
        for path, name in self.block_order:
            where = "partly" if name in partly else "host" if name in swapped else "gpu"
            lists.setdefault(path, []).append((len(lists.get(path, [])), where))
        for path, entries in lists.items():
            parts = []
            for where, text in (
                ("gpu", on),
                ("host", "in host memory"),
                ("partly", "partly in host memory (their largest layers on GPU)"),
            ):
                indices = [i for i, w in entries if w == where]
                if indices:
                    parts.append(f"{_ranges(indices)} {text}")
            lines.append(f"{path} {', '.join(parts)}")
        extras = [
            name
            for name, flag in (("text", self.offload_txt_emb), ("image", self.offload_img_emb))
            if flag
        ]
        if extras:
            lines.append(f"{' and '.join(extras)} embedding streamed from host memory")
        if self.kept_layers:
            lines.append(f"{len(self.kept_layers)} layers of swapped blocks kept {on}")
        if self.kind == "streamed":
            lines.append(
                f"streamed layer by layer, outside the blocks too: at most "
                f"{self.window_bytes / 2**20:.0f} MiB of layers {on} at once (a larger layer "
                f"alone, up to {self.slot_bytes / 2**20:.0f} MiB); weights {on} "
                f"{self.gpu_weight_bytes / GIB:.2f} GiB at most, in host memory "
                f"{self.swapped_bytes / GIB:.2f} GiB"
            )
            return "\n".join(lines)
        lines.append(
            f"{self.swap_unit} swapping, {self.num_slots} slots of "
            f"{self.slot_bytes / 2**20:.1f} MiB"
            + (
                f" + {self.staging_bytes / 2**20:.0f} MiB compressed-transfer staging"
                if self.staging_bytes
                else ""
            )
            + f"; weights {on} "
            f"{self.gpu_weight_bytes / GIB:.2f} GiB, in host memory "
            f"{self.swapped_bytes / GIB:.2f} GiB"
        )
        return "\n".join(lines)


def plan_swap(sizes: ModelSizes, config: SwapConfig) -> SwapPlan:
    """Decide which blocks stay on the GPU and which stream from host memory.

    Raises:
        BlockSwapConfigError: an option does not fit this model (names the option, the
            allowed range and the model's block count).
        InsufficientMemoryError: ``vram_budget_gb`` is below what any plan needs.
    """
    main = sizes.with_role("main")
    vace = sizes.with_role("vace")
    _check_against_model(config, len(main), len(vace))
    units = ("layer",) if config.swap_unit == "layer" else ("block",)
    if config.vram_budget_gb is None:
        swapped_main = _swapped_main(config, len(main))
        return _build(
            sizes, config, swapped_main, _swapped_vace(config, swapped_main, main, vace), units[0]
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
            plan = _build(
                sizes, config, swapped_main, _swapped_vace(config, swapped_main, main, vace), unit
            )
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
            if interleaved is not None and (
                best is None or interleaved.swapped_bytes < best.swapped_bytes
            ):
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


def _check_against_model(config: SwapConfig, n_main: int, n_vace: int) -> None:
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
    if config.vace_blocks_to_swap > n_vace:
        raise BlockSwapConfigError(
            f"vace_blocks_to_swap must be in 0..{n_vace} for this model ({n_vace} VACE blocks; "
            f"0 means automatic), got {config.vace_blocks_to_swap}"
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


def _swapped_vace(
    config: SwapConfig,
    swapped_main: set[int],
    main: tuple[BlockSizes, ...],
    vace: tuple[BlockSizes, ...],
) -> set[int]:
    if not vace:
        return set()
    count = config.vace_blocks_to_swap
    if count == 0:  # automatic: the same share of VACE blocks as of main blocks
        share = len(swapped_main) / len(main) if main else 1.0
        count = round(share * len(vace))
    return spread(count, len(vace))


def _build(
    sizes: ModelSizes,
    config: SwapConfig,
    swapped_main: set[int],
    swapped_vace: set[int],
    unit: Literal["block", "layer"],
) -> SwapPlan:
    swapped_names = {b.name for i, b in enumerate(sizes.with_role("main")) if i in swapped_main}
    swapped_names |= {b.name for i, b in enumerate(sizes.with_role("vace")) if i in swapped_vace}
    txt_blocks = sizes.with_role("txt_emb")
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
    """
    main, vace = sizes.with_role("main"), sizes.with_role("vace")
    every = set(range(len(main)))
    plan = _build(sizes, config, every, _swapped_vace(config, every, main, vace), "layer")
    if not plan.swapped or plan.gpu_weight_bytes > budget:
        return None
    return _fill_with_layers(sizes, plan, budget)


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


def _ranges(indices: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out: list[str] = []
    items = sorted(indices)
    start = prev = items[0]
    for i in items[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(out)
