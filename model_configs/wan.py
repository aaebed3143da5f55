"""Wan 2.1 / 2.2 (1.3B, 5B, 14B, A14B) and Wan VACE, in ComfyUI's and diffusers' layouts."""

from typing import Mapping

from .base import ArchConfig, BlockListLayout, ModelLayout, SkeletonRecipe, Variant

# A forward of ComfyUI's Wan code peaked 20.3 (32,760 tokens) and 20.8 (1,560 tokens) bytes
# per token and hidden channel beside the weights, at fp16 on an H200, batch 1; self-attention
# sets the peak (benchmarks/results/activation_peaks_h200.json).
ACTIVATION_BYTES_PER_TOKEN_CHANNEL = 21.0

VARIANTS = (
    Variant("wan2.1-1.3b", "Wan 2.1 1.3B", num_blocks=30, hidden_size=1536, reserve_gb=3.0),
    Variant("wan2.2-5b", "Wan 2.2 5B", num_blocks=30, hidden_size=3072, reserve_gb=4.0),
    # Wan 2.1 14B and each of Wan 2.2 A14B's two experts share this shape.
    Variant("wan-14b", "Wan 2.1/2.2 14B", num_blocks=40, hidden_size=5120, reserve_gb=4.5),
)

HEAD_DIM = 128  # every Wan size uses 128-wide attention heads
# A block's parts that work on each token alone, in both layouts (ComfyUI's Sequential and
# diffusers' FeedForward): streamed plans run them a few tokens at a time ([Note: token chunks])
TOKEN_WISE = ("ffn",)
# ComfyUI's WanFeedForward folds its GELU into an INT8 down-projection ([Note: fused parts])
FUSED = ("ffn",)
# [Note: grouped parts] in wan_blockswap/units.py
GROUPED = ("cross_attn",)
GROUPED_DIFFUSERS = ("attn2",)


def _count(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    """How many blocks ``prefix`` holds: its indices must be exactly 0..n-1. Counting the
    distinct indices, not the largest, keeps a stray ``blocks.100000000.x`` from asking for
    10**8 blocks; keys whose index is no plain number are left for the key check to name."""
    indices = set()
    for key in shapes:
        if key.startswith(prefix):
            index = key[len(prefix) :].split(".")[0]
            if index.isascii() and index.isdigit() and str(int(index)) == index:
                indices.add(int(index))
    count = len(indices)
    if indices and max(indices) != count - 1:  # then one of 0..count-1 is missing
        gap = [i for i in range(count) if i not in indices][:5]
        missing = ", ".join(f"{prefix}{i}" for i in gap)
        raise ValueError(
            f"{count} {prefix}N blocks are numbered up to {max(indices)}: no {missing}"
        )
    return count


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int) -> tuple[int, ...]:
    shape = tuple(shapes[key])
    if len(shape) != ndim:
        raise ValueError(f"tensor {key!r} has shape {list(shape)[:8]}, not {ndim} dimensions")
    return shape


def diffusers_config_from_comfy_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """``WanTransformer3DModel`` / ``WanVACETransformer3DModel`` arguments for a checkpoint in
    the original (ComfyUI) key layout, the way ComfyUI's model detection reads them.

    Raises:
        ValueError: the shapes describe no Wan model (a missing key raises ``KeyError``).
    """
    dim = _shape(shapes, "head.modulation", 3)[-1]
    if dim % HEAD_DIM:
        raise ValueError(f"hidden size {dim} (head.modulation) is no multiple of {HEAD_DIM}")
    patch = _shape(shapes, "patch_embedding.weight", 5)
    config = dict(
        patch_size=tuple(patch[2:]),
        num_attention_heads=dim // HEAD_DIM,
        attention_head_dim=HEAD_DIM,
        in_channels=patch[1],
        out_channels=_shape(shapes, "head.head.weight", 2)[0] // (patch[2] * patch[3] * patch[4]),
        text_dim=_shape(shapes, "text_embedding.0.weight", 2)[1],
        freq_dim=_shape(shapes, "time_embedding.0.weight", 2)[1],
        ffn_dim=_shape(shapes, "blocks.0.ffn.0.weight", 2)[0],
        num_layers=_count(shapes, "blocks."),
        cross_attn_norm="blocks.0.norm3.weight" in shapes,
        qk_norm="rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in shapes else None,
        eps=1e-6,
    )
    if "img_emb.proj.0.weight" in shapes:  # i2v / FLF: CLIP image projection
        config["image_dim"] = _shape(shapes, "img_emb.proj.0.weight", 1)[0]
        config["added_kv_proj_dim"] = dim
        if "img_emb.emb_pos" in shapes:
            config["pos_embed_seq_len"] = _shape(shapes, "img_emb.emb_pos", 3)[1]
    vace = _count(shapes, "vace_blocks.")
    if vace:  # vace block n feeds main block n * stride, as ComfyUI maps them
        if vace > config["num_layers"]:
            raise ValueError(f"{vace} vace blocks for {config['num_layers']} main blocks")
        stride = config["num_layers"] // vace
        config["vace_layers"] = list(range(0, config["num_layers"], stride))[:vace]
        config["vace_in_channels"] = _shape(shapes, "vace_patch_embedding.weight", 5)[1]
    return config


