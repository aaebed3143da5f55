"""``BlockSwap.replan``: a new plan's size without packing again what both plans swap
([Note: re-planning in place]). Outputs stay bit-identical, units swapped under both plans
keep their storage, remove() still gives every weight back, and an interrupt at any line
leaves the model re-planned or whole."""

from __future__ import annotations

import copy

import pytest
import torch

from comfyui_wan_blockswap.wan_blockswap import (
    BlockSwapStateError,
    InsufficientHostMemoryError,
    SwapConfig,
    apply_block_swap,
    get_block_swap,
)
from comfyui_wan_blockswap.wan_blockswap import compressed_transfer
from comfyui_wan_blockswap.wan_blockswap.engine import BlockSwap
from comfyui_wan_blockswap.wan_blockswap.model_sizes import choose_units
from comfyui_wan_blockswap.wan_blockswap.plan import plan_swap
from test_transactional_apply import Injected, LineInterrupter, assert_untouched, snapshot
from toy_models import make_toy, streamed_budget_gb, toy_inputs, toy_layout


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Toy tensors are tiny: let them pack under transfer compression."""
    monkeypatch.setattr(compressed_transfer, "CHUNK_ELEMENTS", 1024)
    monkeypatch.setattr(compressed_transfer, "MIN_PACKED_ELEMENTS", 256)


def _apply(model, **options) -> BlockSwap:
    """As ComfyUI's adapter applies it: resident weights stay where the host put them."""
    return BlockSwap.apply(
        model, SwapConfig(**options), toy_layout(model), torch.device("cpu"), move_resident=False
    )


def _toy():
    """bf16, so that transfer compression has weights to pack."""
    return make_toy().to(torch.bfloat16)


def _outputs(model, seeds=(1, 2)):
    with torch.no_grad():
        return [model(**toy_inputs(seed, dtype=torch.bfloat16)) for seed in seeds]


def _storage(swap: BlockSwap) -> dict:
    """Each swapped unit's object and the memory its weights live in."""
    return {s.name: (s, [v.data_ptr() for v in s.host_views], s.transfer) for s in swap.units}


STREAMED = "streamed"
REPLANS = {
    "fewer_blocks": (dict(blocks_to_swap=5), dict(blocks_to_swap=2)),
    "more_blocks": (dict(blocks_to_swap=2), dict(blocks_to_swap=5)),
    "none_swapped": (dict(blocks_to_swap=4), dict(blocks_to_swap=0)),
    "from_none": (dict(blocks_to_swap=0), dict(blocks_to_swap=3)),
    "blocks_to_layers": (dict(blocks_to_swap=4), dict(blocks_to_swap=4, swap_unit="layer")),
    "embedding_and_slots": (
        dict(blocks_to_swap=3, offload_txt_emb=True, prefetch_blocks=2),
        dict(blocks_to_swap=5, prefetch_blocks=0),
    ),
    "slots_to_streamed": (dict(blocks_to_swap=4), STREAMED),
    "compressed": (
        dict(blocks_to_swap=2, transfer_compression=True),
        dict(blocks_to_swap=4, transfer_compression=True),
    ),
}


def _options(model, options) -> dict:
    if options == STREAMED:
        return dict(vram_budget_gb=streamed_budget_gb(model, 30_000))
    return options


