"""LTX-Video (0.9.x, video only) and LTX-2 / LTX-2.3 (audio + video), in ComfyUI's layout.

ComfyUI core: ``comfy.ldm.lightricks.model.LTXVModel`` and its subclass
``comfy.ldm.lightricks.av_model.LTXAVModel``. Both run one list, ``transformer_blocks``; an
LTX-2 block carries the video and the audio stream and the cross-attention between them, so
swapping a block moves both streams' weights together.

[Note: LTX-2 text connectors]
LTX-2's two text connectors (``video_embeddings_connector``, ``audio_embeddings_connector``)
are transformers of their own: 2 blocks of 3840 wide in LTX-2 (1.4 GB in bf16), 8 blocks of
4096 and 8 of 2048 in LTX-2.3 (4.0 GB). Core runs them when it encodes the conditioning
(``model_base.LTXAV.extra_conds`` -> ``preprocess_text_embeds``, and the duration-head node),
outside the diffusion model's forward, once per prompt. Their blocks are ``txt_emb`` lists,
swapped one block at a time with ``offload_txt_emb`` and streamed in streamed plans; a whole
connector as one unit would make every slot 3.2 GB at LTX-2.3. The units' own hooks fetch
them wherever core calls them.
"""

import dataclasses

from .base import ArchConfig, BlockListLayout, ModelLayout, Variant

# bf16 bytes per block, from the real configs built on the meta device: LTX-Video 2B 0.134 GB
# x 28, 13B 0.537 GB x 48; LTX-2 0.772 GB x 48 (39.2 GB in all), LTX-2.3 0.773 GB x 48
# (42.0 GB: larger connectors). Reserve: activations at 1280x720 x 121 frames (14,720 video
# tokens; ~21 bytes per token and hidden channel as measured for Wan) plus the rope tables,
# the 1,024-token text context and ~1 GB of CUDA context and ComfyUI headroom, rounded up; the
# video-only models' floor is 3 GB as for the other records.
VARIANTS_LTXV = (
    Variant("ltxv-2b", "LTX-Video 2B", num_blocks=28, hidden_size=2048, reserve_gb=3.0),
    Variant("ltxv-13b", "LTX-Video 13B", num_blocks=48, hidden_size=4096, reserve_gb=3.5),
)
# LTX-2 and LTX-2.3 share their block count and width: one variant, told apart in the log
# only by their connectors.
VARIANTS_LTXAV = (
    Variant("ltx-2", "LTX-2 / LTX-2.3", num_blocks=48, hidden_size=4096, reserve_gb=4.0),
)

# ComfyUI's FeedForward folds its GELU into an INT8 down-projection ([Note: fused parts]);
# LTX-2's blocks have an audio one beside it, and its text connectors' blocks one too
_BLOCKS = BlockListLayout(
    "transformer_blocks", key_prefix="transformer_blocks.{index}.", fused=("ff",)
)
_AV_BLOCKS = dataclasses.replace(_BLOCKS, fused=("ff", "audio_ff"))

# Only modules whose large layers run through their own forward stream: the root's
# ``scale_shift_table`` is read directly and stays resident. The timestep modules
# (adaln_single: 0.24 GB at 4096 wide) are worth streaming in a streamed plan.
COMFYUI_LTXV = ArchConfig(
    name="ltxv.comfyui",
    family="ltxv",
    layout_kind="comfyui",
    class_names=("LTXVModel",),
    layout=ModelLayout(
        name="ltxv",
        block_lists=(_BLOCKS,),
        txt_emb=("caption_projection",),
        stream_modules=("patchify_proj", "adaln_single", "prompt_adaln_single", "proj_out"),
    ),
    # LTXAVModel subclasses LTXVModel: its record below must win
    forbidden_paths=("audio_patchify_proj",),
    detect_keys=(
        "adaln_single.emb.timestep_embedder.linear_1.bias",
        "transformer_blocks.0.attn2.to_k.weight",
    ),
    hidden_param="attn1.to_q.weight",
    variants=VARIANTS_LTXV,
)

COMFYUI_LTXAV = ArchConfig(
    name="ltxav.comfyui",
    family="ltxav",
    layout_kind="comfyui",
    class_names=("LTXAVModel",),
    layout=ModelLayout(
        name="ltxav",
        block_lists=(
            _AV_BLOCKS,
            # [Note: LTX-2 text connectors]
            BlockListLayout(
                "video_embeddings_connector.transformer_1d_blocks",
                role="txt_emb",
                key_prefix="video_embeddings_connector.transformer_1d_blocks.{index}.",
                fused=("ff",),
            ),
            BlockListLayout(
                "audio_embeddings_connector.transformer_1d_blocks",
                role="txt_emb",
                key_prefix="audio_embeddings_connector.transformer_1d_blocks.{index}.",
                fused=("ff",),
            ),
        ),
        # LTX-2.3 has no projection modules here (plain functions): they are skipped
        txt_emb=("caption_projection", "audio_caption_projection"),
        stream_modules=(
            "patchify_proj",
            "audio_patchify_proj",
            "adaln_single",
            "audio_adaln_single",
            "prompt_adaln_single",
            "audio_prompt_adaln_single",
            "av_ca_video_scale_shift_adaln_single",
            "av_ca_a2v_gate_adaln_single",
            "av_ca_audio_scale_shift_adaln_single",
            "av_ca_v2a_gate_adaln_single",
            "proj_out",
            "audio_proj_out",
        ),
    ),
    required_paths=("audio_patchify_proj",),
    detect_keys=(
        "adaln_single.emb.timestep_embedder.linear_1.bias",
        "transformer_blocks.0.attn2.to_k.weight",
        "audio_adaln_single.linear.weight",
    ),
    hidden_param="attn1.to_q.weight",
    variants=VARIANTS_LTXAV,
)

CONFIGS = (COMFYUI_LTXAV, COMFYUI_LTXV)
