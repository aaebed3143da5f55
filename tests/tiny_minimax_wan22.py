"""Tiny MiniMax H3 and Wan 2.2 variant models (5B, Animate, S2V, HuMo, Camera), built by
ComfyUI core's own loader (``comfy.sd.load_diffusion_model_state_dict``) from state dicts in
the real key layout, with inputs that take the paths core takes inside and between the
blocks: MiniMax H3's audio stream, reference image rows, per-row timesteps and text tags;
S2V's audio injectors and reference latent / motion frames; HuMo's audio cross-attention
inside each block; Animate's pose latents and face adapters; the camera adapter.

Core detects all of them from the keys: Wan's detection fixes heads = dim // 128 and the
text width at 4,096, so the Wan models are 128 wide with one head. Needs ``COMFYUI_PATH``;
``SPECS`` imports without ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# fresh: benchmarks/architectures_benchmark.py imports it from here
from tiny_models import _build_comfy, _gen, _rand, _randn, forward_streams, fresh
from tiny_models import core_inputs, has_comfy_class, keyed, load_detected, run_loaded


@dataclass(frozen=True)
class Spec:
    """One tiny architecture: its core class, constructor kwargs, the ``supported_models``
    class core should pick and the record ours should pick."""

    dotted: str
    config: dict
    model_config: str
    record: str


_MINIMAX = "comfy.ldm.minimax.model.MiniMaxH3Model"
_WAN = "comfy.ldm.wan.model.WanModel"
_S2V = "comfy.ldm.wan.model.WanModel_S2V"
_HUMO = "comfy.ldm.wan.model.HumoWanModel"
_CAMERA = "comfy.ldm.wan.model.CameraWanModel"
_ANIMATE = "comfy.ldm.wan.model_animate.AnimateWanModel"

# MiniMax H3: detection reads every dim off the shapes. The split-half rope rotates
# 6 * rope_inv_freq_len channels of each head, so heads of 32 take 4 frequencies.
_H3_TINY = dict(
    hidden_size=64,
    num_layers=4,
    token_refiner_num_layers=2,
    num_attention_heads=2,
    attention_head_dim=32,
    ffn_hidden_size=96,
    latents_dim=4,
    audio_latents_dim=8,
    text_dim=48,
    timestep_input_dim=32,
    time_embed_hidden_size=64,
    time_embed_dim=32,
    rope_inv_freq_len=4,
)
# Wan: detection fixes heads = dim // 128, text_dim 4,096, patch (1, 2, 2), qk-norm.
_WAN_TINY = dict(
    patch_size=(1, 2, 2),
    in_dim=16,
    dim=128,
    ffn_dim=256,
    out_dim=16,
    num_heads=1,
    num_layers=4,
)

SPECS: dict[str, Spec] = {
    "minimax_h3": Spec(_MINIMAX, _H3_TINY, "MiniMaxH3", "minimax_h3.comfyui"),
    # the curve-form checkpoints: no time embedder, fp32 adaln over a small shared basis
    "minimax_h3_curve": Spec(
        _MINIMAX, dict(_H3_TINY, adaln_curve_grid=9), "MiniMaxH3", "minimax_h3.comfyui"
    ),
    # Wan 2.2 5B (TI2V): 48 latent channels, per-frame timesteps
    "wan22_5b": Spec(_WAN, dict(_WAN_TINY, in_dim=48, out_dim=48), "WAN22_T2V", "wan.comfyui"),
    # Animate: i2v (CLIP image projection, 36 in), pose embedding, face encoder + adapters,
    # one face adapter per 5 blocks (after blocks 0 and 5)
    "wan22_animate": Spec(
        _ANIMATE,
        dict(_WAN_TINY, in_dim=36, num_layers=10),
        "WAN22_Animate",
        "wan22_animate.comfyui",
    ),
    # S2V: audio injectors after blocks 0 and 4 (core's default inject layers)
    "wan22_s2v": Spec(_S2V, dict(_WAN_TINY, num_layers=5), "WAN22_S2V", "wan22_s2v.comfyui"),
    # HuMo: audio cross-attention inside every block
    "wan21_humo": Spec(_HUMO, dict(_WAN_TINY), "WAN21_HuMo", "wan.comfyui"),
    # Camera (Wan 2.2 Fun camera: no image projection, 36 in) and Wan 2.1 camera (i2v, 32 in)
    "wan22_camera": Spec(
        _CAMERA,
        dict(_WAN_TINY, in_dim=36, model_type="camera_2.2"),
        "WAN22_Camera",
        "wan_camera.comfyui",
    ),
    "wan21_camera": Spec(
        _CAMERA,
        dict(_WAN_TINY, in_dim=32, model_type="camera"),
        "WAN21_Camera",
        "wan_camera.comfyui",
    ),
}


def has_class(name: str) -> bool:
    """Whether this core has ``name``'s model class and ``supported_models`` config (0.3.64
    has the Wan variants but no MiniMax H3)."""
    return has_comfy_class(SPECS[name].dotted, SPECS[name].model_config)


def state_dict_for(
    name: str, seed: int = 0, prefix: str = "", dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A random state dict of ``name`` in ComfyUI's key layout (``prefix`` before each key)."""
    spec = SPECS[name]
    model = _build_comfy(spec.dotted, spec.config, seed)
    sd = model.state_dict()
    if name.startswith("minimax_h3"):  # rope frequencies as the real files carry them
        n = spec.config["rope_inv_freq_len"]
        sd["rope.inv_freq"] = 1.0 / (10000.0 ** (torch.arange(n, dtype=torch.float32) / n))
        if "adaln_t_table" in sd:  # a smooth curve, as the real table samples one
            grid, k = sd["adaln_t_table"].shape
            t = torch.linspace(0, 1, grid).unsqueeze(1)
            sd["adaln_t_table"] = torch.sin(t * torch.arange(1, k + 1)).float()
    return keyed(sd, prefix, dtype)


