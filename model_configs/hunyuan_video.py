"""HunyuanVideo (13B): double-stream then single-stream blocks, plus a text token refiner."""

from .base import ArchConfig, BlockListLayout, ModelLayout, Variant

VARIANTS = (
    Variant(
        "hunyuan-video-13b", "HunyuanVideo 13B", num_blocks=20, hidden_size=3072, reserve_gb=4.5
    ),
)

# The token refiner's blocks are real transformer blocks that only process text: they are
# swapped with the text embedding (offload_txt_emb), not counted by blocks_to_swap.
COMFYUI = ArchConfig(
    name="hunyuan_video.comfyui",
    family="hunyuan_video",
    layout_kind="comfyui",
    class_names=("HunyuanVideo",),
    layout=ModelLayout(
        name="hunyuan_video",
        block_lists=(
            BlockListLayout("double_blocks", key_prefix="double_blocks.{index}."),
            BlockListLayout("single_blocks", key_prefix="single_blocks.{index}."),
            BlockListLayout(
                "txt_in.individual_token_refiner.blocks",
                role="txt_emb",
                key_prefix="txt_in.individual_token_refiner.blocks.{index}.",
            ),
        ),
        stream_modules=("img_in", "time_in", "vector_in", "guidance_in", "txt_in", "final_layer"),
    ),
    detect_keys=("txt_in.individual_token_refiner.blocks.0.norm1.weight",),
    hidden_param="img_attn.qkv.weight",
    variants=VARIANTS,
)

DIFFUSERS = ArchConfig(
    name="hunyuan_video.diffusers",
    family="hunyuan_video",
    layout_kind="diffusers",
    class_names=("HunyuanVideoTransformer3DModel",),
    layout=ModelLayout(
        name="hunyuan_video",
        block_lists=(
            BlockListLayout("transformer_blocks", key_prefix="transformer_blocks.{index}."),
            BlockListLayout(
                "single_transformer_blocks", key_prefix="single_transformer_blocks.{index}."
            ),
            BlockListLayout(
                "context_embedder.token_refiner.refiner_blocks",
                role="txt_emb",
                key_prefix="context_embedder.token_refiner.refiner_blocks.{index}.",
            ),
        ),
        stream_modules=(
            "x_embedder",
            "context_embedder",
            "time_text_embed",
            "norm_out",
            "proj_out",
        ),
    ),
    detect_keys=("context_embedder.token_refiner.refiner_blocks.0.norm1.weight",),
    hidden_param="attn.to_q.weight",
    variants=VARIANTS,
)

CONFIGS = (COMFYUI, DIFFUSERS)
