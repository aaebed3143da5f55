"""The whole mechanism (packing, placeholders, slot ring, schedule learning, hooks, remove)
on CPU, where copies are synchronous but every code path runs."""

import gc

import pytest
import torch
from torch import nn

from toy_models import make_toy, streamed_budget_gb, toy_inputs, toy_layout
from comfyui_wan_blockswap.wan_blockswap import (
    BlockSwapConfigError,
    BlockSwapStateError,
    SwapConfig,
    apply_block_swap,
    get_block_swap,
    remove_block_swap,
)


def reference(model, seed):
    with torch.no_grad():
        return model(**toy_inputs(seed))


def snapshot(model):
    return {
        name: (t.detach().clone(), t.device, type(t), t.requires_grad)
        for name, t in list(model.named_parameters()) + list(model.named_buffers())
    }


CONFIGS = [
    dict(blocks_to_swap=6, prefetch_blocks=0),
    dict(blocks_to_swap=6, prefetch_blocks=1),
    dict(blocks_to_swap=3, prefetch_blocks=2),
    dict(blocks_to_swap=2, prefetch_blocks=4),  # ring larger than the swapped set
    dict(resident_blocks=(1, 3, 5), prefetch_blocks=1),
    dict(blocks_to_swap=6, offload_txt_emb=True, prefetch_blocks=1),
    dict(blocks_to_swap=4, swap_unit="layer", prefetch_blocks=1),
    dict(blocks_to_swap=6, swap_unit="layer", prefetch_blocks=0),
    dict(blocks_to_swap=0),
]


@pytest.mark.parametrize(
    "options", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
)
@pytest.mark.parametrize("vace", [0, 3])
def test_output_equal_and_remove_restores(options, vace):
    model = make_toy(vace_depth=vace)
    before = snapshot(model)
    expected = {seed: reference(model, seed) for seed in (1, 2, 3)}
    swap = apply_block_swap(model, layout=toy_layout(model), device="cpu", **options)
    with torch.no_grad():
        for seed in (1, 2, 3, 1):
            assert torch.equal(model(**toy_inputs(seed)), expected[seed])
    assert swap.stats.forwards == 4
    swap.remove()
    after = snapshot(model)
    assert before.keys() == after.keys()
    for name, (value, device, kind, grad) in before.items():
        assert torch.equal(after[name][0], value), name
        assert after[name][1:] == (device, kind, grad), name
    assert get_block_swap(model) is None


def test_swapped_tensors_are_placeholders_between_forwards():
    model = make_toy()
    swap = apply_block_swap(model, layout=toy_layout(model), device="cpu", blocks_to_swap=2)
    assert model.blocks[5].qkv.weight.numel() == 0
    assert model.blocks[5].modulation.numel() == 0
    assert model.blocks[5].scale.numel() == 0  # buffers travel with their block
    assert model.blocks[0].qkv.weight.numel() > 0
    # running a swapped block without its hook fails loudly rather than reading stale memory
    with pytest.raises((RuntimeError, ValueError)):
        with torch.no_grad():
            model.blocks[5].forward(torch.randn(1, 3, 32), torch.randn(1, 2, 32))
    swap.remove()