@pytest.mark.parametrize("case", sorted(REPLANS))
def test_replan_keeps_what_both_plans_swap_and_outputs_stay_equal(case):
    model = _toy()
    before = snapshot(model)
    expected = _outputs(model)
    first, second = (_options(model, o) for o in REPLANS[case])
    swap = _apply(model, **first)
    assert any(s.transfer is not None for s in swap.units) == (case == "compressed")
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model), expected))
    stored_before = _storage(swap)
    new_config = SwapConfig(**{**second, "transfer_compression": swap.config.transfer_compression})
    counts = swap.replan(new_config)
    assert get_block_swap(model) is swap
    assert swap.plan == plan_swap(swap.sizes, new_config)
    now = _storage(swap)
    both = stored_before.keys() & now.keys()
    assert counts.kept == len(both)
    assert counts.packed == len(now.keys() - both)
    assert counts.restored == len(stored_before.keys() - both)
    for name in both:  # the same object over the same memory: nothing packed again
        assert now[name][0] is stored_before[name][0], name
        assert now[name][1] == stored_before[name][1], name
        assert now[name][2] is stored_before[name][2], name
    # in the order the plan chooses them: the schedule's order
    assert [s.name for s in swap.units] == [
        u.name for u in choose_units(swap._candidates, swap.plan)
    ]
    for _ in range(2):  # the second run follows the learned order
        assert all(torch.equal(a, b) for a, b in zip(_outputs(model), expected))
    for stored in swap.units:  # the name index follows the new units
        for index, ref in enumerate(stored.unit.tensors):
            assert swap.swapped_tensor(ref.qualname) == (stored, index), ref.qualname
    # weights the new plan keeps on the GPU are the same objects with their values
    swapped_now = {ref.qualname for s in swap.units for ref in s.unit.tensors}
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    back = [
        ref.qualname
        for name in stored_before.keys() - both
        for ref in stored_before[name][0].unit.tensors
        if ref.qualname not in swapped_now
    ]
    assert bool(back) == (case not in ("more_blocks", "from_none", "compressed"))
    for name in back:
        assert swap.swapped_tensor(name) is None, name
        obj, values = before[name][:2]
        assert tensors[name] is obj and torch.equal(tensors[name], values), name
    swap.remove()
    assert_untouched(model, before)


def test_replan_keeps_raw_transfers_once_compression_auto_dropped_them():
    model = _toy()
    expected = _outputs(model)
    swap = _apply(model, blocks_to_swap=2, transfer_compression=True)
    assert all(s.transfer is not None for s in swap.units)
    swap.drop_compression()
    swap.replan(SwapConfig(blocks_to_swap=5, transfer_compression=True))
    assert len(swap.units) == 5 and all(s.transfer is None for s in swap.units)
    assert not swap.plan.compressed and swap.plan.staging_bytes == 0
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model), expected))
    swap.remove()


def test_replan_sends_new_units_raw_where_their_packed_copies_do_not_fit(monkeypatch):
    """transfer_compression="auto" gives way to RAM as apply does: units swapped anew travel
    raw, the ones kept stay packed, the staging stays for them."""
    from comfyui_wan_blockswap.wan_blockswap import memory

    model = _toy()
    expected = _outputs(model)
    swap = _apply(model, blocks_to_swap=2, transfer_compression="auto")
    packed = {s.name for s in swap.units}
    assert all(s.transfer is not None for s in swap.units)
    largest = max(s.nbytes for s in swap.units)
    monkeypatch.setattr(memory, "available_host_bytes", lambda: largest + 1)  # raw fits only
    swap.replan(SwapConfig(blocks_to_swap=4, transfer_compression="auto"))
    assert {s.name for s in swap.units if s.transfer is not None} == packed
    assert len(swap.units) == 4 and swap.plan.staging_bytes > 0
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model), expected))
    monkeypatch.setattr(memory, "available_host_bytes", lambda: 1)  # not even raw
    with pytest.raises(InsufficientHostMemoryError):
        swap.replan(SwapConfig(blocks_to_swap=6, transfer_compression="auto"))
    assert len(swap.units) == 4  # nothing changed
    swap.remove()


def test_replan_after_a_partial_switch_to_raw_keeps_staging_for_units_still_packed():
    """drop_compression leaves units it could not pin packed; a re-plan keeps their staging
    and sends only the new units raw."""
    model = _toy()
    expected = _outputs(model)
    swap = _apply(model, blocks_to_swap=2, transfer_compression=True)
    swap.units[0].drop_compression()  # as if pinning failed for the second unit
    swap._compression_dropped = True
    still = swap.units[1].name
    swap.replan(SwapConfig(blocks_to_swap=4, transfer_compression=True))
    assert [s.name for s in swap.units if s.transfer is not None] == [still]
    assert swap.plan.compressed and swap.plan.staging_bytes > 0
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(_outputs(model), expected))
    swap.remove()


class _Switch:
    """Stands for CompressionAutoSwitch (which times forwards on a GPU): never decides."""

    def __init__(self, device):
        self.decided = False

    def begin(self, *args):
        pass

    def end(self, *args):
        pass

    def keep_compression(self):
        return None


