"""Tiny LTX-Video, LTX-2, LTX-2.3, HunyuanVideo 1.5 and Kandinsky 5 models, built by ComfyUI
core's own loader from state dicts in the real key layout, with inputs that take the paths
core takes inside the blocks (LTX-2's audio stream and reference audio, HunyuanVideo 1.5's
glyph text, image features and reference latent, Kandinsky 5's first-frame latent).

Every family but Kandinsky 5 Image goes through ``comfy.sd.load_diffusion_model_state_dict``,
which detects it from the keys (and, for LTX-2, from the file's ``config`` metadata, as real
LTX-2 files carry it). Detection maps Kandinsky 5 Image only to 2,560 wide, so that one goes
through the same steps core takes after detection, as ``tiny_models.comfy_load_tiny`` does
for Flux. Needs ``COMFYUI_PATH``; ``SPECS`` and the builders import without ComfyUI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import torch

from tiny_models import _gen, _rand, _randn, build_meta, comfy_state_dict, forward_streams
from tiny_models import core_inputs, has_comfy_class, load_detected, load_undetected, run_loaded


@dataclass(frozen=True)
class Spec:
    """One tiny architecture: its core class, constructor kwargs, the ``supported_models``
    class core should pick, and whether detection maps the state dict back to it."""

    dotted: str
    config: dict
    model_config: str
    record: str
    detectable: bool = True
    metadata: bool = False  # the config travels in the file's metadata, as LTX-2's does


_LTXV = "comfy.ldm.lightricks.model.LTXVModel"
_LTXAV = "comfy.ldm.lightricks.av_model.LTXAVModel"
_HUNYUAN = "comfy.ldm.hunyuan_video.model.HunyuanVideo"
_KANDINSKY = "comfy.ldm.kandinsky5.model.Kandinsky5"

# Detection hard-codes LTX's 32 heads (head dim = to_k rows // 32), in_channels 128 and
# caption_channels 4096: 32 heads of 2 keep it small.
_LTXV_TINY = dict(
    in_channels=128,
    cross_attention_dim=64,
    attention_head_dim=2,
    num_attention_heads=32,
    caption_channels=4096,
    num_layers=4,
)
# LTX-2: the audio stream's dims and the connectors come from the metadata; the audio latent
# is fixed at 8 channels x 16 bins (128 in). Connectors: 2 heads of 16 = caption_channels.
_LTXAV_TINY = dict(
    _LTXV_TINY,
    caption_channels=32,
    num_layers=3,
    audio_in_channels=128,
    audio_attention_head_dim=16,
    audio_num_attention_heads=2,
    audio_cross_attention_dim=32,
    connector_attention_head_dim=16,
    connector_num_attention_heads=2,
    connector_num_layers=2,
    rope_type="split",
    frequencies_precision="float64",
)
# LTX-2.3: gated attention, the cross-attention AdaLN, the projections before the connectors
# (plain functions here) and a video connector as wide as the video stream.
_LTX23_FLAGS = dict(
    apply_gated_attention=True,
    connector_apply_gated_attention=True,
    cross_attention_adaln=True,
    caption_proj_before_connector=True,
    caption_projection_first_linear=False,
    use_middle_indices_grid=True,
    rope_type="split",
    frequencies_precision="float64",
)
_LTXAV23_TINY = dict(
    _LTXAV_TINY,
    **_LTX23_FLAGS,
    connector_attention_head_dim=32,
    audio_connector_attention_head_dim=16,
    audio_connector_num_attention_heads=2,
)
# Detection: heads = hidden // 128 with rope axes (16, 56, 56); HunyuanVideo15 is picked for
# a 1,152-wide image projection. in = 4 latent + 4 image + 1 mask channels, as 1.5's i2v.
_HV15_TINY = dict(
    image_model="hunyuan_video",
    in_channels=9,
    out_channels=4,
    vec_in_dim=None,
    context_in_dim=32,
    hidden_size=128,
    mlp_ratio=4.0,
    num_heads=1,
    depth=3,
    depth_single_blocks=0,
    axes_dim=[16, 56, 56],
    theta=256,
    patch_size=[1, 1, 1],
    qkv_bias=True,
    guidance_embed=False,
    byt5=True,
    meanflow=False,
    use_cond_type_embedding=True,
    vision_in_dim=1152,
    meanflow_sum=True,
)
# Detection: head dim 64 unless the width is a released one; text widths are fixed (Qwen2.5-VL
# 3,584, CLIP 768). Video: 16 latent + 16 image + 1 mask channels, patch (1, 2, 2).
_K5_TINY = dict(
    model_dim=64,
    ff_dim=128,
    time_dim=32,
    visual_embed_dim=132,
    num_text_blocks=2,
    num_visual_blocks=3,
)

SPECS: dict[str, Spec] = {
    "ltxv": Spec(_LTXV, _LTXV_TINY, "LTXV", "ltxv.comfyui"),
    "ltxav": Spec(_LTXAV, _LTXAV_TINY, "LTXAV", "ltxav.comfyui", metadata=True),
    "ltxav23": Spec(_LTXAV, _LTXAV23_TINY, "LTXAV", "ltxav.comfyui", metadata=True),
    "hunyuan_video15": Spec(_HUNYUAN, _HV15_TINY, "HunyuanVideo15", "hunyuan_video15.comfyui"),
    "kandinsky5": Spec(_KANDINSKY, _K5_TINY, "Kandinsky5", "kandinsky5.comfyui"),
    # detection maps Kandinsky 5 Image only to 2,560 wide
    "kandinsky5_image": Spec(
        _KANDINSKY,
        dict(_K5_TINY, visual_embed_dim=64, rope_scale_factor=(1.0, 1.0, 1.0)),
        "Kandinsky5Image",
        "kandinsky5.comfyui",
        detectable=False,
    ),
}


# The released sizes, built on the meta device (no memory) to check the records' variants
# and the block sizes their presets come from: name -> (the tiny spec of its class, kwargs,
# bf16 GB of one block)
REAL: dict[str, tuple[str, dict, float]] = {
    "ltxv-2b": (
        "ltxv",
        dict(num_layers=28, attention_head_dim=64, cross_attention_dim=2048),
        0.134,
    ),
    "ltxv-13b": (
        "ltxv",
        dict(num_layers=48, attention_head_dim=128, cross_attention_dim=4096),
        0.537,
    ),
    "ltx-2": ("ltxav", dict(rope_type="split"), 0.772),  # core's defaults are LTX-2's dims
    "ltx-2.3": (
        "ltxav",
        dict(
            _LTX23_FLAGS,
            connector_attention_head_dim=128,
            connector_num_attention_heads=32,
            connector_num_layers=8,
            audio_connector_attention_head_dim=64,
            audio_connector_num_attention_heads=32,
        ),
        0.773,
    ),
    "hunyuan-video-1.5": (
        "hunyuan_video15",
        dict(
            _HV15_TINY,
            in_channels=65,
            out_channels=32,
            context_in_dim=3584,
            hidden_size=2048,
            num_heads=16,
            depth=54,
        ),
        0.302,
    ),
    "kandinsky5-video-lite": (
        "kandinsky5",
        dict(_K5_TINY, model_dim=1792, ff_dim=7168, time_dim=512, num_visual_blocks=32),
        0.119,
    ),
    "kandinsky5-video-pro": (
        "kandinsky5",
        dict(
            _K5_TINY,
            model_dim=4096,
            ff_dim=16384,
            time_dim=1024,
            num_text_blocks=4,
            num_visual_blocks=60,
            axes_dims=(32, 48, 48),
        ),
        0.613,
    ),
    "kandinsky5-image-lite": (
        "kandinsky5",
        dict(
            _K5_TINY,
            model_dim=2560,
            ff_dim=10240,
            time_dim=512,
            visual_embed_dim=64,
            num_visual_blocks=50,
            axes_dims=(32, 48, 48),
        ),
        0.233,
    ),
}


def build_real(name: str) -> torch.nn.Module:
    """A released size of ``name`` on the meta device, in bf16 (no weights)."""
    spec, config, _ = REAL[name]
    return build_meta(SPECS[spec].dotted, config)


def has_class(name: str) -> bool:
    """Whether this core has ``name``'s model class (older cores lack LTX-2, 1.5 and K5)."""
    # HunyuanVideo 1.5 reuses HunyuanVideo's class: its supported_models entry tells
    return has_comfy_class(SPECS[name].dotted, SPECS[name].model_config)