def test_state_dict_sees_real_weights():
    model = make_toy(vace_depth=2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    apply_block_swap(
        model, layout=toy_layout(model), device="cpu", blocks_to_swap=4, offload_txt_emb=True
    )
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    block_state = model.blocks[5].state_dict()
    assert torch.equal(block_state["qkv.weight"], expected["blocks.5.qkv.weight"])


def test_schedule_is_learned_and_prefetch_hits_after_first_forward():
    model = make_toy(vace_depth=3)  # interleaved: declared order is wrong
    swap = apply_block_swap(
        model, layout=toy_layout(model), device="cpu", blocks_to_swap=6, prefetch_blocks=1
    )
    with torch.no_grad():
        model(**toy_inputs(0))
        first = swap.stats.misses
        assert first > 0 and swap.stats.relearned == 1
        for seed in range(3):
            model(**toy_inputs(seed))
    assert swap.stats.misses == first  # no more misses once the order is learned
    # every forward copies each swapped unit exactly once (9 units > 2 slots)
    copies = swap.stats.copies
    with torch.no_grad():
        model(**toy_inputs(5))
    assert swap.stats.copies - copies == 9


def test_small_swapped_set_stays_cached_in_slots():
    model = make_toy()
    swap = apply_block_swap(
        model, layout=toy_layout(model), device="cpu", blocks_to_swap=2, prefetch_blocks=3
    )
    with torch.no_grad():
        for seed in range(4):
            model(**toy_inputs(seed))
    assert swap.stats.copies == 2  # loaded once, reused from the slots afterwards


def test_skipped_blocks_do_not_break_correctness():
    model = make_toy()
    expected = {seed: reference(model, seed) for seed in range(3)}
    swap = apply_block_swap(model, layout=toy_layout(model), device="cpu", blocks_to_swap=6)
    with torch.no_grad():
        model(**toy_inputs(0))
        # call blocks out of order and one twice, outside the model's forward
        ctx = model.text_embedding(toy_inputs(0)["context"])
        h = model.patch_embedding(toy_inputs(0)["x"])
        for index in (3, 1, 1, 5):
            h = model.blocks[index](h, ctx)
        for seed in range(3):
            assert torch.equal(model(**toy_inputs(seed)), expected[seed])
    assert swap.stats.misses > 0


@pytest.mark.parametrize("streamed", [False, True], ids=["slots", "streamed"])
def test_exception_inside_a_block_releases_and_next_run_is_correct(streamed):
    model = make_toy()
    expected = reference(model, 7)
    plan = {"vram_budget_gb": streamed_budget_gb(model, 20_000)} if streamed else {}
    swap = apply_block_swap(
        model, layout=toy_layout(model), device="cpu", **(plan or {"blocks_to_swap": 6})
    )

    class Interrupted(Exception):
        pass

    def boom(module, args):
        raise Interrupted()

    with torch.no_grad():
        model(**toy_inputs(7))
        handle = model.blocks[3].ffn.register_forward_pre_hook(boom)
        with pytest.raises(Interrupted):
            model(**toy_inputs(7))
        handle.remove()
        assert not swap.scheduler.in_use
        if streamed:
            assert swap.scheduler.provider.held_bytes <= swap.plan.window_bytes
        assert torch.equal(model(**toy_inputs(7)), expected)


def test_apply_twice_is_an_error_or_a_clean_replace():
    model = make_toy()
    expected = reference(model, 1)
    apply_block_swap(model, layout=toy_layout(model), device="cpu", blocks_to_swap=2)
    with pytest.raises(BlockSwapStateError, match="already has a block swap"):
        apply_block_swap(model, layout=toy_layout(model), device="cpu", blocks_to_swap=3)
    swap = apply_block_swap(
        model, layout=toy_layout(model), device="cpu", blocks_to_swap=3, replace=True
    )
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 3 + 1  # one pre-hook per swapped block and one on the model
    with torch.no_grad():
        assert torch.equal(model(**toy_inputs(1)), expected)
    assert remove_block_swap(model) and not remove_block_swap(model)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == 0
    swap.remove()  # idempotent


def test_bad_options_leave_the_model_untouched():
    model = make_toy()
    before = snapshot(model)
    with pytest.raises(BlockSwapConfigError, match=r"blocks_to_swap must be in 0\.\.6 .*6 blocks"):
        apply_block_swap(model, layout=toy_layout(model), device="cpu", blocks_to_swap=7)
    with pytest.raises(BlockSwapConfigError, match="either config or keyword"):
        apply_block_swap(model, SwapConfig(), layout=toy_layout(model), blocks_to_swap=1)
    with pytest.raises(BlockSwapConfigError, match="cuda"):
        if not torch.cuda.is_available():
            apply_block_swap(model, layout=toy_layout(model), device="cuda")
        else:
            raise BlockSwapConfigError("cuda available: nothing to test")
    assert get_block_swap(model) is None
    after = snapshot(model)
    assert all(torch.equal(after[k][0], v[0]) for k, v in before.items())
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_failure_while_placing_rolls_back(monkeypatch):
    from comfyui_wan_blockswap.wan_blockswap import stored_unit

    model = make_toy()
    before = snapshot(model)
    calls = {"n": 0}
    original = stored_unit.StoredUnit.pack

    def failing_pack(self, pin):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("simulated")
        return original(self, pin)

    monkeypatch.setattr(stored_unit.StoredUnit, "pack", failing_pack)
    with pytest.raises(MemoryError):
        apply_block_swap(model, layout=toy_layout(model), device="cpu", blocks_to_swap=5)
    after = snapshot(model)
    for name, (value, device, _, _) in before.items():
        assert torch.equal(after[name][0], value) and after[name][1] == device, name
    assert get_block_swap(model) is None
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_grad_mode_is_refused_with_a_clear_message():
    model = make_toy()
    apply_block_swap(model, layout=toy_layout(model), device="cpu", blocks_to_swap=2)
    with pytest.raises(BlockSwapStateError, match="no_grad"):
        model(**toy_inputs(0))
    model.requires_grad_(False)
    model(**toy_inputs(0))  # grad mode on but nothing requires grad: fine


def test_inference_mode_and_mixed_dtypes():
    model = make_toy()
    model.blocks.to(torch.bfloat16)
    for block in model.blocks:
        block.norm.float()  # mixed dtypes inside one block, one packed buffer

    def run(m, seed):
        inputs = toy_inputs(seed)
        ctx = m.text_embedding(inputs["context"]).to(torch.bfloat16)
        h = m.patch_embedding(inputs["x"]).to(torch.bfloat16)
        for block in m.blocks:
            h = block(h, ctx)
        return h

    with torch.inference_mode():
        expected = run(model, 3)
    swap = apply_block_swap(model, layout=toy_layout(model), device="cpu", blocks_to_swap=6)
    with torch.inference_mode():
        assert torch.equal(run(model, 3), expected)
        assert torch.equal(run(model, 3), expected)
    swap.remove()


def test_repeated_runs_keep_memory_flat():
    model = make_toy(dim=64, ffn=256)
    swap = apply_block_swap(model, layout=toy_layout(model), device="cpu", blocks_to_swap=6)
    with torch.no_grad():
        for seed in range(5):
            model(**toy_inputs(seed, dim=64))
    gc.collect()
    objects = len(gc.get_objects())
    tensors = sum(isinstance(o, torch.Tensor) for o in gc.get_objects())
    with torch.no_grad():
        for seed in range(50):
            model(**toy_inputs(seed, dim=64))
    gc.collect()
    assert sum(isinstance(o, torch.Tensor) for o in gc.get_objects()) <= tensors
    assert len(gc.get_objects()) <= objects + 50
    swap.remove()


def test_two_models_of_one_shape_share_slots_and_alternate_correctly():
    """Wan 2.2 A14B: high- and low-noise models run one after the other on shared slots."""
    from comfyui_wan_blockswap.wan_blockswap.slot_pool import pooled_bytes

    high, low = make_toy(seed=1), make_toy(seed=2)
    expected = {
        (name, seed): reference(m, seed)
        for name, m in (("high", high), ("low", low))
        for seed in (1, 2)
    }
    swaps = [
        apply_block_swap(m, layout=toy_layout(m), device="cpu", blocks_to_swap=5)
        for m in (high, low)
    ]
    with torch.no_grad():
        for step in range(3):
            for name, m in (("high", high), ("low", low)):
                for seed in (1, 2):
                    assert torch.equal(m(**toy_inputs(seed)), expected[(name, seed)])
            assert pooled_bytes() == swaps[0].plan.num_slots * swaps[0].plan.slot_bytes
    held = [swap.scheduler.provider.flights for swap in swaps]
    assert held[0] == [] or held[1] == []  # one holder at a time
    swaps[0].release_vram()
    swaps[1].release_vram()
    assert pooled_bytes() == 0
    with torch.no_grad():  # slots come back on the next forward
        assert torch.equal(low(**toy_inputs(1)), expected[("low", 1)])
    for swap in swaps:
        swap.remove()
    assert pooled_bytes() == 0


def test_a_layer_budget_keeps_layers_of_swapped_blocks_and_streams_the_rest():
    from comfyui_wan_blockswap.wan_blockswap import plan_for

    model = make_toy()
    expected = reference(model, 1)
    layout = toy_layout(model)
    base = plan_for(model, SwapConfig(blocks_to_swap=4, swap_unit="layer"), layout)
    budget = (base.gpu_weight_bytes + base.slot_bytes + 64) / 2**30
    plan = plan_for(model, SwapConfig(vram_budget_gb=budget, swap_unit="layer"), layout)
    assert plan.kept_layers and all(name in plan.swapped for name, _ in plan.kept_layers)
    assert plan.swapped_bytes < base.swapped_bytes

    def placeholders():
        return sum(
            leaf.weight.numel() == 0
            for leaf in model.modules()
            if isinstance(leaf, torch.nn.Linear)
        )

    def linears(name):
        return sum(isinstance(m, torch.nn.Linear) for m in model.get_submodule(name).modules())

    swap = apply_block_swap(
        model, layout=layout, device="cpu", vram_budget_gb=budget, swap_unit="layer"
    )
    # every large layer of a swapped block streams unless the plan keeps it
    assert placeholders() == sum(linears(n) for n in plan.swapped) - len(plan.kept_layers)
    for _ in range(2):
        with torch.no_grad():
            assert torch.equal(model(**toy_inputs(1)), expected)
    swap.remove()


def test_a_model_dropped_without_remove_is_freed_with_its_buffers_and_slots():
    """A host that drops a swapped model without remove() (ComfyUI switching models) must get
    the model, its host buffers and its slots back: nothing global holds it."""
    import weakref

    from comfyui_wan_blockswap.wan_blockswap.engine import _active
    from comfyui_wan_blockswap.wan_blockswap.slot_pool import pooled_bytes

    model = make_toy()
    swap = apply_block_swap(model, layout=toy_layout(model), blocks_to_swap=4, device="cpu")
    reference(model, 0)
    assert pooled_bytes() > 0
    buffers = [weakref.ref(stored.host) for stored in swap.units]
    model_ref, swap_ref = weakref.ref(model), weakref.ref(swap)
    gc.disable()  # freed by reference counting alone: no cycle waits for the collector
    try:
        del model, swap
        assert model_ref() is None and swap_ref() is None
    finally:
        gc.enable()
    assert all(buffer() is None for buffer in buffers)
    assert not any(module is not None for module in list(_active.keys()))
    assert pooled_bytes() == 0


def test_a_dropped_model_hands_its_freed_heap_back_after_the_next_collection(monkeypatch):
    """remove() trims the heap; a model dropped without it frees its buffers in __del__, and
    one trim follows at the end of the next garbage collection, however many buffers went
    (glibc keeps freed heap otherwise: RSS crept up in the soak)."""
    from comfyui_wan_blockswap.wan_blockswap import storage

    trims = []
    monkeypatch.setattr(storage, "return_freed_host_memory", lambda: trims.append(1))
    model = make_toy()
    swap = apply_block_swap(model, layout=toy_layout(model), blocks_to_swap=4, device="cpu")
    reference(model, 0)
    gc.collect()
    trims.clear()
    gc.disable()  # dropped by reference counting: the trim waits for a collection
    try:
        del model, swap
        assert trims == []
    finally:
        gc.enable()
    gc.collect()
    assert trims == [1]
    gc.collect()
    assert trims == [1]  # nothing freed since: no second trim


def test_a_handle_outliving_its_model_frees_on_remove():
    model = make_toy()
    swap = apply_block_swap(model, layout=toy_layout(model), blocks_to_swap=4, device="cpu")
    reference(model, 0)
    del model
    gc.collect()
    assert swap.model is None
    swap.remove()  # frees what the handle still holds; no error
    assert not swap.units and swap.scheduler is None
    swap.remove()  # idempotent


@pytest.mark.parametrize("window", [1, 14_000, 30_000])
@pytest.mark.parametrize("vace", [0, 3])
def test_a_streamed_plan_holds_at_most_its_window_and_matches(window, vace, monkeypatch):
    from comfyui_wan_blockswap.wan_blockswap.window_allocator import WindowAllocator

    model = make_toy(vace_depth=vace)
    before = snapshot(model)
    expected = {seed: reference(model, seed) for seed in (1, 2, 3)}
    held = []  # (bytes on the GPU after each prefetch, that unit's bytes)
    prepare = WindowAllocator.prepare

    def recording(provider, flight, stored):
        prepare(provider, flight, stored)
        held.append((provider.held_bytes, flight.held))

    monkeypatch.setattr(WindowAllocator, "prepare", recording)
    budget = streamed_budget_gb(model, window)
    swap = apply_block_swap(model, layout=toy_layout(model), device="cpu", vram_budget_gb=budget)
    assert swap.plan.window_bytes == pytest.approx(window, abs=2)
    names = {u.name for u in swap.units}
    # outside the blocks too: the embeddings' and the head's layers stream
    assert {"patch_embedding", "head", "text_embedding.2"} <= names
    assert model.head.weight.numel() == 0  # a placeholder between forwards
    with torch.no_grad():
        model(**toy_inputs(1))  # learns the order (interleaved VACE)
        misses = swap.stats.misses
        for seed in (1, 2, 3, 1):
            assert torch.equal(model(**toy_inputs(seed)), expected[seed])
    assert swap.stats.misses == misses  # every unit prefetched once the order is known
    assert all(total <= max(swap.plan.window_bytes, own) for total, own in held)
    if window > 1:  # room for two layers: prefetch overlaps use
        assert any(total > own for total, own in held)
    else:  # one at a time
        assert all(total == own for total, own in held)
    swap.remove()
    after = snapshot(model)
    for name, (value, device, kind, grad) in before.items():
        assert torch.equal(after[name][0], value), name
        assert after[name][1:] == (device, kind, grad), name


@pytest.mark.parametrize("streamed", [False, True], ids=["slots", "streamed"])
def test_a_failing_copy_hands_its_slot_back(streamed):
    from comfyui_wan_blockswap.wan_blockswap import min_vram_budget_gb

    model = make_toy()
    expected = reference(model, 4)
    floor = min_vram_budget_gb(model, toy_layout(model))
    options = {"vram_budget_gb": streamed_budget_gb(model, 14_000)} if streamed else {}
    swap = apply_block_swap(
        model, layout=toy_layout(model), device="cpu", **(options or {"blocks_to_swap": 6})
    )
    assert bool(swap.plan.window_bytes) == streamed
    assert min_vram_budget_gb(model, toy_layout(model)) == floor  # sizes from before apply

    def failing(name, views):
        if name in ("blocks.3", "blocks.3.ffn.2"):  # a block, or a layer of one
            raise RuntimeError("transform failed")

    with torch.no_grad():
        for _ in range(3):  # every time a copy fails, nothing stays taken
            swap.set_transform(failing)
            with pytest.raises(RuntimeError, match="transform failed"):
                model(**toy_inputs(4))
            swap.set_transform(None)
            assert torch.equal(model(**toy_inputs(4)), expected)
            scheduler = swap.scheduler  # no record lost: each is free, prefetched or in use
            provider = scheduler.provider
            taken = len(scheduler.ahead) + len(scheduler.in_use)
            assert provider.flights and len(provider.free) + taken == len(provider.flights)
    swap.release_vram()
    scheduler = swap.scheduler
    assert not (scheduler.pending or scheduler.ahead or scheduler.in_use)
    assert scheduler.provider.held_bytes == 0 and not scheduler.provider.flights
    with torch.no_grad():
        assert torch.equal(model(**toy_inputs(4)), expected)
    swap.remove()


def test_a_streamed_plan_takes_a_new_window_in_place():
    from comfyui_wan_blockswap.wan_blockswap import BlockSwapStateError, plan_for

    model = make_toy()
    expected = reference(model, 5)
    layout = toy_layout(model)
    wider = SwapConfig(vram_budget_gb=streamed_budget_gb(model, 30_000))
    plan = plan_for(model, wider, layout)
    slots = plan_for(model, SwapConfig(blocks_to_swap=6), layout)
    swap = apply_block_swap(
        model, layout=layout, device="cpu", vram_budget_gb=streamed_budget_gb(model, 1024)
    )
    units = list(swap.units)
    swap.set_window(plan, wider)
    assert (
        swap.units == units and swap.scheduler.provider.window_bytes == plan.window_bytes == 30_000
    )
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(**toy_inputs(5)), expected)
    with pytest.raises(BlockSwapStateError, match="streamed plan of the same layers"):
        swap.set_window(slots, SwapConfig())
    swap.remove()


