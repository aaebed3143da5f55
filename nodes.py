"""ComfyUI nodes. Widgets map one-to-one onto SwapConfig fields; ComfyUI itself is imported
only when a node runs (through ``callbacks.comfy_adapter``), so importing this works anywhere.

Node ids are not ``wanBlockSwap``: newer ComfyUI core turns that id into a no-op.
"""

from __future__ import annotations

import inspect
import logging

from . import model_configs
from .callbacks.checkpoint import CheckpointError, CheckpointNotFoundError
from .wan_blockswap import BlockSwapConfigError, SwapConfig
from .wan_blockswap.compressed_transfer import TYPICAL_PACKED_SHARE, staging_bytes
from .wan_blockswap.config import MAX_PREFETCH_BLOCKS

logger = logging.getLogger("wan_blockswap")

CATEGORY = "wan_blockswap"
CUSTOM = "custom (use the widgets)"
AUTO = "auto (free VRAM now)"
# The transfer_compression widget's choices and the SwapConfig values they stand for.
TRANSFER_COMPRESSION = {"off": False, "auto": "auto", "on": True}
# the donor_allocation widget's default: every swapped block in pinned host memory
DEFAULT_ALLOCATION = "cpu,*"
PRESET_TOOLTIP = "A tested setting per model and GPU size. Replaces blocks_to_swap."


# The numeric widgets' ranges, shared by INPUT_TYPES and the checks (ComfyUI's own validation
# does not run when a node is called directly, from a script or another node pack).
RANGES = {
    "blocks_to_swap": (0, 200),
    "vace_blocks_to_swap": (0, 64),
    "prefetch_blocks": (0, MAX_PREFETCH_BLOCKS),
    "vram_budget_gb": (0.0, 512.0),
}
SWITCHES = ("offload_txt_emb", "offload_img_emb", "use_non_blocking", "block_swap_debug")


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
    transfer_compression: str | bool = "auto",
    donor_allocation: str = DEFAULT_ALLOCATION,
) -> SwapConfig:
    """The node's widgets as a validated :class:`SwapConfig`.

    ``vram_budget_gb > 0`` or a preset replaces ``blocks_to_swap`` (the tooltip says so).
    With ``auto`` the config carries the options only: the adapter plans at the first
    sampling run, for the VRAM that run's latent leaves. Every bad value is refused by its
    widget's name before anything is applied; none is replaced by a default.
    """
    widgets = dict(locals())
    _check_widgets(widgets)
    common = dict(
        offload_txt_emb=offload_txt_emb,
        offload_img_emb=offload_img_emb,
        non_blocking=use_non_blocking,
        vace_blocks_to_swap=vace_blocks_to_swap,
        prefetch_blocks=prefetch_blocks,
        transfer_compression=TRANSFER_COMPRESSION.get(transfer_compression, transfer_compression),
        debug=block_swap_debug,
        donor_allocation=donor_allocation,
    )
    if preset == AUTO:
        return SwapConfig(**common)
    if preset not in (CUSTOM, ""):
        # the preset picks the budget; the other widgets, prefetch_blocks included, stay
        # the user's
        options = {**model_configs.get_preset(preset).as_dict(), **common}
        return SwapConfig.from_options(**options)
    if vram_budget_gb > 0:
        return SwapConfig(vram_budget_gb=vram_budget_gb, **common)
    return SwapConfig(blocks_to_swap=blocks_to_swap, **common)


def _config(widgets: dict) -> SwapConfig:
    """:func:`config_from_widgets` for a node's keyword inputs: a widget that is missing or
    unknown (a workflow from another version, a script's typo) is named, not a TypeError."""
    known = inspect.signature(config_from_widgets).parameters
    unknown = sorted(set(widgets) - set(known))
    missing = [n for n, p in known.items() if p.default is p.empty and n not in widgets]
    if unknown or missing:
        raise BlockSwapConfigError(
            f"the node's widgets do not match this version of the node (unknown: {unknown}, "
            f"missing: {missing}); recreate the node, or pass exactly {list(known)}"
        )
    return config_from_widgets(**widgets)


