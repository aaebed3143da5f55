"""Z-Image (6B: Turbo, Base, Omni, pixel space) and Lumina Image 2.0, in ComfyUI's layout.

ComfyUI core: ``comfy.ldm.lumina.model.NextDiT`` (``model_base.Lumina2``; Z-Image is its
3,840-wide config) and its subclass ``NextDiTPixelSpace`` (``model_base.ZImagePixelSpace``).
A forward runs, in order:

* ``context_refiner``: 2 blocks over the caption tokens only (and Omni's reference
  captions): a text refiner, swapped with ``offload_txt_emb`` like HunyuanVideo's;
* ``siglip_refiner`` (Omni only, and only when reference latents are given): 2 blocks over
  the reference images' SigLIP features;
* ``noise_refiner``: 2 blocks over the image tokens (reference latents' tokens first),
  modulated by the timestep like the main blocks;
* ``layers``: the 30 main blocks over captions and image together.

The refiners' blocks are as large as a main block (0.35-0.36 GB at Z-Image), so the image
ones are main lists too, in that order; a variant is told apart by the first main list,
whose 2 blocks and the width name it. Omni's ``siglip_refiner`` exists only in Omni, so Omni
has its own record (required path), tried first.

Kept resident: ``x_pad_token``, ``cap_pad_token`` and ``siglip_pad_token`` (read directly).
Pixel space's ``dec_net`` decoder runs through its layers' own forwards (it reads
``cond_embed.weight.dtype``, which a placeholder keeps), so it streams in a streamed plan.
"""

from .base import ArchConfig, BlockListLayout, ModelLayout, Variant

# bf16 bytes per block, from the real configs on the meta device: Z-Image 0.362 GB per main
# and noise-refiner block (x 30 + 2), 0.354 GB per context/SigLIP-refiner block (x 2 each;
# 12.3 GB in all, Omni 13.0 GB); Lumina 2 0.175 GB x 26 + 2 (5.2 GB). Reserve: activations
# at 1024x1024 (4,096 image tokens) with ~512 caption tokens, a cfg batch of 2, at ~21 bytes
# per token and hidden channel (as measured for Wan): 0.8 GB at Z-Image, plus ~1 GB of CUDA
# context and ComfyUI headroom; 3 GB at least, as for the other records (Omni's reference
# images add 4,096 tokens each, which the floor covers).
VARIANTS = (
    Variant("z-image-6b", "Z-Image 6B", num_blocks=2, hidden_size=3840, reserve_gb=3.0),
    Variant("lumina2-2b", "Lumina Image 2.0", num_blocks=2, hidden_size=2304, reserve_gb=3.0),
)

_CONTEXT = BlockListLayout("context_refiner", role="txt_emb", key_prefix="context_refiner.{index}.")
_SIGLIP = BlockListLayout("siglip_refiner", key_prefix="siglip_refiner.{index}.")
_NOISE = BlockListLayout("noise_refiner", key_prefix="noise_refiner.{index}.")
_LAYERS = BlockListLayout("layers", key_prefix="layers.{index}.")

_TXT_EMB = ("cap_embedder",)
# NewBie's pooled-text path (clip_text_pooled_proj, time_text_embed) and pixel space's
# decoder exist only in those models; missing ones are skipped
_STREAM = (
    "x_embedder",
    "t_embedder",
    "clip_text_pooled_proj",
    "time_text_embed",
    "final_layer",
    "dec_net",
)
_DETECT = ("cap_embedder.1.weight", "noise_refiner.0.attention.qkv.weight")

OMNI = ArchConfig(
    name="z_image_omni.comfyui",
    family="z_image",
    layout_kind="comfyui",
    class_names=("NextDiT",),
    layout=ModelLayout(
        name="z_image_omni",
        block_lists=(_SIGLIP, _NOISE, _LAYERS, _CONTEXT),
        txt_emb=_TXT_EMB,
        img_emb=("siglip_embedder",),
        stream_modules=_STREAM,
    ),
    required_paths=("siglip_refiner",),
    detect_keys=_DETECT + ("siglip_refiner.0.attention.qkv.weight",),
    hidden_param="attention.qkv.weight",
    variants=VARIANTS,
)

COMFYUI = ArchConfig(
    name="z_image.comfyui",
    family="z_image",
    layout_kind="comfyui",
    class_names=("NextDiT",),
    layout=ModelLayout(
        name="z_image",
        block_lists=(_NOISE, _LAYERS, _CONTEXT),
        txt_emb=_TXT_EMB,
        stream_modules=_STREAM,
    ),
    detect_keys=_DETECT,
    hidden_param="attention.qkv.weight",
    variants=VARIANTS,
)

CONFIGS = (OMNI, COMFYUI)
