import pytest

from comfyui_wan_blockswap.wan_blockswap import BlockSwapConfigError, SwapConfig


def test_defaults_are_valid():
    config = SwapConfig()
    assert config.num_slots == 2
    assert config.blocks_to_swap is None


@pytest.mark.parametrize(
    "options, words",
    [
        ({"blocks_to_swap": -1}, ["blocks_to_swap", ">= 0"]),
        ({"blocks_to_swap": 2.5}, ["blocks_to_swap", "integer"]),
        ({"blocks_to_swap": True}, ["blocks_to_swap", "integer"]),
        ({"prefetch_blocks": 17}, ["prefetch_blocks", "0..16"]),
        ({"prefetch_blocks": -1}, ["prefetch_blocks", "0..16"]),
        ({"vace_blocks_to_swap": -2}, ["vace_blocks_to_swap"]),
        ({"vram_budget_gb": 0}, ["vram_budget_gb", "positive"]),
        ({"vram_budget_gb": float("nan")}, ["vram_budget_gb"]),
        ({"vram_budget_gb": "8"}, ["vram_budget_gb", "number"]),
        ({"swap_unit": "leaf"}, ["swap_unit", "auto", "block", "layer"]),
        ({"debug": "yes"}, ["debug", "True or False"]),
        ({"resident_blocks": (1, 1)}, ["resident_blocks", "duplicates"]),
        ({"resident_blocks": (-1,)}, ["resident_blocks"]),
        (
            {"blocks_to_swap": 3, "vram_budget_gb": 8.0},
            ["only one", "blocks_to_swap", "vram_budget_gb"],
        ),
        ({"blocks_to_swap": 3, "resident_blocks": (0,)}, ["only one", "resident_blocks"]),
    ],
)
def test_bad_values_name_the_option(options, words):
    with pytest.raises(BlockSwapConfigError) as info:
        SwapConfig(**options)
    for word in words:
        assert word in str(info.value)


def test_unknown_options_are_rejected_by_name():
    with pytest.raises(BlockSwapConfigError, match="blocks_to_sawp"):
        SwapConfig.from_options(blocks_to_sawp=3)
    with pytest.raises(BlockSwapConfigError, match="nope"):
        SwapConfig().replace(nope=1)


def test_replace_validates_and_resident_blocks_are_sorted():
    config = SwapConfig(resident_blocks=[3, 1, 2])
    assert config.resident_blocks == (1, 2, 3)
    with pytest.raises(BlockSwapConfigError):
        config.replace(prefetch_blocks=99)
    assert config.replace(prefetch_blocks=3).num_slots == 4


@pytest.mark.parametrize(
    "widgets, message",
    [
        (dict(preset="Wan 14B, 13 GB"), "preset 'Wan 14B, 13 GB' does not exist"),
        (dict(vram_budget_gb=float("nan")), "vram_budget_gb must be"),
        (dict(vram_budget_gb=-2.0), "vram_budget_gb must be"),
    ],
)
def test_bad_widget_values_name_the_widget_and_never_fall_back(widgets, message):
    """The node's widgets: an unknown preset or a budget that is not a number of GB is our
    error naming it, not a KeyError or a silent fall back to blocks_to_swap."""
    from comfyui_wan_blockswap.nodes import config_from_widgets
    from comfyui_wan_blockswap.wan_blockswap import BlockSwapConfigError

    base = dict(
        blocks_to_swap=2, offload_txt_emb=False, offload_img_emb=False, use_non_blocking=True,
        vace_blocks_to_swap=0, prefetch_blocks=1, block_swap_debug=False,
    )  # fmt: skip
    with pytest.raises(BlockSwapConfigError, match=message):
        config_from_widgets(**base, **widgets)