def test_wrapper_tensor_weights_swap_as_their_inner_tensors():
    """comfy-kitchen's QuantizedTensor (current ComfyUI's scaled fp8): its fp8 bytes and scale
    are stored and streamed, it is rebuilt over them for each use, and remove() gives the
    same weights back ([Note: wrapper tensors])."""
    tensor_module = pytest.importorskip("comfy_kitchen.tensor")
    from comfyui_wan_blockswap.wan_blockswap.units import leaves

    model = make_toy(depth=4)
    for block in model.blocks:
        for linear in (block.qkv, block.ffn[0]):
            q = tensor_module.QuantizedTensor.from_float(linear.weight.data, "TensorCoreFP8Layout")
            linear.weight = nn.Parameter(q, requires_grad=False)
    inputs = toy_inputs(3)
    with torch.no_grad():
        expected = model(**inputs)
    stored = {n: [t.clone() for t in leaves(w)] for n, w in model.named_parameters()}
    swap = apply_block_swap(model, layout=toy_layout(model), device="cpu", blocks_to_swap=3)
    unit = next(u for u in swap.units if any(t is not None for t in u.templates))
    assert len(unit.pieces) > len(unit.tensors)  # fp8 bytes and scales are pieces
    qkv = model.blocks[1].qkv.weight
    assert isinstance(qkv, tensor_module.QuantizedTensor) and qkv._qdata.numel() == 0
    assert swap.plan.swapped_bytes < sum(p.numel() * 4 for p in model.parameters())
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(**inputs), expected)
    swap.remove()
    for name, weight in model.named_parameters():
        assert all(torch.equal(a, b) for a, b in zip(leaves(weight), stored[name])), name
    with torch.no_grad():
        assert torch.equal(model(**inputs), expected)


