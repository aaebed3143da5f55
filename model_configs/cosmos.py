"""Cosmos predict1 (GeneralDIT, blocks in a ModuleDict) and predict2 (MiniTrainDIT)."""

from .base import ArchConfig, BlockListLayout, ModelLayout, Variant

VARIANTS = (
    Variant("cosmos-2b", "Cosmos 2B", num_blocks=28, hidden_size=2048, reserve_gb=3.0),
    Variant("cosmos-7b", "Cosmos 7B", num_blocks=28, hidden_size=4096, reserve_gb=4.0),
    Variant("cosmos-14b", "Cosmos 14B", num_blocks=36, hidden_size=5120, reserve_gb=4.5),
)

# Layers outside the blocks that a streamed plan streams (the positional embedders are left
# resident: small, and their tables are read by their own helpers)
STREAM_MODULES_COMFYUI = ("x_embedder", "t_embedder", "final_layer")

# predict1 keeps its blocks in a ModuleDict keyed "block0", "block1", ...
COMFYUI_PREDICT1 = ArchConfig(
    name="cosmos_predict1.comfyui",
    family="cosmos_predict1",
    layout_kind="comfyui",
    class_names=("GeneralDIT",),
    layout=ModelLayout(
        name="cosmos_predict1",
        block_lists=(BlockListLayout("blocks", key_prefix="blocks.{key}."),),
        stream_modules=STREAM_MODULES_COMFYUI,
    ),
    detect_keys=("blocks.block0.blocks.0.block.attn.to_q.0.weight",),
    hidden_param="blocks.0.block.attn.to_q.0.weight",
    variants=VARIANTS,
)

COMFYUI_PREDICT2 = ArchConfig(
    name="cosmos_predict2.comfyui",
    family="cosmos_predict2",
    layout_kind="comfyui",
    class_names=("MiniTrainDIT",),
    layout=ModelLayout(
        name="cosmos_predict2",
        block_lists=(BlockListLayout("blocks", key_prefix="blocks.{index}."),),
        stream_modules=STREAM_MODULES_COMFYUI,
    ),
    detect_keys=("blocks.0.mlp.layer1.weight",),
    hidden_param="mlp.layer1.weight",
    variants=VARIANTS,
)

# diffusers uses one class for both generations.
DIFFUSERS = ArchConfig(
    name="cosmos.diffusers",
    family="cosmos",
    layout_kind="diffusers",
    class_names=("CosmosTransformer3DModel",),
    layout=ModelLayout(
        name="cosmos",
        block_lists=(
            BlockListLayout("transformer_blocks", key_prefix="transformer_blocks.{index}."),
        ),
        stream_modules=("patch_embed", "time_embed", "norm_out", "proj_out"),
    ),
    detect_keys=("transformer_blocks.0.attn1.to_q.weight", "patch_embed.proj.weight"),
    hidden_param="attn1.to_q.weight",
    variants=VARIANTS,
)

CONFIGS = (COMFYUI_PREDICT1, COMFYUI_PREDICT2, DIFFUSERS)
