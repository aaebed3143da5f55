"""Packed slots ([Note: packed slots]): fixed slots of layer units hold as many consecutive
units as fit, so small units land ahead while a large one computes, in the same VRAM."""

from __future__ import annotations

import pytest
import torch

from toy_models import make_toy, toy_inputs, toy_layout
from comfyui_wan_blockswap.wan_blockswap import apply_block_swap, packed_slots, slot_pool
from comfyui_wan_blockswap.wan_blockswap.errors import BlockSwapError
from comfyui_wan_blockswap.wan_blockswap.fixed_slots import FixedSlots
from comfyui_wan_blockswap.wan_blockswap.packed_slots import PackedSlots


def _expected(model, seeds=(1, 2)) -> dict:
    with torch.no_grad():
        return {seed: model(**toy_inputs(seed)) for seed in seeds}


def _spans(provider: PackedSlots) -> list[tuple[int, int, int]]:
    """(slot, first byte, end) of every unit on the GPU now."""
    spans = []
    for flight in provider.flights:
        if flight.buffer is not None:
            base = provider.pool.slots[flight.slot].data_ptr()
            start = flight.buffer.data_ptr() - base
            spans.append((flight.slot, start, start + flight.buffer.numel()))
    return spans


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "one unit per slot"])
def test_layer_slots_pack_units_ahead_in_the_same_vram_with_equal_outputs(packed, monkeypatch):
    monkeypatch.setattr(packed_slots, "PACK_LAYER_SLOTS", packed)
    model = make_toy()
    expected = _expected(model)
    seen = []  # after each copy starts: (units on the GPU, their spans)
    take = PackedSlots.take

    def recording(provider, index):
        flight = take(provider, index)
        seen.append(_spans(provider))
        return flight

    monkeypatch.setattr(PackedSlots, "take", recording)
    swap = apply_block_swap(
        model, layout=toy_layout(model), device="cpu", blocks_to_swap=4, swap_unit="layer"
    )
    provider = swap.scheduler.provider
    assert isinstance(provider, PackedSlots if packed else FixedSlots)
    assert swap.plan.num_slots == 2
    with torch.no_grad():
        for seed in (1, 2, 1):
            assert torch.equal(model(**toy_inputs(seed)), expected[seed])
    if packed:
        assert max(map(len, seen)) > swap.plan.num_slots  # more units than slots in flight
        for spans in seen:  # within the slots, never overlapping
            assert all(end <= swap.plan.slot_bytes for _, _, end in spans)
            ordered = sorted(spans)
            for (slot, _, end), (other, start, _) in zip(ordered, ordered[1:]):
                assert slot != other or end <= start
        assert provider.held_bytes == 2 * swap.plan.slot_bytes
        assert swap.stats.cache_hits == 0  # nothing is kept past its use
    swap.remove()
    assert slot_pool.pooled_bytes() == 0


@pytest.mark.parametrize(
    "options",
    [
        dict(blocks_to_swap=4),  # whole blocks
        dict(blocks_to_swap=4, swap_unit="layer", prefetch_blocks=0),  # one slot
        dict(blocks_to_swap=4, swap_unit="layer", transfer_compression=True),
    ],
    ids=["block units", "prefetch_blocks=0", "compressed"],
)
def test_other_slot_plans_keep_one_unit_per_slot(options):
    model = make_toy(dim=256, ffn=512).to(torch.bfloat16)  # wide enough to pack when asked
    swap = apply_block_swap(model, layout=toy_layout(model), device="cpu", **options)
    assert swap.plan.kind == "slots"
    assert isinstance(swap.scheduler.provider, FixedSlots)
    swap.remove()


def test_two_models_share_packed_slots_one_after_the_other():
    """[Note: shared slots]: two models of one shape (Wan 2.2 A14B's two experts) take one
    pool in turn; each copy waits on the slot's releases whoever made them."""
    first, second = make_toy(seed=0), make_toy(seed=1)
    expected = [_expected(first), _expected(second)]
    swaps = [
        apply_block_swap(m, layout=toy_layout(m), device="cpu", blocks_to_swap=4, swap_unit="layer")
        for m in (first, second)
    ]
    assert all(isinstance(s.scheduler.provider, PackedSlots) for s in swaps)
    with torch.no_grad():
        for _ in range(2):
            for model, outputs in zip((first, second), expected):
                for seed in (1, 2):
                    assert torch.equal(model(**toy_inputs(seed)), outputs[seed])
    pools = {s.scheduler.provider.pool_key(False) for s in swaps}
    assert len(pools) == 1 and slot_pool.pooled_bytes() == 2 * swaps[0].plan.slot_bytes
    for swap in swaps:
        swap.remove()
    assert slot_pool.pooled_bytes() == 0


def test_a_unit_that_finds_the_slots_full_names_the_fix():
    provider = PackedSlots(None, [], num_slots=2, slot_bytes=1000)
    provider.units = [type("U", (), {"nbytes": 600, "name": "blocks.0.ffn"})()]
    provider.free.append(object())
    provider.count_in = [1, 1]  # both slots hold a unit in use
    provider.end_of = [600, 600]
    assert not provider.admits(provider.units[0], [])
    with pytest.raises(BlockSwapError, match="raise prefetch_blocks"):
        provider.take(0)


def test_slots_taken_back_and_switched_to_packing_miss_nothing():
    """Letting the slots go (an unload, another model taking the pool, the switch to
    packing once "auto" sends every unit raw) drops the copies queued for the next forward;
    the schedule goes back to them, so that forward copies them again first instead of
    missing its first unit and relearning the order."""
    model = make_toy(dim=256, ffn=512).to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) for k, v in toy_inputs(1, dim=256).items()}
    with torch.no_grad():
        expected = model(**inputs)
    swap = apply_block_swap(
        model,
        layout=toy_layout(model),
        device="cpu",
        blocks_to_swap=4,
        swap_unit="layer",
        transfer_compression=True,
    )
    assert isinstance(swap.scheduler.provider, FixedSlots)
    with torch.no_grad():
        for step in range(4):
            if step == 1:
                swap.scheduler.release_memory()
            if step == 2:  # what _begin_forward does once auto decides raw
                swap.drop_compression()
                swap._pack_slots_once_raw()
                assert isinstance(swap.scheduler.provider, PackedSlots)
            assert torch.equal(model(**inputs), expected)
            assert swap.stats.misses == 0 and swap.stats.relearned == 0, step
    swap.remove()