_CONVERTER = "diffusers.loaders.single_file_utils.convert_wan_transformer_to_diffusers"

# ComfyUI: comfy.ldm.wan.model.WanModel and its subclasses (camera, S2V, HuMo, animate).
# text_embedding and img_emb run once at the start of each forward; img_emb exists for i2v.
COMFYUI = ArchConfig(
    name="wan.comfyui",
    family="wan",
    layout_kind="comfyui",
    class_names=("WanModel",),
    layout=ModelLayout(
        name="wan",
        block_lists=(
            BlockListLayout(
                "blocks",
                key_prefix="blocks.{index}.",
                token_wise=TOKEN_WISE,
                fused=FUSED,
                grouped=GROUPED,
            ),
        ),
        txt_emb=("text_embedding",),
        img_emb=("img_emb",),
        # time_projection alone is 315 MB at 14B: a streamed plan must not keep it resident
        stream_modules=("time_embedding", "time_projection"),
    ),
    forbidden_paths=("vace_blocks",),
    detect_keys=("head.modulation", "blocks.0.self_attn.q.weight"),
    hidden_param="self_attn.q.weight",
    variants=VARIANTS,
    activation_bytes_per_token_channel=ACTIVATION_BYTES_PER_TOKEN_CHANNEL,
    skeleton=SkeletonRecipe(
        "WanTransformer3DModel", diffusers_config_from_comfy_shapes, _CONVERTER
    ),
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
            BlockListLayout(
                "blocks",
                key_prefix="blocks.{index}.",
                token_wise=TOKEN_WISE,
                fused=FUSED,
                grouped=GROUPED,
            ),
            BlockListLayout(
                "vace_blocks",
                role="vace",
                key_prefix="vace_blocks.{index}.",
                token_wise=TOKEN_WISE,
                fused=FUSED,
                grouped=GROUPED,
            ),
        ),
        txt_emb=("text_embedding",),
        img_emb=("img_emb",),
        # time_projection alone is 315 MB at 14B: a streamed plan must not keep it resident
        stream_modules=("time_embedding", "time_projection"),
    ),
    required_paths=("vace_blocks",),
    detect_keys=("head.modulation", "vace_patch_embedding.weight"),
    hidden_param="self_attn.q.weight",
    variants=VARIANTS,
    activation_bytes_per_token_channel=ACTIVATION_BYTES_PER_TOKEN_CHANNEL,
    skeleton=SkeletonRecipe(
        "WanVACETransformer3DModel", diffusers_config_from_comfy_shapes, _CONVERTER
    ),
)

