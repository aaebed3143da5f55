"""What the planner reads and writes: the sizes of a model's parts, and the plan that says
which blocks live where and the VRAM that costs. Pure data; :mod:`.plan` decides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Literal

if TYPE_CHECKING:
    import torch

from .layout import MAIN_ROLE, TXT_EMB_ROLE

GIB = 2**30


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

    def other_roles(self) -> tuple[str, ...]:
        """Roles of block lists counted by ``SwapConfig.role_blocks_to_swap`` (VACE), in
        order of first appearance."""
        roles = dict.fromkeys(block.role for block in self.blocks)
        return tuple(role for role in roles if role not in (MAIN_ROLE, TXT_EMB_ROLE))


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
