"""Which device stores each swapped unit: the allocation string checked against this machine.

``donor_allocation`` only plans (pure); here the plan meets the hardware: every donor GPU it
names must exist and be another GPU than the one computing, and its free memory bounds what
the string may put there. Units stored on a donor GPU are held raw in memory of their own
there (:class:`~wan_blockswap.storage.DeviceBuffer`) and copied peer to peer into the
compute GPU's slots; the rest stay in pinned host memory as before.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from .config import SwapConfig
from .donor_allocation import DEFAULT_DONOR, StoragePlan, plan_storage
from .errors import BlockSwapConfigError

logger = logging.getLogger("wan_blockswap")


def compute_device_name(device: torch.device) -> str:
    """``device`` as the allocation string names it (``cuda`` alone is the current GPU)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}"
    return device.type


def donor_free_memory(config: SwapConfig, device: torch.device) -> dict[str, int]:
    """The free memory of each donor GPU ``config`` names, by name (none for the default
    host memory), so callers can check a swap's donors before any work with it. Raises
    :class:`BlockSwapConfigError` for a donor this machine lacks or that cannot serve
    ``device``."""
    if not config.stores_on_donor_gpus:
        return {}
    compute = compute_device_name(device)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    available: dict[str, int] = {}
    for entry in config.storage_entries:
        if entry.device == DEFAULT_DONOR or entry.device == compute:
            continue  # the compute device: plan_storage explains why that is not a donor
        index = int(entry.device.split(":")[1])
        if index >= count:
            raise BlockSwapConfigError(
                f"donor {entry.device} does not exist: this machine has {count} CUDA "
                f"device(s); name another GPU or use donor_device='cpu'"
            )
        if device.type != "cuda":
            raise BlockSwapConfigError(
                f"donor {entry.device} holds blocks for a GPU, but this swap computes on "
                f"{compute}; use donor_device='cpu'"
            )
        available[entry.device] = torch.cuda.mem_get_info(index)[0]
    return available


def plan_donor_storage(
    config: SwapConfig, unit_bytes: Sequence[int], device: torch.device
) -> StoragePlan | None:
    """The storage plan of ``config`` for units of ``unit_bytes`` (in order of use), or None
    when every unit stays in host memory (the default). Raises
    :class:`BlockSwapConfigError` for a donor this machine lacks or cannot hold."""
    if not config.stores_on_donor_gpus:
        return None
    available = donor_free_memory(config, device)
    plan = plan_storage(config.storage_entries, unit_bytes, compute_device_name(device), available)
    logger.info("swapped blocks stored as %s", plan.describe())
    return plan


def storage_devices(plan: StoragePlan | None, units: int) -> list[torch.device | None]:
    """One entry per unit: the donor GPU storing it, or None for host memory."""
    if plan is None:
        return [None] * units
    return [None if d == DEFAULT_DONOR else torch.device(d) for d in plan.devices]
