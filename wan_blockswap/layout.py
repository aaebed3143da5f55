"""Where the swappable parts of a model are: the engine's own description of a model.

The architecture records in ``model_configs`` build values of these types; the engine never
imports them. ``apply_block_swap`` without a layout asks the detector that the data layer
registered (:func:`register_layout_detector`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from torch import nn

from .errors import BlockSwapConfigError

# Roles of block lists the options name: ``blocks_to_swap`` counts the main lists, and
# ``offload_txt_emb`` swaps the text-embedding lists. Any other role (``"vace"``, or a new
# architecture's third list) is counted by ``SwapConfig.role_blocks_to_swap``.
MAIN_ROLE = "main"
TXT_EMB_ROLE = "txt_emb"


@dataclass(frozen=True)
class BlockListLayout:
    """One list of transformer blocks inside a model.

    Attributes:
        path: dotted attribute path from the model root to a ``ModuleList``/``ModuleDict``.
        role: ``"main"`` lists are counted by ``blocks_to_swap`` (in the order given, e.g.
            double then single blocks); ``"txt_emb"`` lists (text token refiners) are swapped
            with ``offload_txt_emb``; lists of any other role (``"vace"``) by
            ``SwapConfig.role_blocks_to_swap`` (``vace_blocks_to_swap`` for ``"vace"``).
        key_prefix: checkpoint key prefix of one block, with ``{index}`` (position in the
            list) or ``{key}`` (name in a ``ModuleDict``); ``""`` means ``"{path}.{key}."``.
        token_wise: paths, inside one block, of submodules that work on each token on its
            own (a feed-forward network): called with ``(batch, tokens, channels)`` alone,
            they give for any slice of the tokens that slice of their output. The engine may
            run them over a few tokens at a time (``SwapConfig.chunk_tokens``); a path a
            block lacks is passed over.
        fused: paths, inside one block, of submodules whose forward may use a child layer's
            weights without calling that layer (ComfyUI folds an FFN's activation into an
            INT8 down-projection and reads its weight directly). Where such a part holds
            weights read so (the host says which: ``units.register_fused_weights``) it swaps
            as one unit; see [Note: fused parts] in ``units``. A path a block lacks is passed
            over.
        grouped: paths, inside one block, of submodules whose large layers travel as one
            unit: parts where some layers compute too little to hide the next layer's copy
            (Wan's cross-attention: its k and v see only the text tokens). See [Note:
            grouped parts] in ``units``. A path a block lacks is passed over.
    """

    path: str
    role: str = MAIN_ROLE
    key_prefix: str = ""
    token_wise: tuple[str, ...] = ()
    fused: tuple[str, ...] = ()
    grouped: tuple[str, ...] = ()

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

    def without_token_wise(self) -> "ModelLayout":
        """This layout with no token-wise parts: nothing runs in chunks, and every large
        layer is a swap unit of its own (smaller units: see [Note: token chunks])."""
        lists = tuple(replace(bl, token_wise=()) for bl in self.block_lists)
        return replace(self, block_lists=lists)


LayoutDetector = Callable[[nn.Module], ModelLayout]
_detector: LayoutDetector | None = None


def register_layout_detector(detector: LayoutDetector) -> None:
    """Set the function that finds the layout of a model passed without one (the package's
    architecture records register theirs when imported)."""
    global _detector
    _detector = detector


def detect_layout(model: nn.Module) -> ModelLayout:
    """``model``'s layout, through the registered detector."""
    if _detector is None:
        raise BlockSwapConfigError(
            f"no architecture records are loaded to find the blocks of {type(model).__name__}: "
            f"import comfyui_wan_blockswap (which loads them) or pass layout=ModelLayout(...)"
        )
    return _detector(model)
