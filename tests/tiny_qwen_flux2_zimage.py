"""Tiny Qwen-Image, Flux.2, LongCat-Image and Z-Image models, loaded by ComfyUI core's own
loader (``comfy.sd.load_diffusion_model_state_dict``) from state dicts in the real key
layout, with inputs that take the paths core takes inside the blocks: reference latents
(Qwen-Image Edit, Edit 2511's zero-timestep references, Flux.2's), LongCat-Image's rope
shift, Z-Image Omni's reference captions and SigLIP features.

Flux.2 and LongCat-Image are detected from their keys at 128 wide (detection reads the
width off ``img_in``). Detection hard-codes the rest's widths: Qwen-Image's 24 heads of 128
and 3,584-wide text, and Z-Image's whole config at 3,840 wide (below that it is plain Lumina
2, and the pixel-space decoder is looked for only at 3,840). For those, :func:`detection`
keeps core's own detection, which must still tell the family from the keys, and replaces
only the dims it would read at full size with the tiny ones; core's loader and the node's
lazy loader run unchanged under it. Needs ``COMFYUI_PATH``; ``SPECS`` import without it.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from tiny_models import _gen, _rand, _randn, build_meta, comfy_state_dict, fresh
from tiny_models import load_detected, run_loaded


@dataclass(frozen=True)
class Spec:
    """One tiny architecture.

    Attributes:
        dotted: core's diffusion model class.
        config: its constructor kwargs (``image_model`` as detection names the family).
        record: our record that must match the model.
        model_config: the ``comfy.supported_models`` class core picks for the tiny file.
        needs: ``supported_models`` class that marks a core with this family (older cores
            lack it).
        detectable: detection maps the tiny state dict to ``config`` by itself.
        lora_keys: weights a LoRA-style patch touches (``diffusion_model.`` is added): a
            block the plans swap, a resident one, text and other embeddings.
    """

    dotted: str
    config: dict
    record: str
    model_config: str
    needs: str
    detectable: bool
    lora_keys: tuple[str, ...]


_QWEN = "comfy.ldm.qwen_image.model.QwenImageTransformer2DModel"
_FLUX = "comfy.ldm.flux.model.Flux"
_NEXTDIT = "comfy.ldm.lumina.model.NextDiT"
_PIXEL = "comfy.ldm.lumina.model.NextDiTPixelSpace"

# 2 heads of 16 (rope axes 4 + 6 + 6); the 16-channel latent patchified 2x2 as in the real
# model, so img_in takes 64 as the real one does.
_QWEN_TINY = dict(
    image_model="qwen_image",
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    axes_dims_rope=(4, 6, 6),
)
# Detection: heads = width // 128 (4 rope axes of 32), the rest fixed as in the real model.
_FLUX2_TINY = dict(
    image_model="flux2",
    in_channels=128,
    out_channels=128,
    vec_in_dim=None,
    context_in_dim=64,
    hidden_size=128,
    mlp_ratio=3.0,
    num_heads=1,
    depth=2,
    depth_single_blocks=3,
    axes_dim=[32, 32, 32, 32],
    theta=2000,
    patch_size=1,
    qkv_bias=False,
    guidance_embed=True,
    txt_ids_dims=[3],
    global_modulation=True,
    mlp_silu_act=True,
    ops_bias=False,
    default_ref_method="index",
    ref_index_scale=10.0,
    yak_mlp=False,
    txt_norm=False,
)
# LongCat-Image is Flux with 3,584-wide Qwen2.5-VL text, no pooled vector and no guidance:
# detection keys on exactly that (and sets the two-axis text positions).
_LONGCAT_TINY = dict(
    image_model="flux",
    in_channels=16,
    out_channels=16,
    vec_in_dim=None,
    context_in_dim=3584,
    hidden_size=128,
    mlp_ratio=4.0,
    num_heads=1,
    depth=2,
    depth_single_blocks=3,
    axes_dim=[16, 56, 56],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    guidance_embed=False,
    txt_ids_dims=[1, 2],
    yak_mlp=False,
    txt_norm=False,
)
# Z-Image's modulation takes the timestep embedding's 256 features as min(width, 256) inputs,
# so the width must be 256 at least; 4 heads of 64 (rope axes 16 + 24 + 24).
_ZIMAGE_TINY = dict(
    image_model="lumina2",
    patch_size=2,
    in_channels=16,
    dim=256,
    n_layers=3,
    n_refiner_layers=2,
    n_heads=4,
    n_kv_heads=4,
    multiple_of=64,
    ffn_dim_multiplier=8.0 / 3.0,
    qk_norm=True,
    cap_feat_dim=32,
    axes_dims=[16, 24, 24],
    axes_lens=[1536, 512, 512],
    rope_theta=256.0,
    z_image_modulation=True,
    time_scale=1000.0,
    pad_tokens_multiple=32,
)
_PIXEL_TINY = dict(
    _ZIMAGE_TINY,
    image_model="zimage_pixel",
    in_channels=3,
    decoder_in_channels=12,
    decoder_hidden_size=32,
    decoder_num_res_blocks=2,
    decoder_max_freqs=4,
)

_ZIMAGE_LORA = (
    "layers.2.feed_forward.w1.weight",
    "noise_refiner.0.attention.qkv.weight",
    "context_refiner.1.feed_forward.w2.weight",
    "cap_embedder.1.weight",
    "x_embedder.weight",
)

SPECS: dict[str, Spec] = {
    "qwen_image": Spec(
        _QWEN,
        _QWEN_TINY,
        "qwen_image.comfyui",
        "QwenImage",
        "QwenImage",
        False,
        (
            "transformer_blocks.2.img_mlp.net.0.proj.weight",
            "transformer_blocks.0.attn.add_k_proj.weight",
            "txt_in.weight",
            "img_in.weight",
        ),
    ),
    # Edit 2511: detection reads the zero-timestep reference method off a marker buffer
    "qwen_image_2511": Spec(
        _QWEN,
        dict(_QWEN_TINY, default_ref_method="index_timestep_zero"),
        "qwen_image.comfyui",
        "QwenImage",
        "QwenImage",
        False,
        (
            "transformer_blocks.2.txt_mod.1.weight",
            "time_text_embed.timestep_embedder.linear_1.weight",
        ),
    ),
    "flux2": Spec(
        _FLUX,
        _FLUX2_TINY,
        "flux2.comfyui",
        "Flux2",
        "Flux2",
        True,
        (
            "single_blocks.2.linear1.weight",
            "double_blocks.0.img_attn.qkv.weight",
            "txt_in.weight",
            "double_stream_modulation_img.lin.weight",
        ),
    ),
    # Flux's own record: same class, same lists (see the test's proof)
    "longcat_image": Spec(
        _FLUX,
        _LONGCAT_TINY,
        "flux.comfyui",
        "LongCatImage",
        "LongCatImage",
        True,
        (
            "single_blocks.2.linear1.weight",
            "double_blocks.0.txt_mlp.0.weight",
            "txt_in.weight",
            "final_layer.linear.weight",
        ),
    ),
    # below 3,840 wide core's supported-model match is Lumina2's; its get_model is ZImage's
    "z_image": Spec(
        _NEXTDIT, _ZIMAGE_TINY, "z_image.comfyui", "Lumina2", "ZImage", False, _ZIMAGE_LORA
    ),
    "z_image_omni": Spec(
        _NEXTDIT,
        dict(_ZIMAGE_TINY, siglip_feat_dim=24),
        "z_image_omni.comfyui",
        "Lumina2",
        "ZImage",
        False,
        _ZIMAGE_LORA + ("siglip_refiner.1.attention.qkv.weight", "siglip_embedder.1.weight"),
    ),
    "z_image_pixel": Spec(
        _PIXEL,
        _PIXEL_TINY,
        "z_image.comfyui",
        "ZImagePixelSpace",
        "ZImagePixelSpace",
        False,
        _ZIMAGE_LORA[:3] + ("dec_net.res_blocks.1.mlp.0.weight",),
    ),
}


def has_class(name: str) -> bool:
    """Whether this core has ``name``'s family and its class takes the tiny config."""
    spec = SPECS[name]
    return _fits(spec.dotted, spec.config, spec.needs)


