"""Qwen-Image (20B) and its edit models (Edit, Edit 2509, Edit 2511, Layered).

ComfyUI core: ``comfy.ldm.qwen_image.model.QwenImageTransformer2DModel``, one list of 60
dual-stream blocks (image and text in each). Core's port keeps diffusers' module and key
names, so diffusers' class of the same name has this layout too.

Reference latents (the edit models' input images) are patchified and concatenated to the
image tokens before ``img_in``; with Edit 2511's ``index_timestep_zero`` the timestep batch
doubles and each block modulates the reference tokens with its second half. Both happen in
the blocks' inputs, never in their weights, so swapping a block changes neither.
"""

from .base import ArchConfig, BlockListLayout, ModelLayout, Variant

# bf16 bytes per block, from the real config on the meta device: 0.680 GB x 60 (40.8 GB in
# all; 0.08 GB outside the blocks). Reserve: activations at 1328x1328 (6,889 image tokens)
# with up to two 1024x1024 reference images (4,096 tokens each) and ~1,000 text tokens, a
# cfg batch of 2, at ~21 bytes per token and hidden channel (as measured for Wan): 2.1 GB,
# plus ~1 GB of CUDA context and ComfyUI headroom, rounded up.
VARIANTS = (
    Variant("qwen-image-20b", "Qwen-Image 20B", num_blocks=60, hidden_size=3072, reserve_gb=3.5),
)

COMFYUI = ArchConfig(
    name="qwen_image.comfyui",
    family="qwen_image",
    layout_kind="comfyui",
    class_names=("QwenImageTransformer2DModel",),
    layout=ModelLayout(
        name="qwen_image",
        block_lists=(
            BlockListLayout("transformer_blocks", key_prefix="transformer_blocks.{index}."),
        ),
        txt_emb=("txt_norm", "txt_in"),
        # pe_embedder holds no weights; the Layered model's addition_t_embedding sits inside
        # time_text_embed and runs through its own forward
        stream_modules=("img_in", "time_text_embed", "norm_out", "proj_out"),
    ),
    detect_keys=(
        "txt_norm.weight",
        "img_in.weight",
        "transformer_blocks.0.attn.add_q_proj.weight",
    ),
    hidden_param="attn.to_q.weight",
    variants=VARIANTS,
)

CONFIGS = (COMFYUI,)