DIFFUSERS = ArchConfig(
    name="wan.diffusers",
    family="wan",
    layout_kind="diffusers",
    class_names=("WanTransformer3DModel",),
    layout=ModelLayout(
        name="wan",
        block_lists=(
            BlockListLayout(
                "blocks",
                key_prefix="blocks.{index}.",
                token_wise=TOKEN_WISE,
                grouped=GROUPED_DIFFUSERS,
            ),
        ),
        txt_emb=("condition_embedder.text_embedder",),
        img_emb=("condition_embedder.image_embedder",),
        stream_modules=("condition_embedder",),
    ),
    forbidden_paths=("vace_blocks",),
    detect_keys=("condition_embedder.text_embedder.linear_1.weight", "blocks.0.attn1.to_q.weight"),
    hidden_param="attn1.to_q.weight",
    variants=VARIANTS,
    activation_bytes_per_token_channel=ACTIVATION_BYTES_PER_TOKEN_CHANNEL,
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
            BlockListLayout(
                "blocks",
                key_prefix="blocks.{index}.",
                token_wise=TOKEN_WISE,
                grouped=GROUPED_DIFFUSERS,
            ),
            BlockListLayout(
                "vace_blocks",
                role="vace",
                key_prefix="vace_blocks.{index}.",
                token_wise=TOKEN_WISE,
                grouped=GROUPED_DIFFUSERS,
            ),
        ),
        txt_emb=("condition_embedder.text_embedder",),
        img_emb=("condition_embedder.image_embedder",),
        stream_modules=("condition_embedder",),
    ),
    required_paths=("vace_blocks",),
    detect_keys=(
        "condition_embedder.text_embedder.linear_1.weight",
        "vace_blocks.0.proj_out.weight",
    ),
    hidden_param="attn1.to_q.weight",
    variants=VARIANTS,
    activation_bytes_per_token_channel=ACTIVATION_BYTES_PER_TOKEN_CHANNEL,
)

CONFIGS = (COMFYUI_VACE, COMFYUI, DIFFUSERS_VACE, DIFFUSERS)


def comfy_state_shapes(
    dim: int,
    ffn_dim: int,
    num_layers: int,
    in_dim: int = 16,
    out_dim: int = 16,
    text_dim: int = 4096,
    freq_dim: int = 256,
    image_dim: int | None = None,
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a Wan checkpoint in ComfyUI's (the original) layout, for writing test
    and benchmark files of any size. Patch size (1, 2, 2), qk-norm and cross-attention norm,
    as in every released Wan model; ``image_dim`` adds the i2v image projection."""
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (dim, in_dim, 1, 2, 2),
        "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim),
        "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim),
        "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq_dim),
        "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim),
        "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim),
        "time_projection.1.bias": (6 * dim,),
    }
    attention = ["q", "k", "v", "o"]
    for i in range(num_layers):
        block = f"blocks.{i}."
        for attn in ("self_attn", "cross_attn"):
            for proj in attention + (
                ["k_img", "v_img"] if image_dim and attn == "cross_attn" else []
            ):
                shapes[f"{block}{attn}.{proj}.weight"] = (dim, dim)
                shapes[f"{block}{attn}.{proj}.bias"] = (dim,)
            norms = ["norm_q", "norm_k"] + (
                ["norm_k_img"] if image_dim and attn == "cross_attn" else []
            )
            for norm in norms:
                shapes[f"{block}{attn}.{norm}.weight"] = (dim,)
        shapes[f"{block}norm3.weight"] = (dim,)
        shapes[f"{block}norm3.bias"] = (dim,)
        shapes[f"{block}ffn.0.weight"] = (ffn_dim, dim)
        shapes[f"{block}ffn.0.bias"] = (ffn_dim,)
        shapes[f"{block}ffn.2.weight"] = (dim, ffn_dim)
        shapes[f"{block}ffn.2.bias"] = (dim,)
        shapes[f"{block}modulation"] = (1, 6, dim)
    shapes["head.head.weight"] = (out_dim * 4, dim)
    shapes["head.head.bias"] = (out_dim * 4,)
    shapes["head.modulation"] = (1, 2, dim)
    if image_dim:
        shapes["img_emb.proj.0.weight"] = (image_dim,)
        shapes["img_emb.proj.0.bias"] = (image_dim,)
        shapes["img_emb.proj.1.weight"] = (image_dim, image_dim)
        shapes["img_emb.proj.1.bias"] = (image_dim,)
        shapes["img_emb.proj.3.weight"] = (dim, image_dim)
        shapes["img_emb.proj.3.bias"] = (dim,)
        shapes["img_emb.proj.4.weight"] = (dim,)
        shapes["img_emb.proj.4.bias"] = (dim,)
    return shapes
