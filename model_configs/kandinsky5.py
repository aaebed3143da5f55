"""Kandinsky 5 (Video Lite 2B, Video Pro 19B, Image Lite 6B) in ComfyUI's layout.

ComfyUI core: ``comfy.ldm.kandinsky5.model.Kandinsky5`` for both ``model_base.Kandinsky5``
(video) and ``model_base.Kandinsky5Image``. The text runs through its own transformer
(``text_transformer_blocks``) once per forward before the visual blocks: those blocks only
process text and swap with ``offload_txt_emb``, as HunyuanVideo's token refiner does.
"""

from .base import ArchConfig, BlockListLayout, ModelLayout, Variant

# bf16 bytes per visual block, from the real configs on the meta device: Video Lite 0.119 GB x
# 32, Video Pro 0.613 GB x 60 (plus 4 text blocks of 0.453 GB), Image Lite 0.233 GB x 50.
# Reserve: activations at the typical size (video: 5 s of 512x768 at 24 fps, 47,616 tokens;
# image: 1024x1024, 4,096 tokens) at ~21 bytes per token and hidden channel (as measured for
# Wan), plus ~1 GB of CUDA context and ComfyUI headroom, rounded; 3 GB at least, as for the
# other records.
VARIANTS = (
    Variant(
        "kandinsky5-video-lite",
        "Kandinsky 5 Video Lite",
        num_blocks=32,
        hidden_size=1792,
        reserve_gb=3.0,
    ),
    Variant(
        "kandinsky5-video-pro",
        "Kandinsky 5 Video Pro",
        num_blocks=60,
        hidden_size=4096,
        reserve_gb=5.0,
    ),
    Variant(
        "kandinsky5-image-lite",
        "Kandinsky 5 Image Lite",
        num_blocks=50,
        hidden_size=2560,
        reserve_gb=3.0,
    ),
)

COMFYUI = ArchConfig(
    name="kandinsky5.comfyui",
    family="kandinsky5",
    layout_kind="comfyui",
    class_names=("Kandinsky5",),
    layout=ModelLayout(
        name="kandinsky5",
        block_lists=(
            BlockListLayout(
                "visual_transformer_blocks", key_prefix="visual_transformer_blocks.{index}."
            ),
            BlockListLayout(
                "text_transformer_blocks",
                role="txt_emb",
                key_prefix="text_transformer_blocks.{index}.",
            ),
        ),
        txt_emb=("text_embeddings",),
        # TimeEmbeddings' ``freqs`` buffer is read directly; it is no leaf's, so it stays
        stream_modules=(
            "time_embeddings",
            "pooled_text_embeddings",
            "visual_embeddings",
            "out_layer",
        ),
    ),
    detect_keys=(
        "visual_transformer_blocks.0.cross_attention.key_norm.weight",
        "visual_embeddings.in_layer.weight",
    ),
    hidden_param="self_attention.to_query.weight",
    variants=VARIANTS,
)

CONFIGS = (COMFYUI,)
