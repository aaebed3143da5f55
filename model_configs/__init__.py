"""Per-architecture data: block lists, offloadable embeddings, checkpoint keys, presets.

Adding an architecture means adding a record here, not code in the engine.
"""

from .base import ArchConfig, BlockListLayout, ModelLayout, Preset, Variant
from .presets import PRESETS, get_preset, preset_names
from .registry import all_configs, detect, detect_from_keys, get_config, match, variant_of
from ..wan_blockswap.layout import register_layout_detector

# apply_block_swap without a layout finds the blocks through these records
register_layout_detector(lambda model: detect(model).layout)

__all__ = [
    "ArchConfig",
    "BlockListLayout",
    "ModelLayout",
    "PRESETS",
    "Preset",
    "Variant",
    "all_configs",
    "detect",
    "detect_from_keys",
    "get_config",
    "get_preset",
    "match",
    "preset_names",
    "variant_of",
]
