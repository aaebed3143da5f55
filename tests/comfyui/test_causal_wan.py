"""ComfyUI's CausalWanModel (autoregressive Wan) calls its cross-attention's layers itself,
outside the cross-attention's forward: with the cross-attention one swap unit ([Note:
grouped parts]), those calls still get the weights, and outputs equal the unswapped model's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tiny_models


def _causal_model(comfy):
    ar_model = pytest.importorskip("comfy.ldm.wan.ar_model", reason="this core has no ar_model")
    config = dict(tiny_models._COMFY_WAN_TINY)
    config.pop("model_type")
    torch.manual_seed(0)
    model = ar_model.CausalWanModel(
        model_type="t2v",
        **config,
        operations=comfy.ops.disable_weight_init,
        device="cpu",
        dtype=torch.float32,
    )
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    return model.eval()


def _two_ar_steps(model) -> list[torch.Tensor]:
    """Two chunks of frames: the second reads the cross-attention cache the first filled,
    calling the cross-attention's q, norm_q and o directly."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 2, 8, 8, generator=gen)
    context = torch.randn(1, 512, 16, generator=gen)
    kv = model.init_kv_caches(1, 64, "cpu", torch.float32)
    cross = model.init_crossattn_caches(1, "cpu", torch.float32)
    outputs = []
    with torch.no_grad():
        for start in (0, 2):
            state = {"start_frame": start, "kv_caches": kv, "crossattn_caches": cross}
            options = {"ar_state": state}
            outputs.append(model(x, torch.tensor([500.0]), context, transformer_options=options))
    return outputs


def _options(model, layout, plan: str) -> dict:
    from comfyui_wan_blockswap.wan_blockswap import min_vram_budget_gb

    if plan == "streamed":
        return dict(vram_budget_gb=min_vram_budget_gb(model, layout) * 1.5)
    return dict(blocks_to_swap=2, swap_unit="layer")


def _bytes_per_step(model, layout, plan: str) -> int:
    """Bytes copied per AR step (two forwards) once the schedule is learned."""
    from comfyui_wan_blockswap.wan_blockswap import apply_block_swap

    swap = apply_block_swap(model, layout=layout, device="cpu", **_options(model, layout, plan))
    try:
        _two_ar_steps(model)
        before = swap.stats.raw_bytes_copied
        _two_ar_steps(model)
        return swap.stats.raw_bytes_copied - before
    finally:
        swap.remove()


@pytest.mark.parametrize("plan", ["layer slots", "streamed"])
def test_causal_wan_calls_grouped_layers_directly_and_outputs_stay_equal(comfy, pack, plan):
    from comfyui_wan_blockswap import model_configs
    from comfyui_wan_blockswap.wan_blockswap import apply_block_swap

    model = _causal_model(comfy)
    expected = _two_ar_steps(model)
    record = model_configs.match(model)
    assert record.name == "wan.comfyui" and "cross_attn" in record.layout.block_lists[0].grouped
    options = _options(model, record.layout, plan)
    swap = apply_block_swap(model, layout=record.layout, device="cpu", **options)
    assert "blocks.1.cross_attn" in {u.name for u in swap.units}
    assert swap.plan.kind == ("streamed" if plan == "streamed" else "slots")
    try:
        for _ in range(2):
            got = _two_ar_steps(model)
            assert all(torch.equal(a, b) for a, b in zip(got, expected))
    finally:
        swap.remove()
    assert all(torch.equal(a, b) for a, b in zip(_two_ar_steps(model), expected))
    # q, norm_q and o called in a row share one copy of the unit, which stays until another
    # unit is waited for: no more bytes than with the layers apart (a copy per call moved
    # 1.7x as many in a review)
    apart = dataclasses.replace(
        record.layout,
        block_lists=tuple(dataclasses.replace(b, grouped=()) for b in record.layout.block_lists),
    )
    assert _bytes_per_step(model, record.layout, plan) <= _bytes_per_step(model, apart, plan)
