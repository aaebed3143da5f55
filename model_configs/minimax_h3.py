"""MiniMax H3 (audio + video, 50 blocks of 5,376) in ComfyUI's layout.

ComfyUI core: ``comfy.ldm.minimax.model.MiniMaxH3Model``. One list, ``blocks``: each block
runs the whole packed sequence (text, reference rows, audio, video), so a swapped block moves
both streams' weights together. Two checkpoint forms share the class: the plain one (a time
embedder and full-width adaLN projections, 40% of each block) and the curve form (a small
fp32 adaLN basis over ``adaln_t_table``, no time embedder).

[Note: MiniMax H3 direct reads]
Core reads some weights without running their module's forward: ``Attention`` casts
``q_norm.weight`` / ``k_norm.weight`` into its fused RMSNorm + rope kernel, and the root
casts ``rope.inv_freq`` and ``adaln_t_table``. The norms are far below a layer unit's share
of a block (128 of 1.3 GB), so they travel with their block in block plans and stay resident
with its small tensors in layer and streamed plans; the root's buffers are in no list and stay
resident. No module listed below is read that way.

[Note: MiniMax H3 token refiner]
``model_base.MiniMaxH3.extra_conds`` runs ``condition_proj`` and the token refiner (2 blocks,
1.5 GB) once per sampling, outside the diffusion model's forward; its blocks are a
``txt_emb`` list, swapped with ``offload_txt_emb``; their own hooks fetch them wherever core
calls them.

[Note: MiniMax H3 prefetch queue]
The forward asks ``comfy.model_prefetch.make_prefetch_queue`` for a queue over ``blocks``;
core makes one only when ``transformer_options["prefetch_dynamic_vbars"]`` is set, which
``model_base`` sets from ``ModelPatcher.is_dynamic()``: only dynamic VRAM's patcher. The
node's patcher is a static one (``callbacks.comfy_private.clone_onto`` clones a dynamic one
with ``disable_dynamic=True``, and the private model starts without dynamic VRAM's module
state), so the queue is ``None`` and ``prefetch_queue_pop`` returns at once; were one made,
core only casts modules carrying dynamic VRAM's ``_v`` handles, which our blocks lack
(tests/comfyui/test_arch_minimax_wan22.py forces one).
"""

from .base import ArchConfig, BlockListLayout, ModelLayout, Variant

# bf16 bytes per block, from the real config on the meta device: 1.291 GB x 50 (66.3 GB in
# all; the curve form 0.796 GB x 50, 41.4 GB). Reserve: one packed sequence of ~20,000
# tokens (a 720p clip's video and audio rows, the text and the references) x 5,376 x ~26
# bytes (Wan's measured 21, plus H3's twice-as-wide SwiGLU input: 2.8 GB), the rope table and
# the fp32 output heads, plus ~1 GB of CUDA context and ComfyUI headroom, rounded up.
VARIANTS = (Variant("minimax-h3", "MiniMax H3", num_blocks=50, hidden_size=5376, reserve_gb=5.0),)

COMFYUI = ArchConfig(
    name="minimax_h3.comfyui",
    family="minimax_h3",
    layout_kind="comfyui",
    class_names=("MiniMaxH3Model",),
    layout=ModelLayout(
        name="minimax_h3",
        block_lists=(
            # their MLPs fold SwiGLU into an INT8 down-projection ([Note: fused parts])
            BlockListLayout("blocks", key_prefix="blocks.{index}.", fused=("mlp",)),
            # [Note: MiniMax H3 token refiner]
            BlockListLayout(
                "token_refiner.blocks",
                role="txt_emb",
                key_prefix="token_refiner.blocks.{index}.",
                fused=("mlp",),
            ),
        ),
        txt_emb=("condition_proj", "token_refiner.final_norm"),
        # Their layers run through their own forward; the curve form has no time_embedder
        # (skipped). Not rope / adaln_t_table: [Note: MiniMax H3 direct reads]
        stream_modules=("video_patch_proj", "audio_patch_proj", "time_embedder", "final_layer"),
    ),
    detect_keys=(
        "video_patch_proj.weight",
        "audio_patch_proj.weight",
        "blocks.0.attn.qkv_proj.weight",
    ),
    hidden_param="attn.qkv_proj.weight",
    variants=VARIANTS,
)

CONFIGS = (COMFYUI,)