def load_tiny(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``(ModelPatcher, make_inputs)`` for ``name``, loaded through core's own loader."""
    patcher = load_detected(state_dict_for(name, seed, dtype=dtype), name, dtype)
    return patcher, make_inputs_for(name, patcher.model.diffusion_model)


# -- inputs -------------------------------------------------------------------------------

FRAMES, HEIGHT, WIDTH = 2, 4, 4  # latent frames and size: 8 video tokens at patch (1, 2, 2)
TEXT = 6


def make_inputs_for(name: str, model: torch.nn.Module) -> Callable[[int], dict]:
    """``make_inputs(seed) -> dict`` for :func:`call`; fresh tensors on every call."""
    if name.startswith("minimax_h3"):
        return _h3_inputs(model)
    return _wan_inputs(name, model)


def _h3_inputs(model):
    channels, audio_channels = model.latents_dim, model.audio_latents_dim
    text_dim = model.condition_proj.in_features
    audio_t = 3

    def make_inputs(seed: int) -> dict:
        g = _gen(seed)
        ref = _randn(g, (1, channels, 1, HEIGHT, WIDTH), "cpu", torch.float32)
        # a denoise mask that keeps the first latent frame: per-row timesteps in every block
        mask = torch.ones(1, 1, FRAMES, HEIGHT, WIDTH)
        mask[:, :, 0] = 0.25
        tags = torch.ones(TEXT, dtype=torch.long)
        tags[2:4] = 0  # vision pads in the prompt carry the video modality
        return {
            "x": [
                _randn(g, (1, channels, FRAMES, HEIGHT, WIDTH), "cpu", torch.float32),
                _randn(g, (1, audio_channels, 2, audio_t), "cpu", torch.float32),  # stereo
            ],
            "timestep": _rand(g, (1,), "cpu", 200.0, 900.0),
            # run through condition_proj + the token refiner by call(), as extra_conds does
            "raw_context": _randn(g, (1, TEXT, text_dim), "cpu", torch.float32),
            "denoise_mask": mask,
            "minimax_payload": {
                # a reference image packed between the text and the targets
                "refs": [{"kind": "image", "latent_h": HEIGHT, "latent_w": WIDTH}],
                "cond_video_latents": [ref],
                "text_token_tags": tags,
                "seed": 3,
                "audio_scale": 1.7,  # the sampler's carried audio scale (forward undoes it)
            },
        }

    return make_inputs


def _wan_inputs(name: str, model):
    in_dim, text_dim = model.in_dim, model.text_dim
    image = model.img_emb is not None
    per_frame_t = model.out_dim == 48  # Wan 2.2 5B: core's WAN22 feeds (batch, frames)

    # S2V's motion packer folds 4 x 8 x 8 latents: 8 x 8 there
    height, width = (8, 8) if name == "wan22_s2v" else (HEIGHT, WIDTH)

    def make_inputs(seed: int) -> dict:
        g = _gen(seed)
        inputs = {
            "x": _randn(g, (1, in_dim, FRAMES, height, width), "cpu", torch.float32),
            "timestep": _rand(g, (1, FRAMES) if per_frame_t else (1,), "cpu", 0.0, 1000.0),
            "context": _randn(g, (1, TEXT, text_dim), "cpu", torch.float32),
        }
        if image:  # CLIP-H penultimate features: 1280 wide
            inputs["clip_fea"] = _randn(g, (1, 5, 1280), "cpu", torch.float32)
        latent = (1, 16, 1, height, width)
        if name == "wan22_s2v":
            # wav2vec features: 25 layers x 1,024, 4 per latent frame
            inputs["audio_embed"] = _randn(g, (1, 25, 1024, FRAMES * 4), "cpu", torch.float32)
            inputs["reference_latent"] = _randn(g, latent, "cpu", torch.float32)
            motion = (1, 16, 3, height, width)
            inputs["reference_motion"] = _randn(g, motion, "cpu", torch.float32)
            control = (1, 16, FRAMES, height, width)
            inputs["control_video"] = _randn(g, control, "cpu", torch.float32)
        elif name == "wan21_humo":
            # whisper features: 5 layers x 1,280 in windows of 8, one window per latent frame
            inputs["audio_embed"] = _randn(g, (1, FRAMES, 8, 5, 1280), "cpu", torch.float32)
            inputs["reference_latent"] = _randn(g, latent, "cpu", torch.float32)
        elif name == "wan22_animate":
            inputs["pose_latents"] = _randn(
                g, (1, 16, FRAMES - 1, HEIGHT, WIDTH), "cpu", torch.float32
            )
            # one 512 x 512 face frame (the motion encoder's fixed size)
            inputs["face_pixel_values"] = _rand(g, (1, 3, 1, 512, 512), "cpu", -1.0, 1.0)
        elif name.endswith("_camera"):
            # Plücker embedding: 24 channels at 8x the latent size, per latent frame
            size = (1, 24, FRAMES, HEIGHT * 8, WIDTH * 8)
            inputs["camera_conditions"] = _randn(g, size, "cpu", torch.float32)
        return inputs

    return make_inputs


# -- running ------------------------------------------------------------------------------


def call(
    model: torch.nn.Module,
    inputs: dict,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One forward as core makes it; MiniMax H3's text goes through the token refiner first,
    as ``model_base.MiniMaxH3.extra_conds`` runs it. Outputs of several streams are
    flattened into one tensor. Inputs go to ``device``; ``dtype``: the model's compute dtype,
    which core's ``apply_model`` casts the latents and every floating tensor (or list of
    them) it is given to, but not the timestep or what a dict carries (on a GPU core may
    pick fp16 or bf16 for the model)."""
    return forward_streams(model, core_inputs(inputs, device, dtype))  # fresh: forwards write


def run(comfy, patcher, inputs: dict) -> torch.Tensor:
    """Load ``patcher`` as sampling does, run one forward, and clean up as core does."""
    dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
    return run_loaded(
        comfy,
        patcher,
        lambda: call(patcher.model.diffusion_model, inputs, patcher.load_device, dtype),
    )


__all__ = [
    "SPECS",
    "call",
    "fresh",
    "has_class",
    "load_tiny",
    "make_inputs_for",
    "run",
    "state_dict_for",
]
