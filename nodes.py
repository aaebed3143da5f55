"""ComfyUI nodes. Widgets map one-to-one onto SwapConfig fields; ComfyUI itself is imported
only when a node runs (through ``callbacks.comfy_adapter``), so importing this works anywhere.

Node ids are not ``wanBlockSwap``: newer ComfyUI core turns that id into a no-op.
"""

from __future__ import annotations

import logging

from . import model_configs
from .wan_blockswap import BlockSwapConfigError, SwapConfig
from .wan_blockswap.config import MAX_PREFETCH_BLOCKS

logger = logging.getLogger("wan_blockswap")

CATEGORY = "wan_blockswap"
CUSTOM = "custom (use the widgets)"
AUTO = "auto (free VRAM now)"
# The transfer_compression widget's choices and the SwapConfig values they stand for.
TRANSFER_COMPRESSION = {"off": False, "auto": "auto", "on": True}


def config_from_widgets(
    blocks_to_swap: int,
    offload_txt_emb: bool,
    offload_img_emb: bool,
    use_non_blocking: bool,
    vace_blocks_to_swap: int,
    prefetch_blocks: int,
    block_swap_debug: bool,
    preset: str = CUSTOM,
    vram_budget_gb: float = 0.0,
    transfer_compression: str | bool = "off",
) -> SwapConfig:
    """The node's widgets as a validated :class:`SwapConfig`.

    ``vram_budget_gb > 0`` or a preset replaces ``blocks_to_swap`` (the tooltip says so).
    With ``auto`` the config carries the options only: the adapter plans at the first
    sampling run, for the VRAM that run's latent leaves.
    """
    common = dict(
        offload_txt_emb=offload_txt_emb,
        offload_img_emb=offload_img_emb,
        non_blocking=use_non_blocking,
        vace_blocks_to_swap=vace_blocks_to_swap,
        prefetch_blocks=prefetch_blocks,
        transfer_compression=TRANSFER_COMPRESSION.get(transfer_compression, transfer_compression),
        debug=block_swap_debug,
    )
    if not vram_budget_gb >= 0:  # NaN too: never a silent fall back to blocks_to_swap
        raise BlockSwapConfigError(
            f"vram_budget_gb must be 0 (use blocks_to_swap) or a positive number of GB, got "
            f"{vram_budget_gb}"
        )
    if preset == AUTO:
        return SwapConfig(**common)
    if preset not in (CUSTOM, ""):
        if preset not in model_configs.preset_names():
            raise BlockSwapConfigError(
                f"preset {preset!r} does not exist; choose {AUTO!r}, {CUSTOM!r} or one of "
                f"{model_configs.preset_names()}"
            )
        options = {**common, **model_configs.get_preset(preset).as_dict()}
        return SwapConfig.from_options(**options)
    if vram_budget_gb > 0:
        return SwapConfig(vram_budget_gb=vram_budget_gb, **common)
    return SwapConfig(blocks_to_swap=blocks_to_swap, **common)