def has_real(variant: str) -> bool:
    """Whether this core has ``variant``'s family and its class takes the released config."""
    dotted, config, _, needs = REAL[variant]
    return _fits(dotted, config, needs)


def _fits(dotted: str, config: dict, needs: str) -> bool:
    import comfy.supported_models

    module, _, cls_name = dotted.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), cls_name, None)
    except ImportError:
        return False
    if cls is None or not hasattr(comfy.supported_models, needs):
        return False
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return True
    return all(key in params for key in config)


def state_dict_for(
    name: str, seed: int = 0, prefix: str = "", dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A random state dict of ``name`` in ComfyUI's key layout (``prefix`` before each key)."""
    return comfy_state_dict(SPECS[name].dotted, SPECS[name].config, seed, prefix, dtype)


@contextlib.contextmanager
def detection(name: str) -> Iterator[list[str]]:
    """Core's detection, with the dims it hard-codes replaced by ``name``'s tiny ones.

    Yields the families core's own detection found (it must still name this one from the
    keys: "lumina2" for every Z-Image, whose subtypes it tells apart only at 3,840 wide).
    Detectable specs run with detection untouched.
    """
    import comfy.model_detection as detect_module

    spec = SPECS[name]
    found: list[str] = []
    if spec.detectable:
        yield found
        return
    real = detect_module.detect_unet_config
    family = "lumina2" if spec.dotted in (_NEXTDIT, _PIXEL) else spec.config["image_model"]

    def detect(*args: Any, **kwargs: Any) -> dict | None:
        config = real(*args, **kwargs)
        if config is None or config.get("image_model") != family:
            return config
        found.append(config["image_model"])
        return {**config, **spec.config}

    detect_module.detect_unet_config = detect
    try:
        yield found
    finally:
        detect_module.detect_unet_config = real


def load_tiny(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``(ModelPatcher, make_inputs)`` for ``name``, loaded by core's own loader."""
    sd = state_dict_for(name, seed, dtype=dtype)
    with detection(name) as found:
        patcher = load_detected(sd, name, dtype)
    if not SPECS[name].detectable and not found:
        raise RuntimeError(f"core's detection did not recognise the {name} keys")
    return patcher, make_inputs_for(name, patcher.model.diffusion_model)


# -- inputs -------------------------------------------------------------------------------

HEIGHT = WIDTH = 8  # latent size: 16 tokens at patch 2, 64 at patch 1
TEXT = 12


def make_inputs_for(name: str, model: torch.nn.Module) -> Callable[[int], dict]:
    """``make_inputs(seed) -> dict`` of kwargs for the diffusion model's forward."""
    if name.startswith("qwen"):
        return _qwen_inputs(model)
    if name == "flux2":
        return _flux2_inputs(model)
    if name == "longcat_image":
        return _longcat_inputs(model)
    return _zimage_inputs(model, omni=name == "z_image_omni", pixel=name == "z_image_pixel")


def _f32(g, shape) -> torch.Tensor:
    return _randn(g, shape, "cpu", torch.float32)


def _qwen_inputs(model):
    channels, text_dim = model.out_channels, model.txt_norm.weight.shape[0]

    def make_inputs(seed: int) -> dict:
        g = _gen(seed)
        mask = torch.ones(1, TEXT, dtype=torch.int64)
        mask[:, -3:] = 0  # padding, as the text encoder's mask marks it
        return {
            "x": _f32(g, (1, channels, 1, HEIGHT, WIDTH)),
            "timestep": _rand(g, (1,), "cpu", 0.2, 0.9),
            "context": _f32(g, (1, TEXT, text_dim)),
            "attention_mask": mask,
            # two edit inputs of different sizes (the model's default method places them)
            "ref_latents": [
                _f32(g, (1, channels, 1, HEIGHT, WIDTH)),
                _f32(g, (1, channels, 1, 4, 6)),
            ],
        }

    return make_inputs


def _flux2_inputs(model):
    p = model.params

    def make_inputs(seed: int) -> dict:
        g = _gen(seed)
        return {
            "x": _f32(g, (1, p.in_channels, HEIGHT, WIDTH)),
            "timestep": _rand(g, (1,), "cpu", 0.2, 0.9),
            "context": _f32(g, (1, TEXT, p.context_in_dim)),
            "guidance": _rand(g, (1,), "cpu", 1.0, 5.0),
            # two references at timestep zero: the modulation batch doubles and each block
            # applies it by token ranges
            "ref_latents": [
                _f32(g, (1, p.in_channels, HEIGHT, WIDTH)),
                _f32(g, (1, p.in_channels, 4, 6)),
            ],
            "ref_latents_method": "index_timestep_zero",
        }

    return make_inputs


def _longcat_inputs(model):
    p = model.params

    def make_inputs(seed: int) -> dict:
        g = _gen(seed)
        return {
            "x": _f32(g, (1, p.in_channels, HEIGHT, WIDTH)),
            "timestep": _rand(g, (1,), "cpu", 0.2, 0.9),
            "context": _f32(g, (1, TEXT, p.context_in_dim)),
            # as model_base.LongCatImage._apply_model shifts the image positions past the text
            "transformer_options": {
                "rope_options": {"shift_t": 1.0, "shift_y": float(TEXT), "shift_x": float(TEXT)}
            },
        }

    return make_inputs


def _zimage_inputs(model, omni: bool, pixel: bool):
    channels = model.in_channels
    cap_dim = model.cap_embedder[1].in_features
    size = 2 * HEIGHT if pixel else HEIGHT  # pixels: 8x8 patches of 2

    def make_inputs(seed: int) -> dict:
        g = _gen(seed)
        inputs = {
            "x": _f32(g, (1, channels, size, size)),
            "timesteps": _rand(g, (1,), "cpu", 0.2, 0.9),
            "context": _f32(g, (1, TEXT, cap_dim)),
            "num_tokens": TEXT,
            "transformer_options": {},
        }
        if omni:  # one reference image with its caption and SigLIP features
            siglip_dim = model.siglip_embedder[1].in_features
            inputs["ref_latents"] = [_f32(g, (1, channels, HEIGHT, WIDTH))]
            inputs["ref_contexts"] = [_f32(g, (1, 5, cap_dim))]
            inputs["siglip_feats"] = [_f32(g, (1, 2, 3, siglip_dim))]
        return inputs

    return make_inputs


# -- running ------------------------------------------------------------------------------


def call(patcher, inputs: dict) -> torch.Tensor:
    """One forward of the loaded diffusion model, as core's apply_model makes it."""
    dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
    # core casts the conditioning to the model's dtype and keeps the timestep in float32;
    # fresh copies: forwards write into their inputs (NextDiT into transformer_options)
    kwargs = {
        k: fresh(v, patcher.load_device, torch.float32 if k.startswith("timestep") else dtype)
        for k, v in inputs.items()
    }
    with torch.inference_mode():
        out = patcher.model.diffusion_model(**kwargs)
    return out.float().cpu()


def run(comfy, patcher, inputs: dict) -> torch.Tensor:
    """Load ``patcher`` as sampling does, run one forward, and clean up as core does."""
    return run_loaded(comfy, patcher, lambda: call(patcher, inputs))


# -- real sizes ---------------------------------------------------------------------------

# The released configs (as core's detection builds them), for building on the meta device:
# variant name -> (class, kwargs, record, supported_models class of the family).
_FLUX2_REAL = dict(_FLUX2_TINY, mlp_ratio=3.0, guidance_embed=False, axes_dim=[32, 32, 32, 32])
REAL: dict[str, tuple[str, dict, str, str]] = {
    "qwen-image-20b": (_QWEN, dict(image_model="qwen_image"), "qwen_image.comfyui", "QwenImage"),
    "flux2-dev": (
        _FLUX,
        dict(
            _FLUX2_REAL,
            guidance_embed=True,
            context_in_dim=15360,
            hidden_size=6144,
            num_heads=48,
            depth=8,
            depth_single_blocks=48,
        ),
        "flux2.comfyui",
        "Flux2",
    ),
    "flux2-klein-4b": (
        _FLUX,
        dict(
            _FLUX2_REAL,
            context_in_dim=7680,
            hidden_size=3072,
            num_heads=24,
            depth=5,
            depth_single_blocks=20,
        ),
        "flux2.comfyui",
        "Flux2",
    ),
    "flux2-klein-9b": (
        _FLUX,
        dict(
            _FLUX2_REAL,
            context_in_dim=12288,
            hidden_size=4096,
            num_heads=32,
            depth=8,
            depth_single_blocks=24,
        ),
        "flux2.comfyui",
        "Flux2",
    ),
    # 6B: 10 double and 20 single blocks of Flux's 3,072-wide kind
    "longcat-image-6b": (
        _FLUX,
        dict(_LONGCAT_TINY, hidden_size=3072, num_heads=24, depth=10, depth_single_blocks=20),
        "flux.comfyui",
        "LongCatImage",
    ),
    "z-image-6b": (
        _NEXTDIT,
        dict(
            _ZIMAGE_TINY,
            dim=3840,
            n_layers=30,
            n_heads=30,
            n_kv_heads=30,
            multiple_of=256,
            cap_feat_dim=2560,
            axes_dims=[32, 48, 48],
        ),
        "z_image.comfyui",
        "ZImage",
    ),
    "lumina2-2b": (
        _NEXTDIT,
        dict(
            image_model="lumina2",
            patch_size=2,
            in_channels=16,
            dim=2304,
            n_layers=26,
            n_heads=24,
            n_kv_heads=8,
            ffn_dim_multiplier=4.0,
            qk_norm=True,
            cap_feat_dim=2304,
            axes_dims=[32, 32, 32],
            axes_lens=[300, 512, 512],
            rope_theta=10000.0,
        ),
        "z_image.comfyui",
        "Lumina2",
    ),
}


def build_real(variant: str) -> torch.nn.Module:
    """``variant``'s released config, in bf16 on the meta device (no memory)."""
    dotted, config, _, _ = REAL[variant]
    return build_meta(dotted, config)


__all__ = [
    "REAL",
    "SPECS",
    "Spec",
    "build_real",
    "call",
    "detection",
    "has_class",
    "has_real",
    "load_tiny",
    "make_inputs_for",
    "run",
    "state_dict_for",
]
