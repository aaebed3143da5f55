"""wan_blockswap: stream a diffusion transformer's blocks from pinned host memory.

Pure PyTorch; importing it never imports ComfyUI.
"""

from .api import (
    apply_block_swap,
    get_block_swap,
    min_vram_budget_gb,
    plan_for,
    remove_block_swap,
)
from .config import SwapConfig
from .engine import BlockSwap
from .errors import (
    BlockSwapConfigError,
    BlockSwapError,
    BlockSwapStateError,
    InsufficientHostMemoryError,
    InsufficientMemoryError,
)
from .layout import BlockListLayout, ModelLayout
from .plan import BlockSizes, ModelSizes, SwapPlan, plan_swap
from .storage import HostBuffer, registered_host_bytes

__all__ = [
    "BlockListLayout",
    "BlockSizes",
    "BlockSwap",
    "BlockSwapConfigError",
    "BlockSwapError",
    "BlockSwapStateError",
    "HostBuffer",
    "InsufficientHostMemoryError",
    "InsufficientMemoryError",
    "ModelLayout",
    "ModelSizes",
    "SwapConfig",
    "SwapPlan",
    "apply_block_swap",
    "get_block_swap",
    "min_vram_budget_gb",
    "plan_for",
    "plan_swap",
    "registered_host_bytes",
    "remove_block_swap",
]
