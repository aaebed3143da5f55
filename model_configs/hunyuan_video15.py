"""HunyuanVideo 1.5 (8.3B) in ComfyUI's layout.

ComfyUI core builds it with HunyuanVideo's own class (``comfy.ldm.hunyuan_video.model
.HunyuanVideo``): 54 double-stream blocks, no single-stream ones, plus what 1.5 adds (a ByT5
glyph-text mapper, a SigLIP image projection, ``cond_type_embedding``). The module that only
1.5 has, ``cond_type_embedding``, tells it apart, so this record is tried before HunyuanVideo's
(records with required paths come first) and a 1.5 file's keys score higher too.

What core touches outside the forward: ``model_base.HunyuanVideo15.concat_cond`` reads
``img_in.proj.weight.shape``, so ``img_in`` (0.3 MB) never streams; ``cond_type_embedding``
(a plain ``nn.Embedding`` that the forward moves with ``.to()``) stays resident too.
"""

from .base import ArchConfig, BlockListLayout, ModelLayout, Variant

# bf16 bytes per double block, from the real config on the meta device: 0.302 GB x 54
# (16.7 GB in all). Reserve: activations at 480p x 121 frames (49,290 tokens x 2,048 x ~21
# bytes, as measured for Wan: 2.1 GB) with ~1,700 text, glyph and image tokens beside them,
# plus ~1 GB of CUDA context and ComfyUI headroom, rounded up.
VARIANTS = (
    Variant(
        "hunyuan-video-1.5", "HunyuanVideo 1.5", num_blocks=54, hidden_size=2048, reserve_gb=4.0
    ),
)

COMFYUI = ArchConfig(
    name="hunyuan_video15.comfyui",
    family="hunyuan_video15",
    layout_kind="comfyui",
    class_names=("HunyuanVideo",),
    layout=ModelLayout(
        name="hunyuan_video15",
        block_lists=(
            BlockListLayout("double_blocks", key_prefix="double_blocks.{index}."),
            # empty in the released models; kept so a file with single blocks swaps them too
            BlockListLayout("single_blocks", key_prefix="single_blocks.{index}."),
            # the token refiner's blocks only process text: swapped with offload_txt_emb
            BlockListLayout(
                "txt_in.individual_token_refiner.blocks",
                role="txt_emb",
                key_prefix="txt_in.individual_token_refiner.blocks.{index}.",
            ),
        ),
        txt_emb=("byt5_in",),
        img_emb=("vision_in",),
        stream_modules=(
            "time_in",
            "vector_in",
            "guidance_in",
            "time_r_in",
            "txt_in",
            "final_layer",
        ),
    ),
    required_paths=("cond_type_embedding",),
    detect_keys=(
        "txt_in.individual_token_refiner.blocks.0.norm1.weight",
        "cond_type_embedding.weight",
    ),
    hidden_param="img_attn.qkv.weight",
    variants=VARIANTS,
)

CONFIGS = (COMFYUI,)
