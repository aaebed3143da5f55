"""Advice per GPU size for a real checkpoint, without a GPU.

The planner is pure, so the plan each card gets follows from two things the script knows
before measuring anything: the file's real block sizes (its header) and the VRAM a forward of
the chosen latent needs beside the weights (the architecture record's measured activation
figure). Every number here is an estimate and says so: the CUDA context, the allocator's
slack and the link speed are assumptions, printed with the advice.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model_configs import PRESETS
from .wan_blockswap import InsufficientMemoryError, SwapConfig, plan_swap
from .wan_blockswap.plan import GIB, min_streamed_budget

# Assumptions of every estimate (printed with the advice):
CONTEXT_GIB = 1.0  # CUDA context, cuBLAS workspaces and allocator slack beside tensors
LINK_GBPS = 25.0  # pinned host-to-device copies on PCIe 4.0 x16 (RTX 3090/4090 class)
AUTO_PRESET = "auto (free VRAM now)"  # the ComfyUI node's preset that plans from free VRAM


@dataclass(frozen=True)
class GpuAdvice:
    """What one card size gets for this file and latent (estimates)."""

    vram_gb: int
    fits: bool
    advice: str  # one line for the user: the library setting, or why none
    weights_on_gpu_gib: float = 0.0  # resident weights plus the ring of slots
    vram_gib: float = 0.0  # weights on the GPU + activations + context
    moved_gib: float = 0.0  # weights copied to the GPU per forward
    transfer_s: float = 0.0  # their copy time at LINK_GBPS, per forward
    vram_budget_gb: float | None = None  # the equivalent fixed setting
    preset: str | None = None  # a named preset of the node that leaves room for this latent


def activation_gib(file_model, tokens: int, compute_bytes: int) -> float:
    """VRAM one forward of ``tokens`` latent tokens needs beside the weights (estimate)."""
    per = file_model.arch.activation_bytes_per_token_channel
    return per * tokens * file_model.hidden_size * compute_bytes / 2 / GIB


def advise(
    file_model, tokens: int, compute_bytes: int, sizes_gb: tuple[int, ...]
) -> list[GpuAdvice]:
    """One :class:`GpuAdvice` per card size, smallest first."""
    sizes = file_model.sizes
    total = sizes.other_bytes + sum(b.nbytes for b in sizes.blocks)
    activations = activation_gib(file_model, tokens, compute_bytes)
    blocks = len(sizes.blocks)
    advice = []
    for vram_gb in sizes_gb:
        room = vram_gb - CONTEXT_GIB - activations  # GiB left for weights
        if total / GIB <= room:
            advice.append(
                GpuAdvice(
                    vram_gb, True, "fits without swapping: no node needed (blocks_to_swap 0)",
                    total / GIB, total / GIB + activations + CONTEXT_GIB,
                )  # fmt: skip
            )
            continue
        plan = _plan(sizes, room)
        if plan is None:
            least = min_streamed_budget(sizes)
            need = (least or total) / GIB + activations + CONTEXT_GIB
            advice.append(
                GpuAdvice(
                    vram_gb, False,
                    f"does not fit: even streaming every layer needs about {need:.1f} GiB; "
                    "use fewer frames or a lower resolution, or an fp8/GGUF file",
                )  # fmt: skip
            )
            continue
        swapped = set(plan.swapped)
        whole = sum(1 for b in sizes.blocks if b.name in swapped) - len(plan.kept_layers)
        if plan.window_bytes:
            how = "every layer streamed one at a time"
        elif plan.kept_layers:
            how = (
                f"{plan.swapped_bytes / GIB:.1f} of {total / GIB:.1f} GiB streamed, layer by layer"
            )
        else:
            how = f"{whole} of {blocks} blocks in host memory"
        preset = _named_preset(file_model, vram_gb, room)
        line = f"vram_budget_gb={room:.1f}: {how}"
        moved = plan.swapped_bytes / GIB
        advice.append(
            GpuAdvice(
                vram_gb, True, line, plan.gpu_weight_bytes / GIB,
                plan.gpu_weight_bytes / GIB + activations + CONTEXT_GIB, moved,
                moved * GIB / (LINK_GBPS * 1e9), round(room, 1), preset,
            )  # fmt: skip
        )
    return advice


def comfyui_hint(row: GpuAdvice) -> str:
    """The node's preset for a card that needs swapping."""
    named = f' (or "{row.preset}")' if row.preset else ""
    return f'in ComfyUI: WAN BlockSwap, preset "{AUTO_PRESET}"{named}'


def _plan(sizes, room_gib: float):
    if room_gib <= 0:
        return None
    try:
        return plan_swap(sizes, SwapConfig(vram_budget_gb=room_gib))
    except InsufficientMemoryError:
        return None


def _named_preset(file_model, vram_gb: int, room_gib: float) -> str | None:
    """The node's named preset for this model and card, if its budget fits this latent."""
    variant = file_model.variant
    for preset in PRESETS if variant is not None else ():
        budget = dict(preset.options).get("vram_budget_gb")
        if preset.variant == variant.name and preset.vram_gb == vram_gb and budget <= room_gib:
            return preset.name
    return None


def assumptions(file_model, tokens: int, compute_bytes: int) -> str:
    return (
        f"estimates, not measurements: {activation_gib(file_model, tokens, compute_bytes):.2f} "
        f"GiB of activations for {tokens:,} tokens (ComfyUI's {file_model.arch.family} code, one "
        f"conditioning per forward), {CONTEXT_GIB:.1f} GiB for the CUDA context and allocator, "
        f"copies at {LINK_GBPS:.0f} GB/s (PCIe 4.0 x16; PCIe 5.0 cards copy about twice as "
        f"fast); a copy is hidden when a forward computes longer than it takes"
    )
