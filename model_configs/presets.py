"""Named settings per model size and GPU memory, applied through SwapConfig's validation.

A preset sets ``vram_budget_gb`` (the weights' share of the card) rather than a block count,
so one preset serves bf16, fp8 and GGUF files of the same model: the engine turns the budget
into blocks from the real sizes. The reserve is what the rest of a generation needs on the
card: activations at typical resolutions (480p-720p video, 1024px images), the CUDA context,
and the headroom ComfyUI keeps.
"""

from __future__ import annotations

from .base import Preset

GPU_SIZES_GB = (8, 12, 16, 24)

# variant name -> (display name, GB to leave for everything but the weights)
RESERVE_GB: dict[str, tuple[str, float]] = {
    "wan2.1-1.3b": ("Wan 2.1 1.3B", 3.0),
    "wan2.2-5b": ("Wan 2.2 5B", 4.0),
    "wan-14b": ("Wan 2.1/2.2 14B", 4.5),
    "hunyuan-video-13b": ("HunyuanVideo 13B", 4.5),
    "flux-12b": ("Flux 12B", 3.0),
    "cosmos-2b": ("Cosmos 2B", 3.0),
    "cosmos-7b": ("Cosmos 7B", 4.0),
    "cosmos-14b": ("Cosmos 14B", 4.5),
}


def _build() -> tuple[Preset, ...]:
    presets = []
    for variant, (display, reserve) in RESERVE_GB.items():
        for gpu_gb in GPU_SIZES_GB:
            budget = round(gpu_gb - reserve, 1)
            if budget <= 0.5:
                continue
            presets.append(
                Preset(
                    name=f"{display}, {gpu_gb} GB",
                    variant=variant,
                    vram_gb=gpu_gb,
                    options=(("vram_budget_gb", budget), ("prefetch_blocks", 1)),
                )
            )
    return tuple(presets)


PRESETS: tuple[Preset, ...] = _build()


def preset_names() -> list[str]:
    return [p.name for p in PRESETS]


def get_preset(name: str) -> Preset:
    for preset in PRESETS:
        if preset.name == name:
            return preset
    raise KeyError(f"no preset named {name!r}; known presets: {preset_names()}")
