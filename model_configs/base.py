"""Declarative records that describe an architecture to the engine and the loaders.

A record is data. The layout types it holds are the engine's (``wan_blockswap.layout``):
data depends on the engine's types, not the engine on the data. ``model_configs.registry``
matches records against a module or a checkpoint's keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..wan_blockswap.layout import BlockListLayout, ModelLayout


@dataclass(frozen=True)
class Variant:
    """A named size of an architecture, told apart by its first main list's block count and
    hidden size (see ``ArchConfig.hidden_param``). ``reserve_gb``: what the rest of a
    generation needs on the card beside the weights (activations at typical resolutions,
    the CUDA context, ComfyUI's headroom); the variant gets one preset per GPU size
    (``presets.GPU_SIZES_GB``) when it is set."""

    name: str
    display_name: str
    num_blocks: int
    hidden_size: int
    reserve_gb: float | None = None


@dataclass(frozen=True)
class Preset:
    """A named override of :class:`wan_blockswap.SwapConfig` fields for one GPU size."""

    name: str
    variant: str
    vram_gb: int
    options: tuple[tuple[str, object], ...]

    def as_dict(self) -> dict[str, object]:
        return dict(self.options)


@dataclass(frozen=True)
class SkeletonRecipe:
    """How to build a model for a checkpoint of this layout without ComfyUI.

    Attributes:
        diffusers_class: the diffusers model class to instantiate.
        config_from_shapes: the class's constructor arguments, worked out from the file's
            tensor shapes (keys without any file prefix, in this record's naming).
        key_converter: dotted path of a function that renames a state dict of this layout to
            the class's names (diffusers' single-file converters); ``""`` if names match.
    """

    diffusers_class: str
    config_from_shapes: Callable[[Mapping[str, tuple[int, ...]]], dict]
    key_converter: str = ""


@dataclass(frozen=True)
class ArchConfig:
    """Everything the engine and loaders need to know about one architecture in one layout.

    Attributes:
        name: unique record name, e.g. ``"wan.comfyui"``.
        family: architecture family shared by both layouts, e.g. ``"wan"``.
        layout_kind: ``"comfyui"`` or ``"diffusers"``: whose class and key names these are.
        class_names: model class names this record matches.
        layout: block lists and offloadable embeddings.
        required_paths: module paths that must exist for a match (tells VACE from plain Wan).
        forbidden_paths: module paths that must not exist for a match.
        detect_keys: checkpoint keys (without any file prefix) that identify the architecture.
        hidden_param: parameter of a block whose last dimension is the hidden size.
        variants: known sizes, for presets and logs.
        skeleton: how the lazy loader builds this model outside ComfyUI, if it can.
        activation_bytes_per_token_channel: VRAM one forward needs beside the weights, per
            token of the latent and channel of the hidden size, at 16-bit compute (0: not
            measured); the performance script's advice for a file estimates from it.
    """

    name: str
    family: str
    layout_kind: str
    class_names: tuple[str, ...]
    layout: ModelLayout
    required_paths: tuple[str, ...] = ()
    forbidden_paths: tuple[str, ...] = ()
    detect_keys: tuple[str, ...] = ()
    hidden_param: str = ""
    variants: tuple[Variant, ...] = field(default_factory=tuple)
    skeleton: SkeletonRecipe | None = None
    activation_bytes_per_token_channel: float = 0.0