def test_each_memory_provider_names_its_own_fix_when_it_is_full():
    """Fixed slots run out when modules nest deeper than the look-ahead; a window has no
    prefetch_blocks to raise, so it must not suggest it."""
    from types import SimpleNamespace

    from comfyui_wan_blockswap.wan_blockswap import BlockSwapError
    from comfyui_wan_blockswap.wan_blockswap.fixed_slots import FixedSlots
    from comfyui_wan_blockswap.wan_blockswap.streams import DeviceStreams
    from comfyui_wan_blockswap.wan_blockswap.window_allocator import WindowAllocator

    streams = DeviceStreams(torch.device("cpu"))
    unit = SimpleNamespace(name="blocks.0")
    with pytest.raises(BlockSwapError, match="raise prefetch_blocks"):
        FixedSlots(streams, [unit], num_slots=2, slot_bytes=64).take(0)
    with pytest.raises(BlockSwapError, match="vram_budget_gb") as error:
        WindowAllocator(streams, [unit], window_bytes=1024, lookahead_bytes=1).take(0)
    assert "prefetch_blocks" not in str(error.value)


def _bf16_blocks_of_an_fp16_toy():
    """(reference, model): an fp16 toy whose weights are bf16 values, and a copy keeping its
    blocks' tensors in bf16 (as a host that casts at use keeps a bf16 file's weights)."""
    import copy

    reference = make_toy()
    with torch.no_grad():
        for tensor in list(reference.parameters()) + list(reference.buffers()):
            tensor.data = tensor.data.to(torch.bfloat16).to(torch.float16)
    model = copy.deepcopy(reference)
    with torch.no_grad():
        for tensor in list(model.blocks.parameters()) + list(model.blocks.buffers()):
            tensor.data = tensor.data.to(torch.bfloat16)
    return reference, model


def test_a_transform_may_leave_tensors_in_another_dtype_of_their_size():
    """[Note: a transform may change a view's dtype] bf16 blocks whose transform rewrites each
    tensor as fp16 in its own bytes compute as the fp16 model, for every copy; between uses
    they are the layout's bf16 placeholders again."""
    reference, model = _bf16_blocks_of_an_fp16_toy()
    inputs = {k: v.to(torch.float16) for k, v in toy_inputs(4).items()}
    with torch.no_grad():
        expected = reference(**inputs)
    swap = apply_block_swap(model, layout=toy_layout(model), device="cpu", blocks_to_swap=6)

    def as_fp16(unit_name, tensors):
        for tensor in tensors:
            tensor.view(torch.float16).copy_(tensor.to(torch.float16))
        return [torch.float16] * len(tensors)

    swap.set_transform(as_fp16)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(**inputs), expected)
    assert model.blocks[0].qkv.weight.dtype == torch.bfloat16  # a placeholder between uses
    swap.set_transform(lambda unit_name, tensors: [torch.float16])  # one for several
    with pytest.raises(Exception, match="returned 1 dtypes"):
        with torch.no_grad():
            model(**inputs)
    swap.remove()
