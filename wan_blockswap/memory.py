"""Checking that a plan fits in host RAM and VRAM before anything is allocated."""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from .errors import InsufficientHostMemoryError, InsufficientMemoryError
from .plan import GIB, SwapPlan
from .units import SwapUnit, stored_nbytes

logger = logging.getLogger("wan_blockswap")

# Headroom the check leaves for the allocator's fragmentation and the CUDA context.
VRAM_MARGIN_BYTES = 256 * 2**20
# host bytes of a compressed transfer per raw byte, bounded generously (typically
# compressed_transfer.TYPICAL_PACKED_SHARE; more where a unit holds other dtypes)
PACKED_SHARE = 0.8


def available_host_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo, or ``None`` where that does not exist."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits(
    model: nn.Module,
    chosen: Sequence[SwapUnit],
    plan: SwapPlan,
    device: torch.device,
    check_vram: bool = True,
    on_donors: Sequence[SwapUnit] = (),
) -> None:
    """Raise :class:`InsufficientMemoryError` if the plan cannot fit; allocate nothing.
    ``on_donors``: swapped units stored on a donor GPU, which need no host RAM (the donor's
    free memory was checked when they were assigned to it)."""
    donor_ids = {id(ref.get()) for unit in on_donors for ref in unit.tensors}
    swapped = {id(ref.get()) for unit in chosen for ref in unit.tensors} - donor_ids
    swapped_on_host = 0
    to_device = 0
    for tensor in _unique_tensors(model):
        nbytes = stored_nbytes(tensor)
        if id(tensor) in swapped:
            if tensor.device.type == "cpu":
                swapped_on_host += nbytes
        elif tensor.device != device:  # meta tensors (a skeleton) are allocated there too
            to_device += nbytes
    largest_unit = max((unit_bytes(u) for u in chosen), default=0)
    # On the CPU the resident weights live in host RAM too: one check covers both.
    resident_on_host = to_device if device.type == "cpu" else 0
    donor_bytes = sum(map(unit_bytes, on_donors))
    _check_host(plan, swapped_on_host, largest_unit, resident_on_host, donor_bytes)
    if device.type == "cuda" and check_vram:
        _check_vram(plan, to_device, device)


def unit_bytes(unit: SwapUnit) -> int:
    """The bytes of a swap unit's tensors as they are stored."""
    return sum(stored_nbytes(ref.get()) for ref in unit.tensors)


def _check_host(
    plan: SwapPlan,
    swapped_on_host: int,
    largest_unit: int,
    resident_on_host: int,
    donor_bytes: int = 0,
) -> None:
    """Everything the plan adds to host RAM: swapped weights that come from elsewhere (the
    GPU, a skeleton) plus one unit (packing one that sits in RAM allocates its buffer
    before the old tensor is freed), the packed copies of compressed transfers, and, when
    computing on the CPU, the resident weights that come from elsewhere. Units stored on a
    donor GPU (``donor_bytes``) take none."""
    available = available_host_bytes()
    if available is None:
        return
    host_swapped = plan.swapped_bytes - donor_bytes
    swapped = host_swapped - swapped_on_host + largest_unit if host_swapped > 0 else 0
    needed = swapped + resident_on_host
    if plan.compressed:
        # Compressed transfers keep the raw weights and add a pinned packed copy.
        needed += int(PACKED_SHARE * host_swapped)
    if needed <= available:
        return
    if resident_on_host:  # on the CPU swapping saves no RAM: every weight is in RAM anyway
        fix = (
            "On the CPU every weight lives in host RAM whatever is swapped: free RAM, use a "
            "smaller (fp8/GGUF) checkpoint, or run on a GPU."
        )
    else:
        compression = "turn transfer_compression off, " if plan.compressed else ""
        fix = (
            f"Swap fewer blocks (blocks_to_swap, vram_budget_gb), free RAM, {compression}"
            "or use a smaller (fp8/GGUF) checkpoint."
        )
    raise InsufficientHostMemoryError(
        f"the plan needs {needed / GIB:.2f} GiB more host RAM ({plan.swapped_bytes / GIB:.2f} "
        f"GiB of swapped weights, {resident_on_host / GIB:.2f} GiB of resident weights on "
        f"the CPU), but only {available / GIB:.2f} GiB is available. {fix}"
    )


def _check_vram(plan: SwapPlan, to_device: int, device: torch.device) -> None:
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    available = free + cached
    needed = to_device + plan.ring_bytes
    if needed + VRAM_MARGIN_BYTES <= available:
        return
    if plan.kind == "streamed":
        ring = f"up to {plan.ring_bytes / 2**20:.0f} MiB of layers streaming"
        fix = "Lower vram_budget_gb or free VRAM."
    else:
        ring = f"{plan.num_slots} swap slots of {plan.slot_bytes / 2**20:.0f} MiB"
        fix = (
            f"Swap more blocks (blocks_to_swap) or lower vram_budget_gb, or lower "
            f"prefetch_blocks (now {plan.num_slots - 1 if plan.num_slots else 0})."
        )
    raise InsufficientMemoryError(
        f"the swap plan needs {needed / GIB:.2f} GiB of VRAM ({to_device / GIB:.2f} GiB of "
        f"resident weights to move, {ring}) but {available / GIB:.2f} GiB is free on "
        f"{device}. {fix}"
    )


def _unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for owner in model.modules():
        for table in (owner._parameters, owner._buffers):
            for tensor in table.values():
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    out.append(tensor)
    return out
