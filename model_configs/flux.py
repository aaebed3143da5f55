"""Flux (12B): 19 double-stream then 38 single-stream blocks."""

from .base import ArchConfig, BlockListLayout, ModelLayout, Variant

VARIANTS = (
    Variant("flux-12b", "Flux 12B", num_blocks=19, hidden_size=3072, reserve_gb=3.0),
    # Core builds LongCat-Image with Flux's class: 10 double + 20 single blocks (inferred from
    # the published 6B size, not read from a released config)
    Variant(
        "longcat-image-6b", "LongCat-Image 6B", num_blocks=10, hidden_size=3072, reserve_gb=3.0
    ),
)

COMFYUI = ArchConfig(
    name="flux.comfyui",
    family="flux",
    layout_kind="comfyui",
    class_names=("Flux",),
    layout=ModelLayout(
        name="flux",
        block_lists=(
            BlockListLayout("double_blocks", key_prefix="double_blocks.{index}."),
            BlockListLayout("single_blocks", key_prefix="single_blocks.{index}."),
        ),
        txt_emb=("txt_in",),
        # not img_in: core reads its width between forwards (tests/comfyui/test_shapes_core_reads.py)
        stream_modules=("time_in", "vector_in", "guidance_in", "final_layer"),
    ),
    # (not the norm keys: current core names them .weight, older files and cores .scale)
    detect_keys=("double_blocks.0.img_attn.qkv.weight", "img_in.weight"),
    hidden_param="img_attn.qkv.weight",
    variants=VARIANTS,
)

DIFFUSERS = ArchConfig(
    name="flux.diffusers",
    family="flux",
    layout_kind="diffusers",
    class_names=("FluxTransformer2DModel",),
    layout=ModelLayout(
        name="flux",
        block_lists=(
            BlockListLayout("transformer_blocks", key_prefix="transformer_blocks.{index}."),
            BlockListLayout(
                "single_transformer_blocks", key_prefix="single_transformer_blocks.{index}."
            ),
        ),
        txt_emb=("context_embedder",),
        stream_modules=("x_embedder", "time_text_embed", "norm_out", "proj_out"),
    ),
    detect_keys=("single_transformer_blocks.0.proj_mlp.weight", "x_embedder.weight"),
    hidden_param="attn.to_q.weight",
    variants=VARIANTS,
)

CONFIGS = (COMFYUI, DIFFUSERS)
