"""ComfyUI entry point of the wan_blockswap node pack.

ComfyUI imports this folder as a package; the engine packages (``wan_blockswap``,
``model_configs``, ``callbacks``) are imported by their own names, so this folder goes on
``sys.path`` first. Importing works without ComfyUI (nothing here imports ``comfy``).
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