def test_auto_compression_is_watched_from_the_re_plan_that_first_packs(monkeypatch):
    """transfer_compression="auto": a swap whose first plan packed nothing gets its switch
    when a re-plan packs; an undecided switch goes when a re-plan leaves nothing packed (it
    would find every forward compute-bound and drop compression for later plans), a decided
    one stays."""
    from comfyui_wan_blockswap.wan_blockswap import engine

    monkeypatch.setattr(engine, "_times_forwards", lambda device: True)
    monkeypatch.setattr(engine, "CompressionAutoSwitch", _Switch)
    model = _toy()
    expected = _outputs(model)
    swap = _apply(model, blocks_to_swap=0, transfer_compression="auto")
    assert swap._auto is None
    swap.replan(SwapConfig(blocks_to_swap=3, transfer_compression="auto"))
    first = swap._auto
    assert isinstance(first, _Switch) and all(s.transfer is not None for s in swap.units)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model), expected))
    swap.replan(SwapConfig(blocks_to_swap=0, transfer_compression="auto"))
    assert swap._auto is None
    swap.replan(SwapConfig(blocks_to_swap=3, transfer_compression="auto"))
    assert swap._auto is not None and swap._auto is not first
    swap._auto.decided = True
    decided = swap._auto
    swap.replan(SwapConfig(blocks_to_swap=0, transfer_compression="auto"))
    assert swap._auto is decided
    swap.remove()


@pytest.mark.parametrize("window", [6_000, 9_000, 14_000, 30_000])
def test_units_a_re_plan_packs_anew_travel_as_a_fresh_apply_would_send_them(window):
    """Whether a unit travels packed in a streamed window depends on the unit before it;
    one that stays swapped holds placeholders, so its stored size counts."""
    model = _toy()
    target = dict(vram_budget_gb=streamed_budget_gb(model, window), transfer_compression=True)
    fresh = _apply(copy.deepcopy(model), **target)
    packs = {s.name: s.transfer is not None for s in fresh.units}
    fresh.remove()
    swap = _apply(model, blocks_to_swap=6, transfer_compression=True)
    kept = {s.name for s in swap.units}
    swap.replan(SwapConfig(**target))
    new = {s.name: s.transfer is not None for s in swap.units if s.name not in kept}
    assert new and new == {name: packs[name] for name in new}
    swap.remove()


def test_replan_refuses_what_it_cannot_do_and_changes_nothing():
    model = _toy()
    expected = _outputs(model)
    swap = _apply(model, blocks_to_swap=3)
    plan, units = swap.plan, list(swap.units)
    with pytest.raises(BlockSwapStateError, match=r"but non_blocking, chunk_tokens changed too"):
        swap.replan(SwapConfig(blocks_to_swap=2, chunk_tokens=8, non_blocking=False))
    assert swap.plan is plan and swap.units == units
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model), expected))
    swap.remove()
    with pytest.raises(BlockSwapStateError, match="removed: apply a new one"):
        swap.replan(SwapConfig(blocks_to_swap=2))

    # a swap that moved resident weights itself: restored units would land off the device
    moved = _toy()
    resident_swap = apply_block_swap(moved, layout=toy_layout(moved), device="cpu")
    resident_swap._moved.append(object())  # stands for a tensor it moved to a GPU
    with pytest.raises(BlockSwapStateError, match="moved no resident weight"):
        resident_swap.replan(SwapConfig(blocks_to_swap=2))
    resident_swap._moved.clear()
    resident_swap.remove()


READ_STRIDE = 37


# Small plans of a 4-block toy: every line of the write phase is a trial
INTERRUPTED = {
    "fewer_blocks": (dict(blocks_to_swap=3), dict(blocks_to_swap=1)),
    "more_blocks": (dict(blocks_to_swap=1), dict(blocks_to_swap=3)),
    # one block goes back, the other is swapped as its layers from now on
    "blocks_to_layers": (dict(blocks_to_swap=2), dict(blocks_to_swap=1, swap_unit="layer")),
}


