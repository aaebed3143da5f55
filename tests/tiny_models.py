"""Tiny instances of the real model classes of every supported architecture, for tests.

Every builder returns ``(model, make_inputs)``:

* ``model`` is the real ``nn.Module`` class (diffusers or ComfyUI core) with small dims
  (hidden size 32, 2-4 blocks per block list, 2 heads), float32 on CPU, in eval mode. Every
  parameter is drawn from a generator seeded with ``seed`` (default 0): nothing is left
  zero-initialised (diffusers zero-inits some gates and ComfyUI's ``disable_weight_init`` ops
  leave ``torch.empty`` memory), so every block changes the output and a block that ran with
  the wrong weights shows up in the result.
* ``make_inputs(seed, device="cpu", dtype=torch.float32) -> dict`` returns fresh random kwargs
  for ``model(**kwargs)``. Feature tensors get ``dtype``; timesteps, guidance and masks stay
  float32 / integer as the pipelines pass them (Cosmos' attention mask takes ``dtype``: CUDA
  attention wants it in the query's dtype). Sizes are small (3 latent frames of 8x8 for
  video, 8x8 for Flux), so one forward takes milliseconds on CPU.

``run(model, inputs)`` calls the model under ``torch.no_grad()`` and returns the output
tensor (diffusers' ``Transformer2DModelOutput`` / tuples are unwrapped). On a busy 2-core
machine these tiny forwards are ~20x faster with ``torch.set_num_threads(1)`` (OpenMP hand-off
dominates matmuls this small); the smoke test sets that for its module.

ComfyUI builders (``comfy/...``) import ``comfy`` lazily from the checkout named by the
``COMFYUI_PATH`` environment variable; this module itself imports without ComfyUI. When no
CUDA device is present ``comfy.cli_args.args.cpu`` is set before ``comfy.model_management`` is
imported. ``comfy_state_dict_for(name)`` returns a random state dict in ComfyUI's checkpoint
key layout that ``comfy.sd.load_diffusion_model_state_dict`` detects as that architecture (where
detection allows a small model, see ``COMFY_DETECTABLE``), and ``comfy_load_tiny(name)`` loads
one through core's loader into a ``ModelPatcher``.

Environment note: if ``import torchvision`` is broken (a torchvision wheel built for another
torch, as in this workplace's global environment), diffusers cannot import its transformer
models, because ``transformers`` imports torchvision when it looks installed. In that case this
module hides torchvision (``sys.modules["torchvision"] = None``) before importing diffusers,
and gives diffusers' Cosmos module the nearest-neighbour ``resize`` it needs for the padding
mask. Neither happens where torchvision imports (e.g. /work/venv-comfy).
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Any, Callable

import torch

Builder = Callable[..., tuple[torch.nn.Module, Callable[..., dict]]]

# Small shared sizes: 3 latent frames of 8x8 -> 3 * 4 * 4 = 48 tokens after the (1, 2, 2) patch.
FRAMES, HEIGHT, WIDTH = 3, 8, 8
TEXT_LEN = 12


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(seed))


def _randn(g, shape, device, dtype, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


def _rand(g, shape, device, low=0.0, high=1.0) -> torch.Tensor:
    t = torch.rand(shape, generator=g) * (high - low) + low
    return t.to(device=device, dtype=torch.float32)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with seeded random values (in named_parameters order).

    Matrices get N(0, 1/fan_in); 1-d weights/scales (norms) get 1 + N(0, 0.1); other 1-d
    tensors (biases) get N(0, 0.1). Buffers are left alone.
    """
    g = _gen(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            fan_in = max(1, p.numel() // p.shape[0])
            t = torch.randn(p.shape, generator=g) * fan_in**-0.5
        elif name.endswith("weight") or name.endswith("scale"):
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            t = 0.1 * torch.randn(p.shape, generator=g)
        p.copy_(t.to(p.dtype))
    return model


def _finish(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    randomize_(model, seed)
    return model.eval()


def run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Call ``model(**inputs)`` without autograd and return the output tensor."""
    with torch.no_grad():
        out = model(**inputs)
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


# --------------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------------


def _torchvision_works() -> bool:
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"] is not None
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # makes find_spec() report it missing
        return False
    return True


def _nearest_resize(img: torch.Tensor, size, interpolation=None) -> torch.Tensor:
    if list(img.shape[-2:]) == list(size):
        return img
    shape = img.shape
    flat = img.reshape(-1, 1, *shape[-2:]).float()
    out = torch.nn.functional.interpolate(flat, size=list(size), mode="nearest")
    return out.reshape(*shape[:-2], *size).to(img.dtype)


def _diffusers():
    """Import diffusers, working around a broken torchvision (see module docstring)."""
    if not _torchvision_works():
        import diffusers.models.transformers.transformer_cosmos as cosmos

        if not hasattr(cosmos, "transforms"):
            cosmos.transforms = types.SimpleNamespace(
                functional=types.SimpleNamespace(resize=_nearest_resize),
                InterpolationMode=types.SimpleNamespace(NEAREST="nearest"),
            )
    import diffusers

    return diffusers


def _build_diffusers(cls_name: str, config: dict, seed: int) -> torch.nn.Module:
    cls = getattr(_diffusers(), cls_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**config)
    return _finish(model, seed)


def _wan_video_inputs(g, device, dtype, channels, text_dim, text_len=TEXT_LEN):
    return {
        "hidden_states": _randn(g, (1, channels, FRAMES, HEIGHT, WIDTH), device, dtype),
        "timestep": _rand(g, (1,), device, 0.0, 1000.0),
        "encoder_hidden_states": _randn(g, (1, text_len, text_dim), device, dtype),
    }


_WAN_TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=256,
    ffn_dim=64,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=32,
)


def diffusers_wan_t2v(seed: int = 0):
    """Wan 2.1 t2v (also 2.2 A14B t2v): ``WanTransformer3DModel``, no image embedder."""
    config = dict(_WAN_TINY)
    model = _build_diffusers("WanTransformer3DModel", config, seed)

    def make_inputs(seed: int, device="cpu", dtype=torch.float32) -> dict:
        return _wan_video_inputs(_gen(seed), device, dtype, config["in_channels"], 16)

    return model, make_inputs


def diffusers_wan_i2v(seed: int = 0):
    """Wan 2.1 i2v/FLF: image_dim set -> ``condition_embedder.image_embedder`` + add_k/v_proj.

    in_channels = latent + image latent + mask (real 16 + 16 + 4 = 36; tiny 4 + 4 + 4). The
    attention processor takes the *last 512* context tokens as text, so the text must be
    exactly 512 tokens long; image tokens (real 257 CLIP tokens) come first.
    """
    config = dict(_WAN_TINY, in_channels=12, image_dim=16, added_kv_proj_dim=32)
    model = _build_diffusers("WanTransformer3DModel", config, seed)

    def make_inputs(seed: int, device="cpu", dtype=torch.float32) -> dict:
        g = _gen(seed)
        inputs = _wan_video_inputs(g, device, dtype, config["in_channels"], 16, text_len=512)
        inputs["encoder_hidden_states_image"] = _randn(
            g, (1, 5, config["image_dim"]), device, dtype
        )
        return inputs

    return model, make_inputs


def diffusers_wan22_ti2v(seed: int = 0):
    """Wan 2.2 TI2V 5B style: in/out channels 48 (Wan 2.2 VAE) and per-token timesteps.

    Structurally the same class and block type as Wan 2.1; what differs is in/out_channels=48,
    the dims (3072 hidden, 24 heads, 30 blocks) and the pipeline's ``expand_timesteps`` which
    feeds a ``(batch, seq_len)`` timestep (one per latent token) instead of ``(batch,)``.
    """
    config = dict(_WAN_TINY, in_channels=48, out_channels=48)
    model = _build_diffusers("WanTransformer3DModel", config, seed)
    seq_len = FRAMES * (HEIGHT // 2) * (WIDTH // 2)

    def make_inputs(seed: int, device="cpu", dtype=torch.float32) -> dict:
        g = _gen(seed)
        inputs = _wan_video_inputs(g, device, dtype, 48, 16)
        inputs["timestep"] = _rand(g, (1, seq_len), device, 0.0, 1000.0)
        return inputs

    return model, make_inputs


def diffusers_wan_vace(seed: int = 0):
    """Wan VACE: ``WanVACETransformer3DModel`` with ``vace_layers`` -> ``vace_blocks``."""
    config = dict(_WAN_TINY, vace_layers=[0, 2], vace_in_channels=16)
    model = _build_diffusers("WanVACETransformer3DModel", config, seed)

    def make_inputs(seed: int, device="cpu", dtype=torch.float32) -> dict:
        g = _gen(seed)
        inputs = _wan_video_inputs(g, device, dtype, config["in_channels"], 16)
        inputs["control_hidden_states"] = _randn(g, (1, 16, FRAMES, HEIGHT, WIDTH), device, dtype)
        inputs["control_hidden_states_scale"] = _rand(g, (2,), device, 0.5, 1.5).to(dtype)
        return inputs

    return model, make_inputs


def diffusers_hunyuan_video(seed: int = 0):
    """HunyuanVideo t2v: ``transformer_blocks``, ``single_transformer_blocks``, token refiner."""
    config = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_single_layers=4,
        num_refiner_layers=2,
        mlp_ratio=4.0,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6),
        image_condition_type=None,
    )
    model = _build_diffusers("HunyuanVideoTransformer3DModel", config, seed)

    def make_inputs(seed: int, device="cpu", dtype=torch.float32) -> dict:
        g = _gen(seed)
        mask = torch.ones(1, TEXT_LEN, dtype=torch.int64)
        mask[:, -3:] = 0
        return {
            "hidden_states": _randn(g, (1, 4, FRAMES, HEIGHT, WIDTH), device, dtype),
            "timestep": _rand(g, (1,), device, 0.0, 1000.0),
            "encoder_hidden_states": _randn(g, (1, TEXT_LEN, 16), device, dtype),
            "encoder_attention_mask": mask.to(device),
            "pooled_projections": _randn(g, (1, 8), device, dtype),
            "guidance": _rand(g, (1,), device, 1000.0, 8000.0),
        }

    return model, make_inputs


def diffusers_flux(seed: int = 0):
    """Flux dev style (guidance embed): ``transformer_blocks`` + ``single_transformer_blocks``."""
    config = dict(
        patch_size=1,
        in_channels=16,
        out_channels=None,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    model = _build_diffusers("FluxTransformer2DModel", config, seed)

    def make_inputs(seed: int, device="cpu", dtype=torch.float32) -> dict:
        g = _gen(seed)
        h, w = HEIGHT // 2, WIDTH // 2  # packed 2x2 latent patches
        img_ids = torch.zeros(h, w, 3)
        img_ids[..., 1] = torch.arange(h)[:, None]
        img_ids[..., 2] = torch.arange(w)[None, :]
        return {
            "hidden_states": _randn(g, (1, h * w, 16), device, dtype),
            "encoder_hidden_states": _randn(g, (1, 8, 32), device, dtype),
            "pooled_projections": _randn(g, (1, 32), device, dtype),
            "timestep": _rand(g, (1,), device),
            "img_ids": img_ids.reshape(h * w, 3).to(device),
            "txt_ids": torch.zeros(8, 3, device=device),
            "guidance": _rand(g, (1,), device, 1.0, 5.0),
        }

    return model, make_inputs


_COSMOS_TINY = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=3,
    mlp_ratio=2.0,
    text_embed_dim=16,
    adaln_lora_dim=8,
    max_size=(4, 32, 32),
    patch_size=(1, 2, 2),
    concat_padding_mask=True,
)


def _cosmos_inputs(g, device, dtype, frames=2):
    return {
        "hidden_states": _randn(g, (1, 4, frames, HEIGHT, WIDTH), device, dtype),
        "timestep": _rand(g, (1,), device),
        "encoder_hidden_states": _randn(g, (1, TEXT_LEN, 16), device, dtype),
        # in the features' dtype: CUDA attention wants its mask in the query's dtype
        "attention_mask": torch.ones(1, TEXT_LEN, device=device, dtype=dtype),
        "fps": 24,
        "padding_mask": torch.zeros(1, 1, HEIGHT, WIDTH, device=device, dtype=dtype),
    }


def diffusers_cosmos_predict1(seed: int = 0):
    """Cosmos 1.0 (predict1): learnable extra pos-emb (``learnable_pos_embed``), rope (2,1,1)."""
    config = dict(_COSMOS_TINY, rope_scale=(2.0, 1.0, 1.0), extra_pos_embed_type="learnable")
    model = _build_diffusers("CosmosTransformer3DModel", config, seed)

    def make_inputs(seed: int, device="cpu", dtype=torch.float32) -> dict:
        return _cosmos_inputs(_gen(seed), device, dtype)

    return model, make_inputs


def diffusers_cosmos_predict2(seed: int = 0):
    """Cosmos Predict2 (2B t2i style): no extra pos-emb (``extra_pos_embed_type=None``),
    rope_scale (1, 4, 4). Same block class as predict1. (Predict2.5 adds
    ``use_crossattn_projection`` -> ``crossattn_proj``.)"""
    config = dict(_COSMOS_TINY, rope_scale=(1.0, 4.0, 4.0), extra_pos_embed_type=None)
    model = _build_diffusers("CosmosTransformer3DModel", config, seed)

    def make_inputs(seed: int, device="cpu", dtype=torch.float32) -> dict:
        return _cosmos_inputs(_gen(seed), device, dtype)

    return model, make_inputs


DIFFUSERS_ARCHITECTURES: dict[str, Builder] = {
    "diffusers/wan_t2v": diffusers_wan_t2v,
    "diffusers/wan_i2v": diffusers_wan_i2v,
    "diffusers/wan22_ti2v": diffusers_wan22_ti2v,
    "diffusers/wan_vace": diffusers_wan_vace,
    "diffusers/hunyuan_video": diffusers_hunyuan_video,
    "diffusers/flux": diffusers_flux,
    "diffusers/cosmos_predict1": diffusers_cosmos_predict1,
    "diffusers/cosmos_predict2": diffusers_cosmos_predict2,
}


# --------------------------------------------------------------------------------------------
# ComfyUI
# --------------------------------------------------------------------------------------------


class ComfyUnavailable(RuntimeError):
    """COMFYUI_PATH is unset or ComfyUI's core does not import."""


def import_comfy():
    """Import ComfyUI core from ``$COMFYUI_PATH`` (CPU mode when there is no CUDA device)."""
    if "comfy.model_management" in sys.modules and "comfy.sd" in sys.modules:
        return sys.modules["comfy"]
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        raise ComfyUnavailable("COMFYUI_PATH is not set")
    path = os.path.abspath(path)
    if not os.path.isdir(os.path.join(path, "comfy")):
        raise ComfyUnavailable(f"COMFYUI_PATH={path} has no comfy/ package")
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        import comfy.cli_args

        if not torch.cuda.is_available():
            comfy.cli_args.args.cpu = True
        import comfy.model_management  # noqa: F401
        import comfy.ops  # noqa: F401
        import comfy.sd  # noqa: F401
        import comfy.ldm.wan.model  # noqa: F401
        import comfy.ldm.hunyuan_video.model  # noqa: F401
        import comfy.ldm.flux.model  # noqa: F401
        import comfy.ldm.cosmos.model  # noqa: F401
        import comfy.ldm.cosmos.predict2  # noqa: F401
    except Exception as e:  # ImportError, or torchvision's RuntimeError on a bad build
        raise ComfyUnavailable(f"ComfyUI core failed to import from {path}: {e!r}") from e
    return sys.modules["comfy"]


def _comfy_class(dotted: str):
    import_comfy()
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


# Fields newer cores added to their params dataclasses (HunyuanVideoParams, FluxParams in
# v0.33), with the values that keep the older architecture: given only where a core has them.
_NEWER_CORE_FIELDS = {
    "use_cond_type_embedding": False,
    "vision_in_dim": None,
    "meanflow_sum": False,
    "txt_ids_dims": [],
}


def _with_newer_fields(cls, config: dict) -> dict:
    import dataclasses

    module = importlib.import_module(cls.__module__)
    fields = {
        field.name
        for value in vars(module).values()
        if dataclasses.is_dataclass(value) and isinstance(value, type)
        for field in dataclasses.fields(value)
    }
    extra = {k: v for k, v in _NEWER_CORE_FIELDS.items() if k in fields and k not in config}
    return {**config, **extra}


def _build_comfy(dotted: str, config: dict, seed: int) -> torch.nn.Module:
    comfy = import_comfy()
    cls = _comfy_class(dotted)
    config = _with_newer_fields(cls, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(
            **config,
            operations=comfy.ops.disable_weight_init,
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
    return _finish(model, seed)


# Helpers the per-family tiny modules (tiny_ltx_hv15_k5, tiny_qwen_flux2_zimage,
# tiny_minimax_wan22) share with the builders below.


def keyed(
    sd: dict[str, torch.Tensor], prefix: str = "", dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """``sd`` as a checkpoint holds it: ``prefix`` before each key, contiguous ``dtype``."""
    return {prefix + k: v.to(dtype).contiguous() for k, v in sd.items()}


def comfy_state_dict(
    dotted: str, config: dict, seed: int = 0, prefix: str = "", dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A random state dict of core's ``dotted`` class built with ``config`` (see ``keyed``)."""
    return keyed(_build_comfy(dotted, config, seed).state_dict(), prefix, dtype)


def has_comfy_class(dotted: str, model_config: str) -> bool:
    """Whether this core has the class ``dotted`` and the ``supported_models`` config
    ``model_config`` (older cores lack newer families, or reuse a class for them)."""
    import comfy.supported_models

    module, _, cls = dotted.rpartition(".")
    try:
        found = hasattr(importlib.import_module(module), cls)
    except ImportError:
        return False
    return found and hasattr(comfy.supported_models, model_config)


def load_detected(sd: dict, name: str, dtype: torch.dtype = torch.float32, **kwargs):
    """A ``ModelPatcher`` from core's ``load_diffusion_model_state_dict``, which must detect
    ``sd`` (``kwargs`` go to the loader, e.g. ``metadata``)."""
    comfy = import_comfy()
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype}, **kwargs)
    if patcher is None:
        raise RuntimeError(f"ComfyUI did not detect the {name} state dict")
    return patcher


def load_undetected(config_name: str, unet_config: dict, sd: dict, dtype: torch.dtype):
    """A ``ModelPatcher`` built by the steps core takes after detection, for a config its
    detection cannot describe: the ``supported_models`` class ``config_name`` with
    ``unet_config``, ``get_model``, ``load_model_weights``."""
    import_comfy()
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    model_config = getattr(comfy.supported_models, config_name)(unet_config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "")
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def build_meta(dotted: str, config: dict) -> torch.nn.Module:
    """Core's ``dotted`` class with ``config`` (a released size), in bf16 on the meta device
    (no memory)."""
    comfy = import_comfy()
    return _comfy_class(dotted)(
        **config,
        operations=comfy.ops.disable_weight_init,
        device=torch.device("meta"),
        dtype=torch.bfloat16,
    )


def fresh(value: Any, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
    """A copy of ``value`` (tensors in lists, tuples and dicts), on ``device`` and with floats
    in ``dtype`` where given: forwards write into their inputs (Kandinsky 5's first frame,
    NextDiT's ``transformer_options``)."""
    if torch.is_tensor(value):
        cast = dtype if torch.is_floating_point(value) else None
        return value.to(device=device, dtype=cast).clone()
    if isinstance(value, (list, tuple)):
        return type(value)(fresh(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: fresh(v, device, dtype) for k, v in value.items()}
    return value


def core_inputs(inputs: dict, device: Any = None, dtype: torch.dtype | None = None) -> dict:
    """Fresh copies of a forward's keyword inputs as core's ``apply_model`` passes them: on
    ``device``, floats in the model's compute ``dtype``, but the timestep in float32 and what
    a dict carries as it is (on a GPU core may compute in fp16 or bf16)."""

    def cast(key: str, value: Any) -> torch.dtype | None:
        if key.startswith("timestep"):
            return torch.float32
        return None if isinstance(value, dict) else dtype

    return {k: fresh(v, device, cast(k, v)) for k, v in inputs.items()}


def forward_streams(model: torch.nn.Module, kwargs: dict, **text: Any) -> torch.Tensor:
    """One forward of ``model(**kwargs)``; a ``raw_context`` goes through the model's
    ``preprocess_text_embeds(raw, **text)`` first, as core's ``extra_conds`` runs it. Outputs
    of several streams (audio and video) are flattened into one tensor."""
    raw = kwargs.pop("raw_context", None)
    with torch.inference_mode():
        if raw is not None:
            kwargs["context"] = model.preprocess_text_embeds(raw, **text)
        out = model(**kwargs)
    parts = out if isinstance(out, (list, tuple)) else [out]
    return torch.cat([p.float().flatten().cpu() for p in parts])


def run_loaded(comfy, patcher, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Load ``patcher`` as sampling does, run ``forward()``, and clean up as core does."""
    comfy.model_management.load_models_gpu([patcher])
    try:
        return forward()
    finally:
        patcher.cleanup()


# ComfyUI class and constructor kwargs per architecture. "tiny" is what the builders use;
# "detectable" is the smallest config that comfy/model_detection.py maps back to itself (it
# hard-codes some dims, e.g. Wan/Hunyuan heads = hidden // 128, Wan text_dim 4096, the CLIP
# dim 1280, Hunyuan vec_in_dim 768, Cosmos predict2 block count 10 unless hidden is 2048/5120).
_WAN = "comfy.ldm.wan.model.WanModel"
_VACE = "comfy.ldm.wan.model.VaceWanModel"
_HUNYUAN = "comfy.ldm.hunyuan_video.model.HunyuanVideo"
_FLUX = "comfy.ldm.flux.model.Flux"
_COSMOS1 = "comfy.ldm.cosmos.model.GeneralDIT"
_COSMOS2 = "comfy.ldm.cosmos.predict2.MiniTrainDIT"

_COMFY_WAN_TINY = dict(
    model_type="t2v",
    patch_size=(1, 2, 2),
    text_len=512,
    in_dim=4,
    dim=32,
    ffn_dim=80,  # 2.5x dim, as Wan (2.7x): its FFN, not its cross-attention, is the largest unit
    freq_dim=256,
    text_dim=16,
    out_dim=4,
    num_heads=2,
    num_layers=4,
    window_size=(-1, -1),
    qk_norm=True,
    cross_attn_norm=True,
    eps=1e-6,
)
_COMFY_WAN_DETECTABLE = dict(
    _COMFY_WAN_TINY, in_dim=16, dim=128, ffn_dim=320, text_dim=4096, out_dim=16, num_heads=1
)
_COMFY_HUNYUAN_TINY = dict(
    image_model="hunyuan_video",
    in_channels=4,
    out_channels=4,
    vec_in_dim=8,
    context_in_dim=16,
    hidden_size=32,
    mlp_ratio=4.0,
    num_heads=2,
    depth=2,
    depth_single_blocks=4,
    axes_dim=[4, 6, 6],
    theta=256,
    patch_size=[1, 2, 2],
    qkv_bias=True,
    guidance_embed=True,
    byt5=False,
    meanflow=False,
)
_COMFY_FLUX_TINY = dict(
    image_model="flux",
    in_channels=4,
    out_channels=4,
    vec_in_dim=32,
    context_in_dim=32,
    hidden_size=32,
    mlp_ratio=4.0,
    num_heads=2,
    depth=2,
    depth_single_blocks=4,
    axes_dim=[4, 6, 6],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    guidance_embed=True,
)
_COMFY_COSMOS1_TINY = dict(
    image_model="cosmos",
    max_img_h=32,
    max_img_w=32,
    max_frames=8,
    in_channels=4,
    out_channels=4,
    patch_spatial=2,
    patch_temporal=1,
    concat_padding_mask=True,
    block_config="FA-CA-MLP",
    model_channels=32,
    num_blocks=3,
    num_heads=2,
    mlp_ratio=4.0,
    block_x_format="THWBD",
    crossattn_emb_channels=16,
    pos_emb_cls="rope3d",
    pos_emb_learnable=False,
    pos_emb_interpolation="crop",
    affline_emb_norm=True,
    use_adaln_lora=True,
    adaln_lora_dim=8,
    rope_h_extrapolation_ratio=1.0,
    rope_w_extrapolation_ratio=1.0,
    rope_t_extrapolation_ratio=2.0,
    extra_per_block_abs_pos_emb=True,
    extra_per_block_abs_pos_emb_type="learnable",
)
_COMFY_COSMOS2_TINY = dict(
    image_model="cosmos_predict2",
    max_img_h=32,
    max_img_w=32,
    max_frames=8,
    in_channels=4,
    out_channels=4,
    patch_spatial=2,
    patch_temporal=1,
    concat_padding_mask=True,
    model_channels=32,
    num_blocks=3,
    num_heads=2,
    mlp_ratio=4.0,
    crossattn_emb_channels=16,
    pos_emb_cls="rope3d",
    pos_emb_learnable=True,
    pos_emb_interpolation="crop",
    min_fps=1,
    max_fps=30,
    use_adaln_lora=True,
    adaln_lora_dim=8,
    rope_h_extrapolation_ratio=4.0,
    rope_w_extrapolation_ratio=4.0,
    rope_t_extrapolation_ratio=1.0,
    extra_per_block_abs_pos_emb=False,
    rope_enable_fps_modulation=False,
)

# name -> (class, tiny kwargs, detectable kwargs or None, ComfyUI supported_models class name)
_COMFY_SPECS: dict[str, tuple[str, dict, dict | None, str]] = {
    "wan_t2v": (_WAN, _COMFY_WAN_TINY, _COMFY_WAN_DETECTABLE, "WAN21_T2V"),
    "wan_i2v": (
        _WAN,
        dict(_COMFY_WAN_TINY, model_type="i2v", in_dim=12),
        dict(_COMFY_WAN_DETECTABLE, model_type="i2v", in_dim=36),
        "WAN21_I2V",
    ),
    "wan22_ti2v": (
        _WAN,
        dict(_COMFY_WAN_TINY, in_dim=48, out_dim=48),
        dict(_COMFY_WAN_DETECTABLE, in_dim=48, out_dim=48),
        "WAN22_T2V",
    ),
    "wan_vace": (
        _VACE,
        dict(_COMFY_WAN_TINY, model_type="vace", vace_layers=2, vace_in_dim=16),
        dict(_COMFY_WAN_DETECTABLE, model_type="vace", vace_layers=2, vace_in_dim=96),
        "WAN21_Vace",
    ),
    "hunyuan_video": (
        _HUNYUAN,
        _COMFY_HUNYUAN_TINY,
        dict(
            _COMFY_HUNYUAN_TINY,
            in_channels=16,
            out_channels=16,
            vec_in_dim=768,
            context_in_dim=32,
            hidden_size=128,
            num_heads=1,
            depth_single_blocks=2,
            axes_dim=[16, 56, 56],
        ),
        "HunyuanVideo",
    ),
    # Flux: detection hard-codes hidden 3072 / 24 heads / context 4096 -> no tiny detectable dict.
    "flux": (_FLUX, _COMFY_FLUX_TINY, None, "Flux"),
    # Cosmos predict1: detection hard-codes 28 or 36 blocks of 4096 / 5120 -> none either.
    "cosmos_predict1": (_COSMOS1, _COMFY_COSMOS1_TINY, None, "CosmosT2V"),
    "cosmos_predict2": (
        _COSMOS2,
        _COMFY_COSMOS2_TINY,
        # hidden not 2048/5120 -> detection leaves MiniTrainDIT's defaults: 10 blocks, 16 heads;
        # rope needs head_dim >= 12, so 16 * 12 = 192; cross-attn dim and adaLN-LoRA dim fixed.
        dict(
            _COMFY_COSMOS2_TINY,
            max_img_h=240,
            max_img_w=240,
            max_frames=128,
            in_channels=16,
            out_channels=16,
            model_channels=192,
            num_blocks=10,
            num_heads=16,
            crossattn_emb_channels=1024,
            adaln_lora_dim=256,
        ),
        "CosmosT2IPredict2",
    ),
}

COMFY_DETECTABLE = frozenset(k for k, v in _COMFY_SPECS.items() if v[2] is not None)


def _short(name: str) -> str:
    short = name.split("/", 1)[1] if name.startswith("comfy/") else name
    if short not in _COMFY_SPECS:
        raise KeyError(f"unknown ComfyUI architecture {name!r}; known: {sorted(_COMFY_SPECS)}")
    return short


def comfy_make_inputs(model: torch.nn.Module) -> Callable[..., dict]:
    """``make_inputs`` for a ComfyUI diffusion model of any config, read off the model."""
    cls = type(model).__name__
    if cls in ("WanModel", "VaceWanModel"):
        return _comfy_wan_inputs(model)
    if cls == "HunyuanVideo":
        return _comfy_hunyuan_inputs(model)
    if cls == "Flux":
        return _comfy_flux_inputs(model)
    if cls in ("GeneralDIT", "MiniTrainDIT"):
        return _comfy_cosmos_inputs(model)
    raise TypeError(f"no input recipe for {cls}")


def _comfy_wan_inputs(model):
    in_dim, text_dim = model.in_dim, model.text_dim
    image = model.img_emb is not None
    per_frame_t = model.out_dim == 48  # Wan 2.2 5B: ComfyUI's WAN22 feeds (batch, frames)
    vace_in = getattr(model, "vace_in_dim", None)

    def make_inputs(seed: int, device="cpu", dtype=torch.float32) -> dict:
        g = _gen(seed)
        inputs = {
            "x": _randn(g, (1, in_dim, FRAMES, HEIGHT, WIDTH), device, dtype),
            "timestep": _rand(g, (1, FRAMES) if per_frame_t else (1,), device, 0.0, 1000.0),
            "context": _randn(g, (1, TEXT_LEN, text_dim), device, dtype),
        }
        if image:  # CLIP-H penultimate features: 1280 wide (257 tokens in real use)
            inputs["clip_fea"] = _randn(g, (1, 5, 1280), device, dtype)
        if vace_in is not None:  # (batch, n_vace_inputs, channels, frames, h, w)
            inputs["vace_context"] = _randn(
                g, (1, 1, vace_in, FRAMES, HEIGHT, WIDTH), device, dtype
            )
            inputs["vace_strength"] = [float(_rand(g, (1,), "cpu", 0.5, 1.5))]
        return inputs

    return make_inputs


def _comfy_hunyuan_inputs(model):
    p = model.params

    def make_inputs(seed: int, device="cpu", dtype=torch.float32) -> dict:
        g = _gen(seed)
        inputs = {
            "x": _randn(g, (1, p.in_channels, FRAMES, HEIGHT, WIDTH), device, dtype),
            "timestep": _rand(g, (1,), device),
            "context": _randn(g, (1, TEXT_LEN, p.context_in_dim), device, dtype),
            "attention_mask": torch.ones(1, TEXT_LEN, dtype=torch.int64, device=device),
        }
        if p.vec_in_dim is not None:
            inputs["y"] = _randn(g, (1, p.vec_in_dim), device, dtype)
        if p.guidance_embed:
            inputs["guidance"] = _rand(g, (1,), device, 1.0, 8.0)
        return inputs

    return make_inputs


def _comfy_flux_inputs(model):
    p = model.params

    def make_inputs(seed: int, device="cpu", dtype=torch.float32) -> dict:
        g = _gen(seed)
        inputs = {
            "x": _randn(g, (1, p.in_channels, HEIGHT, WIDTH), device, dtype),
            "timestep": _rand(g, (1,), device),
            "context": _randn(g, (1, 8, p.context_in_dim), device, dtype),
            "y": _randn(g, (1, p.vec_in_dim), device, dtype),
        }
        if p.guidance_embed:
            inputs["guidance"] = _rand(g, (1,), device, 1.0, 5.0)
        return inputs

    return make_inputs


def _comfy_cosmos_inputs(model):
    in_channels = model.in_channels
    if type(model).__name__ == "GeneralDIT":
        context_dim = model.blocks["block0"].blocks[1].block.attn.to_k[0].in_features
    else:
        context_dim = model.blocks[0].cross_attn.k_proj.in_features

    def make_inputs(seed: int, device="cpu", dtype=torch.float32) -> dict:
        g = _gen(seed)
        return {
            "x": _randn(g, (1, in_channels, 2, HEIGHT, WIDTH), device, dtype),
            "timesteps": _rand(g, (1,), device),
            "context": _randn(g, (1, TEXT_LEN, context_dim), device, dtype),
            "fps": 24,
        }

    return make_inputs


def _comfy_builder(short: str) -> Builder:
    dotted, tiny, _, _ = _COMFY_SPECS[short]

    def build(seed: int = 0):
        model = _build_comfy(dotted, tiny, seed)
        return model, comfy_make_inputs(model)

    build.__name__ = f"comfy_{short}"
    build.__doc__ = (
        f"ComfyUI {dotted.rsplit('.', 1)[1]} ({short}), tiny config; needs COMFYUI_PATH."
    )
    return build


comfy_wan_t2v = _comfy_builder("wan_t2v")
comfy_wan_i2v = _comfy_builder("wan_i2v")
comfy_wan22_ti2v = _comfy_builder("wan22_ti2v")
comfy_wan_vace = _comfy_builder("wan_vace")
comfy_hunyuan_video = _comfy_builder("hunyuan_video")
comfy_flux = _comfy_builder("flux")
comfy_cosmos_predict1 = _comfy_builder("cosmos_predict1")
comfy_cosmos_predict2 = _comfy_builder("cosmos_predict2")

COMFY_ARCHITECTURES: dict[str, Builder] = {
    f"comfy/{short}": globals()[f"comfy_{short}"] for short in _COMFY_SPECS
}

ARCHITECTURES: dict[str, Builder] = {**DIFFUSERS_ARCHITECTURES, **COMFY_ARCHITECTURES}


def comfy_expected_model_config(name: str) -> str:
    """Name of the ``comfy.supported_models`` class core should pick for this architecture."""
    return _COMFY_SPECS[_short(name)][3]


def comfy_state_dict_for(
    name: str, seed: int = 0, prefix: str = "", dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A random state dict in ComfyUI's checkpoint key layout that core's
    ``comfy.sd.load_diffusion_model_state_dict`` detects as ``name`` (see ``COMFY_DETECTABLE``).

    ``prefix`` is prepended to every key: "" as in split ``diffusion_models/`` files, or
    ``"model.diffusion_model."`` as in full checkpoints (core strips either). Dims are the
    smallest detection accepts, larger than the builders' (e.g. Wan hidden 128, one head).
    Raises ``ValueError`` for architectures detection cannot map to a small model
    (flux, cosmos_predict1); use ``comfy_load_tiny`` for those.
    """
    short = _short(name)
    dotted, _, detectable, _ = _COMFY_SPECS[short]
    if detectable is None:
        raise ValueError(
            f"{short}: comfy/model_detection.py hard-codes this architecture's dims "
            "(Flux: hidden 3072, 24 heads, context 4096; Cosmos predict1: 28/36 blocks of "
            "4096/5120), so no small state dict is detected as it; use comfy_load_tiny()"
        )
    return comfy_state_dict(dotted, detectable, seed, prefix, dtype)


def comfy_load_tiny(
    name: str, seed: int = 0, state_dict: dict | None = None, dtype: torch.dtype = torch.float32
):
    """Load a tiny model through ComfyUI core; returns ``(ModelPatcher, make_inputs)``.

    Detectable architectures go through ``comfy.sd.load_diffusion_model_state_dict`` with
    ``comfy_state_dict_for(name, seed)`` (or ``state_dict``). Flux and Cosmos predict1, whose
    detection cannot describe a small model, go through the same steps core takes after
    detection: the ``supported_models`` config class with the tiny builder's config,
    ``get_model``, ``load_model_weights``, ``ModelPatcher``. ``make_inputs`` is for
    ``patcher.model.diffusion_model(**inputs)``.
    """
    import_comfy()
    short = _short(name)
    dotted, tiny, detectable, config_name = _COMFY_SPECS[short]
    if detectable is not None:
        sd = dict(state_dict if state_dict is not None else comfy_state_dict_for(short, seed))
        patcher = load_detected(sd, short, dtype)
    else:
        if state_dict is None:
            state_dict = _build_comfy(dotted, tiny, seed).state_dict()
        unet_config = _with_newer_fields(_comfy_class(dotted), dict(tiny))
        patcher = load_undetected(config_name, unet_config, dict(state_dict), torch.float32)
    return patcher, comfy_make_inputs(patcher.model.diffusion_model)


__all__ = [
    "ARCHITECTURES",
    "COMFY_ARCHITECTURES",
    "COMFY_DETECTABLE",
    "ComfyUnavailable",
    "DIFFUSERS_ARCHITECTURES",
    "comfy_expected_model_config",
    "comfy_load_tiny",
    "comfy_make_inputs",
    "comfy_state_dict_for",
    "import_comfy",
    "randomize_",
    "run",
] + [f.__name__ for f in ARCHITECTURES.values()]