def _check_widgets(widgets: dict) -> None:
    """Each widget's type and range (INPUT_TYPES'), and the combinations that contradict."""
    for name in SWITCHES:
        if not isinstance(widgets[name], bool):
            raise BlockSwapConfigError(f"{name} must be True or False, got {widgets[name]!r}")
    for name, (low, high) in RANGES.items():
        value = widgets[name]
        whole = name != "vram_budget_gb"
        kind = (int,) if whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            what = "a whole number" if whole else "a number of GB"
            raise BlockSwapConfigError(f"{name} must be {what} in {low}..{high}, got {value!r}")
        if not low <= value <= high:  # NaN too: never a silent fall back to blocks_to_swap
            fix = " (0 = use blocks_to_swap)" if name == "vram_budget_gb" else ""
            raise BlockSwapConfigError(f"{name} must be in {low}..{high}{fix}, got {value}")
    compression = widgets["transfer_compression"]
    if not (isinstance(compression, bool) or compression in list(TRANSFER_COMPRESSION)):
        raise BlockSwapConfigError(
            f"transfer_compression must be one of {list(TRANSFER_COMPRESSION)}, got "
            f"{compression!r}"
        )
    allocation = widgets["donor_allocation"]
    if not isinstance(allocation, str):  # SwapConfig reads None as "not given": a widget can't
        raise BlockSwapConfigError(
            f"donor_allocation must be text such as {DEFAULT_ALLOCATION!r} or "
            f"'cuda:1,8gb;cpu,*', got {allocation!r}"
        )
    preset = widgets["preset"]
    choices = [CUSTOM, AUTO, *model_configs.preset_names()]
    if preset != "" and preset not in choices:
        raise BlockSwapConfigError(
            f"preset {preset!r} does not exist; choose {AUTO!r}, {CUSTOM!r} or one of "
            f"{model_configs.preset_names()}"
        )
    if preset not in (CUSTOM, "") and widgets["vram_budget_gb"] > 0:
        raise BlockSwapConfigError(
            f"vram_budget_gb {widgets['vram_budget_gb']} and preset {preset!r} both choose "
            f"the blocks: set preset to {CUSTOM!r} to use the budget, or vram_budget_gb to 0 "
            f"to use the preset"
        )


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
                        "min": RANGES["blocks_to_swap"][0],
                        "max": RANGES["blocks_to_swap"][1],
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
                        "min": RANGES["vace_blocks_to_swap"][0],
                        "max": RANGES["vace_blocks_to_swap"][1],
                        "tooltip": "VACE blocks kept in host "
                        "memory; 0 = automatic (the same share as the main blocks).",
                    },
                ),
                "prefetch_blocks": (
                    "INT",
                    {
                        "default": 1,
                        "min": RANGES["prefetch_blocks"][0],
                        "max": RANGES["prefetch_blocks"][1],
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
                        "min": RANGES["vram_budget_gb"][0],
                        "max": RANGES["vram_budget_gb"][1],
                        "step": 0.5,
                        "tooltip": "GB of VRAM the weights may use (resident blocks, other weights, "
                        "slots); the node picks the blocks. Below what fixed slots need, every "
                        "large layer streams in turn, each in memory of its own size (like "
                        "core's low-VRAM mode, with prefetch). 0 = use blocks_to_swap. With preset "
                        "'custom' only: a preset chooses the budget itself.",
                    },
                ),
                "transfer_compression": (
                    list(TRANSFER_COMPRESSION),
                    {
                        "default": "auto",
                        "tooltip": "Send bf16 weights losslessly packed (1.5 bytes per weight, "
                        "decoded on the GPU bit for bit). 'on': faster when copies dominate "
                        "(images, short or low-resolution clips: up to a quarter off each "
                        "step), 1-2.5% slower on long videos, where copies are hidden "
                        "anyway. 'auto' (default): compressed, until the second step shows "
                        "compute hiding the copies, then raw; raw from the start where the "
                        "packed copy does not fit in RAM. "
                        f"Uses {staging_bytes() / 2**20:.0f} MiB more VRAM; while compressed, "
                        f"needs ~{TYPICAL_PACKED_SHARE:.2f}x the swapped size in RAM on top.",
                    },
                ),
                "donor_allocation": (
                    "STRING",
                    {
                        "default": DEFAULT_ALLOCATION,
                        "tooltip": "Where the swapped blocks are stored. 'cpu,*': pinned host "
                        "memory. 'cuda:1,*': a second GPU, copied peer to peer (frees system "
                        "RAM). 'cuda:1,8gb;cpu,*': the first 8 GB of swapped blocks on the "
                        "second GPU, the rest in RAM; amounts in gb/mb, % of the swapped "
                        "bytes, or * for the rest. Blocks on a GPU travel uncompressed.",
                    },
                ),
            },
        }

    def apply(self, model, **widgets):
        """``widgets``: the swap inputs, by name (see INPUT_TYPES)."""
        config = _config(widgets)  # refused by name before the model is touched
        from .callbacks.comfy_adapter import apply_to_patcher

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
        # "auto" plans from a loaded model, which this node has yet to make: not offered here
        choices, options = inputs["optional"]["preset"]
        options = {**options, "default": CUSTOM, "tooltip": PRESET_TOOLTIP}
        inputs["optional"]["preset"] = ([c for c in choices if c != AUTO], options)
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
        if widgets.get("preset") == AUTO:
            raise BlockSwapConfigError(
                f"preset {AUTO!r} needs a loaded model: choose another preset here, or load "
                f"with the core loader and use {AUTO!r} on the WAN BlockSwap node after it"
            )
        config = _config(widgets)
        if not isinstance(weight_dtype, str) or weight_dtype not in WEIGHT_DTYPES:
            raise BlockSwapConfigError(
                f"weight_dtype must be one of {list(WEIGHT_DTYPES)}, got {weight_dtype!r}"
            )
        if not isinstance(unet_name, str) or not unet_name.strip():
            raise CheckpointError(
                f"unet_name must name a .safetensors file in models/diffusion_models, got "
                f"{unet_name!r}"
            )
        import folder_paths

        path = folder_paths.get_full_path("diffusion_models", unet_name)
        if path is None:
            raise CheckpointNotFoundError(
                f"unet_name {unet_name!r}: no such file in models/diffusion_models; put it "
                f"there (or in a folder extra_model_paths.yaml adds) and refresh"
            )
        from .callbacks.comfy_lazy_load import load_lazily

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
