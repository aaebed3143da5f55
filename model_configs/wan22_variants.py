"""Wan 2.2 S2V, Wan 2.2 Animate and the Wan camera models in ComfyUI's layout: the same
``blocks`` as ``wan.comfyui``, plus the large modules each runs between or before the blocks.

Core builds them as subclasses of ``comfy.ldm.wan.model.WanModel`` (``WanModel_S2V``,
``model_animate.AnimateWanModel``, ``CameraWanModel``), so ``wan.comfyui`` would match them
by class; these records have required paths and so are tried first. Each adds only
``stream_modules``: the modules below run through their own layers' forwards, outside the
blocks, and at 14B they are large enough to matter in a streamed plan (bf16, real configs on
the meta device):

- S2V: ``audio_injector`` (12 cross-attentions and AdaLN layers, 3.78 GB) runs after blocks
  0, 4, 8, ... 39, indexed by block number; ``casual_audio_encoder`` (0.19 GB) and the
  motion frames' ``frame_packer`` (0.05 GB) once per forward. The injectors are not a block list: their count and indices differ from
  ``blocks``, and ``blocks_to_swap`` counts blocks. ``trainable_cond_mask`` is read as a
  weight by the root, so it stays resident.
- Animate: ``face_adapter`` (one fuser block per 5 blocks, 1.68 GB) runs after blocks 0, 5,
  ...; ``motion_encoder`` and ``face_encoder`` encode the face frames once per forward.
- Camera: ``control_adapter`` (1.01 GB) once per forward.

Wan 2.2 5B and HuMo need no record of their own: 5B is a plain ``WanModel``; HuMo's audio
cross-attention sits inside each block (``WanAttentionBlockAudio``) and moves with it, and its
``audio_proj`` is 0.08 GB.
"""

from .base import ArchConfig, BlockListLayout, ModelLayout
from .wan import ACTIVATION_BYTES_PER_TOKEN_CHANNEL, COMFYUI as WAN, FUSED, GROUPED, VARIANTS

# wan.comfyui's own streamed modules (the time embedding and projection)
_WAN_STREAMED = WAN.layout.stream_modules


def _record(name: str, required: str, detect_key: str, extra: tuple[str, ...]) -> ArchConfig:
    """A Wan record with ``blocks`` as the only swapped list and ``extra`` streamed."""
    return ArchConfig(
        name=f"{name}.comfyui",
        family=name,
        layout_kind="comfyui",
        class_names=("WanModel",),
        layout=ModelLayout(
            name=name,
            # core's default WanAttentionBlock: its FFN runs fused ([Note: fused parts])
            block_lists=(
                BlockListLayout(
                    "blocks", key_prefix="blocks.{index}.", fused=FUSED, grouped=GROUPED
                ),
            ),
            txt_emb=WAN.layout.txt_emb,
            img_emb=WAN.layout.img_emb,
            stream_modules=_WAN_STREAMED + extra,
        ),
        required_paths=(required,),
        forbidden_paths=("vace_blocks",),
        # the key core's detection tells the variant by, beside wan.comfyui's
        detect_keys=WAN.detect_keys + (detect_key,),
        hidden_param=WAN.hidden_param,
        # 14B blocks (5,120 wide) as Wan 2.1/2.2 14B: the same presets
        variants=VARIANTS,
        activation_bytes_per_token_channel=ACTIVATION_BYTES_PER_TOKEN_CHANNEL,
    )


COMFYUI_S2V = _record(
    "wan22_s2v",
    "audio_injector",
    "casual_audio_encoder.encoder.final_linear.weight",
    ("audio_injector", "casual_audio_encoder", "frame_packer"),
)
COMFYUI_ANIMATE = _record(
    "wan22_animate",
    "face_adapter",
    "face_adapter.fuser_blocks.0.k_norm.weight",
    ("face_adapter", "motion_encoder", "face_encoder"),
)
COMFYUI_CAMERA = _record(
    "wan_camera", "control_adapter", "control_adapter.conv.weight", ("control_adapter",)
)

CONFIGS = (COMFYUI_S2V, COMFYUI_ANIMATE, COMFYUI_CAMERA)
