"""Named settings per model size and GPU memory, applied through SwapConfig's validation.

A preset sets ``vram_budget_gb`` (the weights' share of the card) rather than a block count,
so one preset serves bf16, fp8 and GGUF files of the same model: the engine turns the budget
into blocks from the real sizes. The reserve is what the rest of a generation needs on the
card: activations at typical resolutions (480p-720p video, 1024px images), the CUDA context,
and the headroom ComfyUI keeps.
"""

from __future__ import annotations

from .base import Preset, Variant

GPU_SIZES_GB = (8, 12, 16, 24)


def _build() -> tuple[Preset, ...]:
    """One preset per GPU size for every variant of every record that sets ``reserve_gb``."""
    from .registry import IN_FAMILY_ORDER  # the records import base, not this module

    variants: dict[str, Variant] = {}
    for config in IN_FAMILY_ORDER:  # the dropdown lists families as the registry orders them
        for variant in config.variants:
            if variant.reserve_gb is not None:
                variants.setdefault(variant.name, variant)
    presets = []
    for variant in variants.values():
        for gpu_gb in GPU_SIZES_GB:
            budget = round(gpu_gb - variant.reserve_gb, 1)
            if budget <= 0.5:
                continue
            presets.append(
                Preset(
                    name=f"{variant.display_name}, {gpu_gb} GB",
                    variant=variant.name,
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
