"""Model records: detection, variants, presets through SwapConfig's validation, the generic
rule for unknown transformers, and debug logging."""

import logging

import pytest
import torch
from torch import nn

from comfyui_wan_blockswap import model_configs
from comfyui_wan_blockswap.model_configs.wan import comfy_state_shapes
from toy_models import make_toy, toy_inputs
from comfyui_wan_blockswap.wan_blockswap import SwapConfig, apply_block_swap


def test_every_record_is_well_formed():
    names = [c.name for c in model_configs.all_configs()]
    assert len(names) == len(set(names))
    for config in model_configs.all_configs():
        assert config.layout.lists_with_role("main"), config.name
        assert config.detect_keys and config.class_names and config.hidden_param


def test_presets_are_valid_swap_configs():
    assert model_configs.PRESETS
    for preset in model_configs.PRESETS:
        config = SwapConfig.from_options(**preset.as_dict())
        assert 0 < config.vram_budget_gb < preset.vram_gb
    preset = model_configs.get_preset("Wan 2.1/2.2 14B, 12 GB")
    assert preset.as_dict()["vram_budget_gb"] == 7.5
    with pytest.raises(KeyError, match="known presets"):
        model_configs.get_preset("nope")


def test_variant_of_a_wan_14b_skeleton():
    pytest.importorskip("diffusers")
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    with init_empty_weights():
        model = WanTransformer3DModel(num_layers=40, num_attention_heads=40, attention_head_dim=128)
    config = model_configs.detect(model)
    assert config.name == "wan.diffusers"
    assert model_configs.variant_of(config, model).name == "wan-14b"


def test_checkpoint_keys_detect_layouts():
    keys = comfy_state_shapes(128, 256, 2).keys()
    assert model_configs.detect_from_keys(keys).name == "wan.comfyui"
    vace = list(keys) + ["vace_patch_embedding.weight", "vace_blocks.0.before_proj.weight"]
    assert model_configs.detect_from_keys(vace).name == "wan_vace.comfyui"
    assert model_configs.detect_from_keys(["foo.weight"]) is None


class Unknown(nn.Module):
    """No record knows this: two alike lists, one too small to matter, one nested list."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, 16)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)) for _ in range(4)
        )
        self.tiny = nn.ModuleList(nn.LayerNorm(16) for _ in range(2))

    def forward(self, x):
        x = self.embed(x)
        for layer, norm in zip(self.layers, [*self.tiny, *self.tiny]):
            x = norm(x + layer(x))
        return x


def test_generic_rule_finds_the_largest_alike_lists_and_swaps_them(caplog):
    torch.manual_seed(0)
    model = Unknown().eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        expected = model(x)
    with caplog.at_level(logging.INFO, logger="wan_blockswap"):
        config = model_configs.detect(model)
    assert [bl.path for bl in config.layout.block_lists] == ["layers"]
    assert "generic rule found block lists: layers (4 blocks" in caplog.text
    swap = apply_block_swap(model, device="cpu", blocks_to_swap=3)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    swap.remove()


def test_generic_rule_error_when_nothing_fits():
    with pytest.raises(ValueError, match="ModelLayout"):
        model_configs.detect(nn.Linear(4, 4))


def test_debug_mode_logs_plan_and_per_forward_report(caplog):
    model = make_toy()
    from toy_models import toy_layout

    with caplog.at_level(logging.INFO, logger="wan_blockswap"):
        swap = apply_block_swap(
            model, layout=toy_layout(model), device="cpu", blocks_to_swap=2, debug=True
        )
        with torch.no_grad():
            model(**toy_inputs(0))
    # the device it runs on, not "GPU"
    assert "blocks 0-1, 3-4 on cpu, 2, 5 in host memory" in caplog.text
    assert swap.describe() == swap.plan.describe("cpu") and "GPU" not in swap.describe()
    assert "block swap forward" in caplog.text and "hidden behind compute" in caplog.text
    assert swap.stats.last_report is not None
    swap.remove()


def test_a_model_with_no_record_and_no_block_list_is_told_what_was_looked_for():
    import pytest
    from torch import nn

    from comfyui_wan_blockswap.model_configs import detect
    from comfyui_wan_blockswap.wan_blockswap import BlockSwapConfigError

    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))
    model.add_module("odd", nn.ModuleList([nn.Linear(4, 4), nn.LayerNorm(4)]))
    with pytest.raises(BlockSwapConfigError, match="no architecture record matches") as info:
        detect(model.odd)
    assert "generic rule" in str(info.value) and "BlockListLayout" in str(info.value)
