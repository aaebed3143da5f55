"""Wan 2.1 / 2.2 (1.3B, 5B, 14B, A14B) and Wan VACE, in ComfyUI's and diffusers' layouts."""

from .base import ArchConfig, BlockListLayout, ModelLayout, Variant

VARIANTS = (
    Variant("wan2.1-1.3b", "Wan 2.1 1.3B", num_blocks=30, hidden_size=1536),
    Variant("wan2.2-5b", "Wan 2.2 5B", num_blocks=30, hidden_size=3072),
    # Wan 2.1 14B and each of Wan 2.2 A14B's two experts share this shape.
    Variant("wan-14b", "Wan 2.1/2.2 14B", num_blocks=40, hidden_size=5120),
)

# ComfyUI: comfy.ldm.wan.model.WanModel and its subclasses (camera, S2V, HuMo, animate).
# text_embedding and img_emb run once at the start of each forward; img_emb exists for i2v.
COMFYUI = ArchConfig(
    name="wan.comfyui",
    family="wan",
    layout_kind="comfyui",
    class_names=("WanModel",),
    layout=ModelLayout(
        name="wan",
        block_lists=(BlockListLayout("blocks", key_prefix="blocks.{index}."),),
        txt_emb=("text_embedding",),
        img_emb=("img_emb",),
    ),
    forbidden_paths=("vace_blocks",),
    detect_keys=("head.modulation", "blocks.0.self_attn.q.weight"),
    hidden_param="self_attn.q.weight",
    variants=VARIANTS,
)

# ComfyUI VACE runs each vace block interleaved with the main blocks it feeds.
COMFYUI_VACE = ArchConfig(
    name="wan_vace.comfyui",
    family="wan_vace",
    layout_kind="comfyui",
    class_names=("VaceWanModel",),
    layout=ModelLayout(
        name="wan_vace",
        block_lists=(
            BlockListLayout("blocks", key_prefix="blocks.{index}."),
            BlockListLayout("vace_blocks", role="vace", key_prefix="vace_blocks.{index}."),
        ),
        txt_emb=("text_embedding",),
        img_emb=("img_emb",),
    ),
    required_paths=("vace_blocks",),
    detect_keys=("head.modulation", "vace_patch_embedding.weight"),
    hidden_param="self_attn.q.weight",
    variants=VARIANTS,
)

DIFFUSERS = ArchConfig(
    name="wan.diffusers",
    family="wan",
    layout_kind="diffusers",
    class_names=("WanTransformer3DModel",),
    layout=ModelLayout(
        name="wan",
        block_lists=(BlockListLayout("blocks", key_prefix="blocks.{index}."),),
        txt_emb=("condition_embedder.text_embedder",),
        img_emb=("condition_embedder.image_embedder",),
    ),
    forbidden_paths=("vace_blocks",),
    detect_keys=("condition_embedder.text_embedder.linear_1.weight", "blocks.0.attn1.to_q.weight"),
    hidden_param="attn1.to_q.weight",
    variants=VARIANTS,
)

# diffusers VACE runs all vace blocks first, then the main blocks.
DIFFUSERS_VACE = ArchConfig(
    name="wan_vace.diffusers",
    family="wan_vace",
    layout_kind="diffusers",
    class_names=("WanVACETransformer3DModel",),
    layout=ModelLayout(
        name="wan_vace",
        block_lists=(
            BlockListLayout("blocks", key_prefix="blocks.{index}."),
            BlockListLayout("vace_blocks", role="vace", key_prefix="vace_blocks.{index}."),
        ),
        txt_emb=("condition_embedder.text_embedder",),
        img_emb=("condition_embedder.image_embedder",),
    ),
    required_paths=("vace_blocks",),
    detect_keys=(
        "condition_embedder.text_embedder.linear_1.weight",
        "vace_blocks.0.proj_out.weight",
    ),
    hidden_param="attn1.to_q.weight",
    variants=VARIANTS,
)

CONFIGS = (COMFYUI_VACE, COMFYUI, DIFFUSERS_VACE, DIFFUSERS)
