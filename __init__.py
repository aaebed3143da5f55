"""wan_blockswap: stream a diffusion transformer's blocks from pinned host memory.

A ComfyUI node pack first: ComfyUI imports this folder as a package (a custom node). A
PyTorch library second: ``pip install`` puts the same folder in place as the package
``comfyui_wan_blockswap``, the project's one import root::

    from comfyui_wan_blockswap import SwapConfig, apply_block_swap

Everything inside imports relatively, so both work without touching ``sys.path``. Importing
it never imports ComfyUI (the nodes import core only when they run).
"""

from . import wan_blockswap as _engine
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .wan_blockswap import *  # noqa: F401,F403  (the library API)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", *_engine.__all__]