class WanBlockSwapStream:
    """MODEL in, MODEL out: stream the model's transformer blocks from pinned host memory."""

    DESCRIPTION = (
        "Keeps the chosen transformer blocks in pinned host memory and streams each one to the "
        "GPU just ahead of use, overlapped with compute. Outputs are identical to running "
        "without it. Works after the core diffusion-model loader (and GGUF loaders); never "
        "changes the upstream MODEL."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        presets = [CUSTOM, AUTO, *model_configs.preset_names()]
        return {
            "required": {
                "model": (
                    "MODEL",
                    {
                        "tooltip": "The diffusion model to stream (Wan, VACE, "
                        "HunyuanVideo, Flux, Cosmos, or any transformer)."
                    },
                ),
                "blocks_to_swap": (
                    "INT",
                    {
                        "default": 20,
                        "min": 0,
                        "max": 200,
                        "tooltip": "Blocks kept in host memory (spread evenly through the "
                        "model). 40 of Wan 14B's 40 blocks is the least VRAM. Ignored when a "
                        "preset or vram_budget_gb is set.",
                    },
                ),
                "offload_txt_emb": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Stream the text embedding too (saves ~0.1 GB "
                        "on Wan 14B, and the token refiner on HunyuanVideo).",
                    },
                ),
                "offload_img_emb": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Stream the image (CLIP) embedding of i2v models " "too.",
                    },
                ),
                "use_non_blocking": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Asynchronous copies that overlap compute. Turn "
                        "off only to debug: every copy then waits.",
                    },
                ),
                "vace_blocks_to_swap": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 64,
                        "tooltip": "VACE blocks kept in host "
                        "memory; 0 = automatic (the same share as the main blocks).",
                    },
                ),
                "prefetch_blocks": (
                    "INT",
                    {
                        "default": 1,
                        "min": 0,
                        "max": MAX_PREFETCH_BLOCKS,
                        "tooltip": "How many blocks are copied ahead. The GPU holds prefetch_blocks "
                        "+ 1 block-sized slots; 1 is enough to hide copies behind compute.",
                    },
                ),
                "block_swap_debug": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Log the plan and per-block copy/compute "
                        "times (adds one GPU sync per step).",
                    },
                ),
            },
            "optional": {
                "preset": (
                    presets,
                    {
                        "default": AUTO,
                        "tooltip": "A tested setting per model and GPU size, or "
                        "'auto': planned before each sampling run for the VRAM that run's "
                        "latent leaves (what is free, with what core can unload, minus core's "
                        "own memory estimate for the latent). Replaces blocks_to_swap.",
                    },
                ),
                "vram_budget_gb": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 512.0,
                        "step": 0.5,
                        "tooltip": "GB of VRAM the weights may use (resident blocks, other weights, "
                        "slots); the node picks the blocks. Below what fixed slots need, every "
                        "large layer streams in turn, each in memory of its own size (like "
                        "core's low-VRAM mode, with prefetch). 0 = use blocks_to_swap.",
                    },
                ),
                "transfer_compression": (
                    list(TRANSFER_COMPRESSION),
                    {
                        "default": "off",
                        "tooltip": "Send bf16 weights losslessly packed (1.5 bytes per weight, "
                        "decoded on the GPU bit for bit). 'on': faster when copies dominate "
                        "(images, short or low-resolution clips: up to a quarter off each "
                        "step), 1-2.5% slower on long videos, where copies are hidden "
                        "anyway. 'auto': compressed, until the second step shows compute "
                        "hiding the copies, then raw. Uses 52 MiB more VRAM; while compressed, "
                        "needs ~0.75x the swapped size in RAM on top.",
                    },
                ),
            },
        }

    def apply(self, model, **widgets):
        """``widgets``: the swap inputs, by name (see INPUT_TYPES)."""
        from .callbacks.comfy_adapter import apply_to_patcher

        config = config_from_widgets(**widgets)
        return (apply_to_patcher(model, config, auto=widgets.get("preset") == AUTO),)


class WanBlockSwapModelLoader(WanBlockSwapStream):
    """Load a diffusion model lazily: swapped blocks go from disk to pinned host memory,
    never through VRAM, and the file is never held whole in RAM."""

    DESCRIPTION = (
        "Loads a diffusion model from models/diffusion_models straight into block swap: the "
        "swapped blocks go from the file to pinned host memory, the rest to where core loads "
        "it from. No VRAM spike, no second copy in RAM. safetensors in ComfyUI's key layout."
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        import folder_paths

        inputs = super().INPUT_TYPES()
        del inputs["required"]["model"]
        files = [
            name
            for name in folder_paths.get_filename_list("diffusion_models")
            if name.endswith(".safetensors")
        ]
        inputs["required"] = {
            "unet_name": (files, {"tooltip": "A .safetensors file in models/diffusion_models."}),
            "weight_dtype": (
                list(WEIGHT_DTYPES),
                {
                    "default": "default",
                    "tooltip": "As the core loader: the dtype weights are stored in (fp8 halves "
                    "what crosses PCIe).",
                },
            ),
            **inputs["required"],
        }
        return inputs

    def load(self, unet_name, weight_dtype, **widgets):
        import folder_paths

        from .callbacks.comfy_lazy_load import load_lazily

        if widgets.get("preset") == AUTO:
            raise ValueError(
                "preset 'auto' needs a loaded model; use it on the WAN BlockSwap node instead"
            )
        config = config_from_widgets(**widgets)
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        return (load_lazily(path, config, WEIGHT_DTYPES[weight_dtype]),)


def _weight_dtypes() -> dict:
    import torch

    return {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


WEIGHT_DTYPES = _weight_dtypes()

NODE_CLASS_MAPPINGS = {
    "WanBlockSwapStream": WanBlockSwapStream,
    "WanBlockSwapModelLoader": WanBlockSwapModelLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WanBlockSwapStream": "WAN BlockSwap",
    "WanBlockSwapModelLoader": "WAN BlockSwap Model Loader",
}