def state_dict_for(
    name: str, seed: int = 0, prefix: str = "", dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A random state dict of ``name`` in ComfyUI's key layout (``prefix`` before each key)."""
    return comfy_state_dict(SPECS[name].dotted, SPECS[name].config, seed, prefix, dtype)


def metadata_for(name: str) -> dict[str, str] | None:
    """The file metadata core reads LTX-2's dims from (``{"config": {"transformer": ...}}``)."""
    spec = SPECS[name]
    return {"config": json.dumps({"transformer": spec.config})} if spec.metadata else None


def load_tiny(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``(ModelPatcher, make_inputs)`` for ``name``, loaded through core's own loader."""
    spec = SPECS[name]
    sd = state_dict_for(name, seed, dtype=dtype)
    if spec.detectable:
        # (older cores take no metadata; only LTX-2 needs it)
        extra = {"metadata": metadata_for(name)} if spec.metadata else {}
        patcher = load_detected(sd, name, dtype, **extra)
    else:
        unet_config = {"image_model": "kandinsky5", **spec.config}  # the only one here
        patcher = load_undetected(spec.model_config, unet_config, sd, dtype)
    return patcher, make_inputs_for(name, patcher.model.diffusion_model)


# -- inputs -------------------------------------------------------------------------------

FRAMES, HEIGHT, WIDTH = 2, 4, 4  # latent frames and size: 32 video tokens at patch 1
TEXT = 12


def make_inputs_for(name: str, model: torch.nn.Module) -> Callable[..., dict]:
    """``make_inputs(seed) -> dict`` for :func:`call`; fresh tensors on every call."""
    if name == "ltxv":
        return _ltxv_inputs(model)
    if name.startswith("ltxav"):
        return _ltxav_inputs(model)
    if name == "hunyuan_video15":
        return _hv15_inputs(model)
    return _k5_inputs(model, image=name == "kandinsky5_image")


def _frame_timesteps(g, tokens_per_frame: int) -> torch.Tensor:
    """Per-token timesteps as core makes them from a denoise mask (``process_timestep``):
    the first latent frame is the conditioning image (0), the others share one sigma."""
    sigma = _rand(g, (1,), "cpu", 0.2, 0.9)
    t = sigma.expand(FRAMES * tokens_per_frame).clone()
    t[:tokens_per_frame] = 0.0
    return t.view(1, -1, 1)


def _ltxv_inputs(model):
    caption = model.caption_projection.linear_1.in_features  # 0.3.64 keeps no attribute

    def make_inputs(seed: int) -> dict:
        g = _gen(seed)
        return {
            "x": _randn(g, (1, 128, FRAMES, HEIGHT, WIDTH), "cpu", torch.float32),
            "timestep": _frame_timesteps(g, HEIGHT * WIDTH),
            "context": _randn(g, (1, TEXT, caption), "cpu", torch.float32),
            "attention_mask": torch.ones(1, TEXT, dtype=torch.int64),
            "frame_rate": 25,
        }

    return make_inputs


def _ltxav_inputs(model):
    # LTX-2 connectors take the text encoder's features twice as wide as one connector;
    # LTX-2.3 the video and audio widths side by side
    if model.caption_proj_before_connector:
        raw = model.cross_attention_dim + model.audio_cross_attention_dim
    else:
        raw = model.caption_channels

    def make_inputs(seed: int) -> dict:
        g = _gen(seed)
        return {
            "x": [
                _randn(g, (1, 128, FRAMES, HEIGHT, WIDTH), "cpu", torch.float32),
                _randn(g, (1, 8, 5, 16), "cpu", torch.float32),  # audio: 5 latents
            ],
            "timestep": (_frame_timesteps(g, HEIGHT * WIDTH), _rand(g, (1,), "cpu", 0.2, 0.9)),
            # run through the connectors by call(), as core's extra_conds does
            # (no mask: the connectors pad the text to 1,024 tokens with their registers)
            "raw_context": _randn(g, (1, TEXT, raw), "cpu", torch.float32),
            "frame_rate": 25,
            # ID-LoRA reference audio: tokens prepended to the audio stream at timestep 0
            "ref_audio": {"tokens": _randn(g, (1, 3, 128), "cpu", torch.float32)},
        }

    return make_inputs


def _hv15_inputs(model):
    p = model.params

    def make_inputs(seed: int) -> dict:
        g = _gen(seed)
        return {
            "x": _randn(g, (1, p.in_channels, FRAMES, HEIGHT, WIDTH), "cpu", torch.float32),
            "timestep": _rand(g, (1,), "cpu", 0.0, 1000.0),
            # (no mask: extra_conds drops one that masks nothing)
            "context": _randn(g, (1, TEXT, p.context_in_dim), "cpu", torch.float32),
            "txt_byt5": _randn(g, (1, 5, 1472), "cpu", torch.float32),  # glyph text
            "clip_fea": _randn(g, (1, 6, p.vision_in_dim), "cpu", torch.float32),  # SigLIP
            "ref_latent": _randn(g, (1, p.in_channels, 1, HEIGHT, WIDTH), "cpu", torch.float32),
        }

    return make_inputs


def _k5_inputs(model, image: bool):
    channels = model.visual_embed_dim // 4  # patch (1, 2, 2)
    text_dim = model.text_embeddings.in_layer.in_features
    pooled_dim = model.pooled_text_embeddings.in_layer.in_features

    def make_inputs(seed: int) -> dict:
        g = _gen(seed)
        size = (1, channels, 8, 8) if image else (1, channels, FRAMES, 8, 8)
        inputs = {
            "x": _randn(g, size, "cpu", torch.float32),
            "timestep": _rand(g, (1,), "cpu", 0.0, 1000.0),
            "context": _randn(g, (1, TEXT, text_dim), "cpu", torch.float32),
            "y": _randn(g, (1, pooled_dim), "cpu", torch.float32),
        }
        if not image:  # i2v: the first frame's latent written over the input
            inputs["time_dim_replace"] = _randn(g, (1, 16, 1, 8, 8), "cpu", torch.float32)
        return inputs

    return make_inputs


# -- running ------------------------------------------------------------------------------


def call(
    model: torch.nn.Module, inputs: dict, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """One forward as core makes it; LTX-2's text goes through the connectors first, as
    ``model_base.LTXAV.extra_conds`` runs them. Outputs of several streams are flattened
    into one tensor. ``dtype``: the model's compute dtype, which core's ``apply_model`` casts
    every floating input to but the timestep (on a GPU, core may pick bf16 for the model)."""

    # fresh copies: forwards write into their inputs (Kandinsky 5's first frame)
    return forward_streams(model, core_inputs(inputs, device, dtype), unprocessed=True)


def run(comfy, patcher, inputs: dict) -> torch.Tensor:
    """Load ``patcher`` as sampling does, run one forward, and clean up as core does."""
    dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
    return run_loaded(
        comfy,
        patcher,
        lambda: call(patcher.model.diffusion_model, inputs, patcher.load_device, dtype),
    )


__all__ = [
    "REAL",
    "SPECS",
    "build_real",
    "call",
    "has_class",
    "load_tiny",
    "make_inputs_for",
    "metadata_for",
    "run",
    "state_dict_for",
]
