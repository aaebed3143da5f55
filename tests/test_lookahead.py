"""How far copies run ahead of compute: a streamed plan prefetches a block's worth of bytes
([Note: streamed plans]), and a record's grouped parts travel as one unit ([Note: grouped
parts]), so that layers computing little do not wait on the next layer's copy."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from toy_models import make_toy, streamed_budget_gb, toy_inputs, toy_layout
from comfyui_wan_blockswap.wan_blockswap import SwapConfig, apply_block_swap
from comfyui_wan_blockswap.wan_blockswap.engine import measure_model
from comfyui_wan_blockswap.wan_blockswap.memory_provider import InFlight
from comfyui_wan_blockswap.wan_blockswap.plan import streamed_plan
from comfyui_wan_blockswap.wan_blockswap.window_allocator import (
    WindowAllocator,
    block_lookahead_bytes,
)


def _flight(held: int) -> InFlight:
    return InFlight(0, None, None, None, None, held=held)


def _unit(nbytes: int) -> SimpleNamespace:
    return SimpleNamespace(nbytes=nbytes, transfer=None, compress=False)


def test_the_window_admits_units_ahead_until_they_hold_the_look_ahead():
    window = WindowAllocator(None, [], window_bytes=1000, lookahead_bytes=300)
    assert window.admits(_unit(5000), [])  # nothing on the GPU: the next unit always loads
    window.held = 100  # the unit in use
    assert window.admits(_unit(100), [])  # the first unit ahead
    # ahead: 200 of the 300 bytes' look-ahead; a third unit still comes
    assert window.admits(_unit(100), [_flight(100), _flight(100)])
    assert not window.admits(_unit(100), [_flight(200), _flight(100)])  # 300 ahead: enough
    window.held = 950
    assert not window.admits(_unit(100), [_flight(100)])  # beyond the window
    window.lookahead_bytes = 0  # prefetch_blocks=0: each unit loads when it runs
    window.held = 100
    assert not window.admits(_unit(1), [])


def test_the_look_ahead_is_the_largest_swapped_blocks_streamed_layers():
    model = make_toy()
    _, sizes = measure_model(model, toy_layout(model))
    plan = streamed_plan(sizes, SwapConfig(), None)
    assert plan is not None
    block = max(sum(b.layer_bytes) for b in sizes.blocks)
    assert block_lookahead_bytes(sizes, plan, 1) == block
    assert block_lookahead_bytes(sizes, plan, 3) == 3 * block
    assert block_lookahead_bytes(sizes, plan, 0) == 0
    # no layer units in the blocks (only layers outside them stream): one unit ahead
    bare = dataclasses.replace(
        sizes, blocks=tuple(dataclasses.replace(b, layer_bytes=()) for b in sizes.blocks)
    )
    assert block_lookahead_bytes(bare, plan, 1) == 1


@pytest.mark.parametrize("ahead", ["one layer", "a block"])
def test_a_streamed_plan_keeps_a_blocks_worth_of_layers_in_flight(ahead, monkeypatch):
    """With one layer ahead, a layer that computes little waited on the next one's copy
    (Wan's cross-attention k and v at 32,760 tokens: 1.6% of a forward on an H100); now the
    layers ahead hold up to a block's bytes (``prefetch_blocks=1``), within the window."""
    model = make_toy()
    expected = {}
    with torch.no_grad():
        for seed in (1, 2):
            expected[seed] = model(**toy_inputs(seed))
    in_flight = []  # (units on the GPU, bytes on the GPU) after each prefetch
    prepare = WindowAllocator.prepare

    def recording(provider, flight, stored):
        prepare(provider, flight, stored)
        on_gpu = [f for f in provider.flights if f.buffer is not None]
        in_flight.append((len(on_gpu), provider.held_bytes))

    monkeypatch.setattr(WindowAllocator, "prepare", recording)
    window = 30_000  # the widest window below the toy's slot plans: most of a block
    swap = apply_block_swap(
        model,
        layout=toy_layout(model),
        device="cpu",
        vram_budget_gb=streamed_budget_gb(model, window),
        prefetch_blocks=1,
    )
    assert swap.plan.kind == "streamed"
    provider = swap.scheduler.provider
    if ahead == "one layer":  # what streamed plans did before session 25
        provider.lookahead_bytes = 1
    with torch.no_grad():
        for seed in (1, 2, 1):
            assert torch.equal(model(**toy_inputs(seed)), expected[seed])
    most_units = max(units for units, _ in in_flight)
    assert all(held <= window for _, held in in_flight)
    if ahead == "one layer":
        assert most_units == 2
    else:
        assert most_units > 2
        assert provider.lookahead_bytes == max(sum(b.layer_bytes) for b in swap.sizes.blocks)
    swap.remove()


def _grouped_ffn(model):
    base = toy_layout(model)
    lists = tuple(dataclasses.replace(b, grouped=("ffn",)) for b in base.block_lists)
    return dataclasses.replace(base, block_lists=lists)


def _layer_names(model, layout) -> list[str]:
    units, _ = measure_model(model, layout)
    return [u.name for layers in units["layers"].values() for u in layers]


def test_a_grouped_part_is_one_unit_and_outputs_stay_equal():
    model = make_toy(ffn=32)  # the FFN (2,112 parameters) smaller than qkv (3,168)
    with torch.no_grad():
        expected = model(**toy_inputs(3))
    grouped = _grouped_ffn(model)
    names = _layer_names(model, grouped)
    assert "blocks.0.ffn" in names and "blocks.0.ffn.0" not in names
    swap = apply_block_swap(
        model, layout=grouped, device="cpu", blocks_to_swap=6, swap_unit="layer"
    )
    assert "blocks.0.ffn" in {u.name for u in swap.units}
    with torch.no_grad():
        assert torch.equal(model(**toy_inputs(3)), expected)
        # a host calling the part's layers itself gets the weights for that call, and they
        # stay until another unit is waited for or a forward ends
        x = torch.randn(2, 4, 32)
        assert model.blocks[0].ffn[2].weight.numel() == 0  # a placeholder between uses
        out = model.blocks[0].ffn[0](x)
        assert out.shape == (2, 4, 32) and model.blocks[0].ffn[2].weight.numel() > 0
        assert torch.equal(model(**toy_inputs(3)), expected)
        assert model.blocks[0].ffn[0].weight.numel() == 0 and not swap.scheduler.in_use
    swap.remove()
    with torch.no_grad():
        assert torch.equal(model.blocks[0].ffn[0](x), out)


def test_a_part_larger_than_the_blocks_other_units_is_not_grouped():
    """Grouped, the default toy's FFN (4,192 parameters) would be the block's largest unit
    and make every slot larger: its layers stay units of their own."""
    model = make_toy()
    names = _layer_names(model, _grouped_ffn(model))
    assert {"blocks.0.ffn.0", "blocks.0.ffn.2"} <= set(names) and "blocks.0.ffn" not in names


def test_wan_records_group_the_cross_attention_where_the_ffn_is_the_larger_unit():
    """Both Wan layouts name the cross-attention grouped. It is one unit where the FFN (run
    in token chunks, one unit) is larger, as at 14B; where the FFN's layers are units of their
    own (run whole) the cross-attention would be the largest unit, and its layers stay apart."""
    pytest.importorskip("diffusers")
    import tiny_models

    from comfyui_wan_blockswap import model_configs

    config = {**tiny_models._WAN_TINY, "ffn_dim": 80}  # 2.5x the width, as Wan's 2.7x
    model = tiny_models._build_diffusers("WanTransformer3DModel", config, 0)
    layout = model_configs.match(model).layout
    assert layout.block_lists[0].grouped == ("attn2",)

    def names(layout) -> set[str]:
        units, _ = measure_model(model, layout)
        return {u.name for layers in units["layers"].values() for u in layers}

    chunked = names(layout)
    assert {"blocks.0.attn2", "blocks.0.ffn", "blocks.0.attn1.to_q"} <= chunked
    assert not any(n.startswith("blocks.0.attn2.") for n in chunked)
    whole = names(layout.without_token_wise())
    assert "blocks.0.attn2" not in whole
    assert {"blocks.0.attn2.to_k", "blocks.0.ffn.net.0.proj"} <= whole


@pytest.mark.parametrize("held", [0, 64 * 2**20])
def test_out_of_vram_in_the_window_names_the_fix_that_frees_memory(held, monkeypatch):
    """A smaller window frees VRAM only where layers of ours are on the device; with none, the
    forward's own tensors fill it and the error says so (an H100 floor run ended there)."""
    from comfyui_wan_blockswap.wan_blockswap.errors import InsufficientMemoryError

    streams = SimpleNamespace(device=torch.device("cpu"))
    window = WindowAllocator(streams, [], window_bytes=1 << 30, lookahead_bytes=1 << 20)
    window.held = held
    unit = SimpleNamespace(name="blocks.0.cross_attn", nbytes=200 * 2**20, transfer=None)

    def no_room(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch, "empty", no_room)
    with pytest.raises(InsufficientMemoryError) as caught:
        window.prepare(_flight(0), unit)
    message = str(caught.value)
    assert "blocks.0.cross_attn (200 MiB" in message and "unchanged and usable" in message
    if held:
        assert "lower vram_budget_gb" in message
    else:
        assert "activations" in message and "vram_budget_gb" not in message
        assert "fewer frames" in message