@pytest.mark.parametrize("case", sorted(INTERRUPTED))
def test_an_interrupt_at_any_line_of_replan_leaves_the_model_replanned_or_whole(case):
    template = make_toy(dim=16, ffn=32, depth=4).to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) for k, v in toy_inputs(0, dim=16).items()}
    with torch.no_grad():
        expected = template(**inputs)
    first, second = INTERRUPTED[case]

    # Up to _detach replan only reads (plan, choose, check): every READ_STRIDE-th line there
    # is enough; from _detach on, every line.
    probe = copy.deepcopy(template)
    swap = _apply(probe, **first)
    detach, starts = BlockSwap._detach, []
    with LineInterrupter(0, Injected()) as counter:

        def noted_detach(self):
            starts.append(counter.lines)
            return detach(self)

        BlockSwap._detach = noted_detach
        try:
            swap.replan(SwapConfig(**second))
        finally:
            BlockSwap._detach = detach
    swap.remove()
    writes = starts[0]
    assert counter.lines - writes > 30, (writes, counter.lines)
    trials = [*range(1, writes, READ_STRIDE), *range(writes, counter.lines + 1)]

    model = copy.deepcopy(template)
    before = snapshot(model)
    outcomes = {"replanned": 0, "removed": 0}
    for at in trials:
        swap = _apply(model, **first)
        with LineInterrupter(at, Injected()):
            try:
                swap.replan(SwapConfig(**second))
            except Injected:
                pass
            finally:  # see the same line in test_transactional_apply
                torch.set_grad_enabled(True)
        if get_block_swap(model) is None:
            outcomes["removed"] += 1
        else:
            assert get_block_swap(model) is swap
            with torch.no_grad():
                assert torch.equal(model(**inputs), expected), at
            outcomes["replanned"] += 1
            swap.remove()
        assert_untouched(model, before)
    assert outcomes["replanned"] and outcomes["removed"], outcomes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["fewer_blocks", "more_blocks", "slots_to_streamed", "compressed"])
def test_replan_on_cuda_keeps_pinned_storage_and_outputs(case):
    """On a GPU, with the model there before apply (nothing for the swap to move): pinned
    buffers of units both plans swap stay, outputs stay bit-identical, and remove() gives
    every pinned byte back."""
    from comfyui_wan_blockswap.wan_blockswap.storage import registered_host_bytes

    pinned_before = registered_host_bytes()
    model = _toy().cuda()
    inputs = {k: v.cuda() for k, v in toy_inputs(3, dtype=torch.bfloat16).items()}
    with torch.no_grad():
        expected = model(**inputs)
    first, second = (_options(model, o) for o in REPLANS[case])
    device = torch.device("cuda", torch.cuda.current_device())  # as apply_block_swap gives it
    swap = BlockSwap.apply(model, SwapConfig(**first), toy_layout(model), device)
    assert not swap._moved
    before = _storage(swap)
    swap.replan(SwapConfig(**second))
    now = _storage(swap)
    for name in before.keys() & now.keys():
        assert now[name][0] is before[name][0] and now[name][1] == before[name][1], name
    for _ in range(3):
        with torch.no_grad():
            assert torch.equal(model(**inputs), expected)
    swap.remove()
    assert registered_host_bytes() == pinned_before
    assert all(t.device.type == "cuda" for t in model.parameters())


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "compressed"])
def test_units_going_back_point_at_the_origin_given_instead_of_a_copy(compress, monkeypatch):
    """A host that keeps its own copy of the weights (ComfyUI's loader) names it: the units a
    re-plan keeps on the device point at that memory, with no copy out of host memory in
    between; a tensor the origin cannot stand for (another dtype) is copied as before."""
    from comfyui_wan_blockswap.wan_blockswap import stored_unit

    model = _toy()
    expected = _outputs(model)
    origins = {name: t.detach().clone() for name, t in model.state_dict().items()}
    odd = "blocks.0.qkv.weight"
    origins[odd] = origins[odd].float()  # cannot stand for a bf16 weight
    swap = _apply(model, blocks_to_swap=5, transfer_compression=compress)
    copies = []
    copy_with_strides = stored_unit.copy_with_strides

    def counting(values, *args):
        copies.append(tuple(values.shape))
        return copy_with_strides(values, *args)

    monkeypatch.setattr(stored_unit, "copy_with_strides", counting)
    counts = swap.replan(SwapConfig(blocks_to_swap=1, transfer_compression=compress), origins.get)
    assert counts.restored == 4
    weights = dict(model.named_parameters())
    for block in range(4):  # blocks 0-3 left the swap (spread keeps the last one)
        for name in ("qkv.weight", "proj.bias", "ffn.2.weight"):
            key = f"blocks.{block}.{name}"
            if key != odd:
                assert weights[key].data_ptr() == origins[key].data_ptr(), key
    assert weights[odd].data_ptr() != origins[odd].data_ptr()
    assert copies == [tuple(origins[odd].shape)]
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model), expected))
    swap.remove()
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model), expected))
