"""Exception types: every user-facing failure names the problem and the fix."""


class BlockSwapError(RuntimeError):
    """Base class for block-swap failures that are not bad arguments."""


class BlockSwapConfigError(ValueError):
    """An option is out of range or contradicts another; nothing was applied."""


class InsufficientMemoryError(BlockSwapError, MemoryError):
    """The plan does not fit in host RAM or VRAM; raised before anything is allocated."""


class InsufficientHostMemoryError(InsufficientMemoryError):
    """The plan does not fit in host RAM (what transfer compression "auto" gives way to)."""


class BlockSwapStateError(BlockSwapError):
    """The module is in the wrong state for the call (already swapped, not swapped, ...)."""
