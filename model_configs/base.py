"""Declarative records that describe an architecture to the engine and the loaders.

Nothing here imports torch: a record is data. ``model_configs.registry`` matches records
against a module or a checkpoint's keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping


@dataclass(frozen=True)
class BlockListLayout:
    """One list of transformer blocks inside a model.

    Attributes:
        path: dotted attribute path from the model root to a ``ModuleList``/``ModuleDict``.
        role: ``"main"`` lists are counted by ``blocks_to_swap`` (in the order given, e.g.
            double then single blocks); ``"vace"`` lists by ``vace_blocks_to_swap``;
            ``"txt_emb"`` lists (text token refiners) are swapped with ``offload_txt_emb``.
        key_prefix: checkpoint key prefix of one block, with ``{index}`` (position in the
            list) or ``{key}`` (name in a ``ModuleDict``); ``""`` means ``"{path}.{key}."``.
    """

    path: str
    role: str = "main"
    key_prefix: str = ""

    def block_key_prefix(self, key: str) -> str:
        """The checkpoint key prefix of the block stored under ``key`` in this list."""
        template = self.key_prefix or f"{self.path}.{{key}}."
        return template.format(key=key, index=key)


@dataclass(frozen=True)
class ModelLayout:
    """Where the swappable parts of a model are.

    Attributes:
        name: architecture name for logs (``"wan"``, ``"flux"``, ``"generic"`` ...).
        block_lists: the block lists, main lists in execution order.
        txt_emb: modules streamed when ``offload_txt_emb`` is set.
        img_emb: modules streamed when ``offload_img_emb`` is set.
        stream_modules: other modules outside the blocks whose large leaf layers stream one
            by one in a streamed plan (a budget below every slot plan); the ``txt_emb`` and
            ``img_emb`` modules always do. Only modules whose layers' weights are used
            through the layers' own forward belong here.
    """

    name: str
    block_lists: tuple[BlockListLayout, ...]
    txt_emb: tuple[str, ...] = ()
    img_emb: tuple[str, ...] = ()
    stream_modules: tuple[str, ...] = ()

    def lists_with_role(self, role: str) -> tuple[BlockListLayout, ...]:
        return tuple(bl for bl in self.block_lists if bl.role == role)


@dataclass(frozen=True)
class Variant:
    """A named size of an architecture, told apart by its first main list's block count and
    hidden size (see ``ArchConfig.hidden_param``)."""

    name: str
    display_name: str
    num_blocks: int
    hidden_size: int


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
