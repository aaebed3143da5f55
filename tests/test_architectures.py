"""Every supported architecture, built from its real class with a tiny config: detected by
its model config, and bit-identical with swapping over several plans (CPU here, CUDA with
fresh inputs each run when a GPU is present)."""

import copy
import os

import pytest
import torch

from comfyui_wan_blockswap import model_configs
import tiny_models
from comfyui_wan_blockswap.wan_blockswap import apply_block_swap, min_vram_budget_gb

EXPECTED_CONFIG = {
    "diffusers/wan_t2v": "wan.diffusers",
    "diffusers/wan_i2v": "wan.diffusers",
    "diffusers/wan22_ti2v": "wan.diffusers",
    "diffusers/wan_vace": "wan_vace.diffusers",
    "diffusers/hunyuan_video": "hunyuan_video.diffusers",
    "diffusers/flux": "flux.diffusers",
    "diffusers/cosmos_predict1": "cosmos.diffusers",
    "diffusers/cosmos_predict2": "cosmos.diffusers",
    "comfy/wan_t2v": "wan.comfyui",
    "comfy/wan_i2v": "wan.comfyui",
    "comfy/wan22_ti2v": "wan.comfyui",
    "comfy/wan_vace": "wan_vace.comfyui",
    "comfy/hunyuan_video": "hunyuan_video.comfyui",
    "comfy/flux": "flux.comfyui",
    "comfy/cosmos_predict1": "cosmos_predict1.comfyui",
    "comfy/cosmos_predict2": "cosmos_predict2.comfyui",
}

PLANS = [
    dict(prefetch_blocks=1),  # every block swapped
    dict(blocks_to_swap=1, prefetch_blocks=2, offload_txt_emb=True, offload_img_emb=True),
    dict(prefetch_blocks=0, swap_unit="layer"),
    dict(prefetch_blocks=1, vace_blocks_to_swap=1),
]


def _builders():
    builders = dict(tiny_models.DIFFUSERS_ARCHITECTURES)
    if os.environ.get("COMFYUI_PATH"):
        builders.update(getattr(tiny_models, "COMFY_ARCHITECTURES", {}))
    return builders


BUILDERS = _builders()


def build(name):
    try:
        return BUILDERS[name]()
    except tiny_models.ComfyUnavailable as error:
        if os.environ.get("COMFYUI_PATH"):  # named but broken: see the ``comfy`` fixture
            pytest.fail(str(error), pytrace=False)
        pytest.skip(str(error))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_detected_by_structure_and_by_checkpoint_keys(name):
    model, _ = build(name)
    config = model_configs.detect(model)
    assert config.name == EXPECTED_CONFIG[name]
    keys = list(model.state_dict().keys())
    assert model_configs.detect_from_keys(keys).family == config.family
    for block_list in config.layout.block_lists:
        first = block_list.block_key_prefix("block0" if "{key}" in block_list.key_prefix else "0")
        assert any(k.startswith(first) for k in keys), (block_list, first)


def _plans_for(model, config):
    has_vace = bool(config.layout.lists_with_role("vace"))
    plans = [p for p in PLANS if has_vace or "vace_blocks_to_swap" not in p]
    # below every slot plan: every layer streamed, one at a time, outside the blocks too
    streamed = dict(vram_budget_gb=min_vram_budget_gb(model, config.layout))
    return plans + [streamed]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_swapped_output_is_bit_identical_on_cpu(name):
    model, make_inputs = build(name)
    config = model_configs.detect(model)
    inputs = [make_inputs(seed) for seed in (1, 2)]
    expected = [tiny_models.run(model, x) for x in inputs]
    for options in _plans_for(model, config):
        swap = apply_block_swap(model, device="cpu", **options)
        for _ in range(2):
            for x, want in zip(inputs, expected):
                assert torch.equal(tiny_models.run(model, x), want), options
        assert swap.stats.copies > 0
        assert bool(swap.plan.window_bytes) == ("vram_budget_gb" in options)
        swap.remove()
    assert torch.equal(tiny_models.run(model, inputs[0]), expected[0])


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_swapped_output_is_bit_identical_on_cuda_with_fresh_inputs(name):
    model, make_inputs = build(name)
    model = model.to(torch.bfloat16)
    _cast_weights_per_call_like_core(model)
    config = model_configs.detect(model)
    reference = copy.deepcopy(model).cuda()
    for options in _plans_for(model, config):
        swap = apply_block_swap(model, device="cuda", **options)
        for seed in range(6):
            x = make_inputs(100 + seed, device="cuda", dtype=torch.bfloat16)
            assert torch.equal(tiny_models.run(model, x), tiny_models.run(reference, x)), options
        swap.remove()


def _cast_weights_per_call_like_core(model):
    """ComfyUI's Wan runs its patch embedding in float32 (``patch_embedding(x.float())``), which
    a bf16 weight rejects; core's ops cast weights to the input's dtype per call
    (``comfy_cast_weights``) in a model whose weights differ from what it computes in. A plain
    ``.to(bfloat16)`` does not set that up (diffusers models have no such flag)."""
    for module in model.modules():
        if hasattr(module, "comfy_cast_weights"):
            module.comfy_cast_weights = True
