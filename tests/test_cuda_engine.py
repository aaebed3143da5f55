"""The engine on a real GPU: equality under fresh random inputs at several prefetch depths
(to catch stream races), no host synchronisation on the hot path, VRAM within the plan,
nothing left behind. Run once with the default allocator and once with
``PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync`` (ComfyUI's default)."""

import copy
import gc
import os

import pytest
import torch

from toy_models import make_toy, streamed_budget_gb, toy_inputs, toy_layout
from comfyui_wan_blockswap.wan_blockswap.measure import rss_bytes
from comfyui_wan_blockswap.wan_blockswap import (
    apply_block_swap,
    compressed_transfer,
    registered_host_bytes,
)

pytestmark = pytest.mark.cuda

DIM, FFN = 512, 2048  # ~6 MB per block: copies take long enough for races to show
MIB = 2**20


def cuda_toy(vace=0):
    return make_toy(vace_depth=vace, dim=DIM, ffn=FFN).to(torch.bfloat16).requires_grad_(False)


def inputs(seed):
    return toy_inputs(seed, device="cuda", dtype=torch.bfloat16, dim=DIM, tokens=256)


def swap_toy(model, **options):
    """A toy model's block swap onto the GPU with ``options``."""
    return apply_block_swap(model, layout=toy_layout(model), device="cuda", **options)


@pytest.fixture(params=[False, True], ids=["raw", "compressed"])
def compress(request, monkeypatch):
    """Run the test with and without transfer compression; compressed, the toy's weights go
    in chunks of 64 Ki weights, so staging buffers rotate several times per block."""
    if request.param:
        monkeypatch.setattr(compressed_transfer, "CHUNK_ELEMENTS", 1 << 16)
    return request.param


def test_allocator_backend_matches_environment():
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    torch.empty(1, device="cuda")
    expected = "cudaMallocAsync" if "cudaMallocAsync" in conf else "native"
    assert torch.cuda.get_allocator_backend() == expected


@pytest.mark.parametrize("prefetch", [0, 1, 2, 3])
@pytest.mark.parametrize("vace", [0, 3])
@pytest.mark.parametrize("swap_unit", ["block", "layer"])
def test_equal_to_unswapped_with_fresh_inputs(prefetch, vace, swap_unit, compress):
    model = cuda_toy(vace)
    reference = copy.deepcopy(model).cuda()
    swap = swap_toy(
        model,
        blocks_to_swap=5,
        offload_txt_emb=True,
        prefetch_blocks=prefetch,
        swap_unit=swap_unit,
        transfer_compression=compress,
    )
    assert all((u.transfer is not None) == compress for u in swap.units)
    with torch.inference_mode():
        for step in range(12):
            x = inputs(1000 * prefetch + step)
            assert torch.equal(model(**x), reference(**x)), f"step {step}"
    swap.remove()


def test_no_host_sync_on_the_hot_path(compress):
    model = cuda_toy()
    swap = swap_toy(
        model,
        blocks_to_swap=6,
        transfer_compression=compress,
    )
    x = inputs(0)
    with torch.inference_mode():
        model(**x)  # first forward learns the order
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                model(**x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    swap.remove()


def unswapped_run(model, x):
    """Run ``model`` on the GPU (a warm-up, then measured), move it back to the CPU; returns
    its output, its activations' peak bytes and the memory allocated without its weights."""
    model.cuda()
    with torch.inference_mode():
        model(**x)  # warm-up: cuBLAS workspaces and the like are allocated once
    torch.cuda.synchronize()
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    base_with_weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        expected = model(**x)
    activations = torch.cuda.max_memory_allocated() - base_with_weights
    model.cpu()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    assert baseline <= base_with_weights - weights + expected.numel() * 2 + 4096
    return expected, activations, baseline


def test_peak_vram_within_plan_and_everything_freed(compress):
    model = cuda_toy()
    x = inputs(1)
    expected, activations, baseline = unswapped_run(model, x)
    host_baseline = registered_host_bytes()

    torch.cuda.reset_peak_memory_stats()
    swap = swap_toy(
        model,
        blocks_to_swap=6,
        transfer_compression=compress,
    )
    with torch.inference_mode():
        for _ in range(3):
            assert torch.equal(model(**x), expected)
    peak = torch.cuda.max_memory_allocated() - baseline
    allowed = (swap.plan.gpu_weight_bytes + activations) * 1.05 + expected.numel() * 2
    assert peak <= allowed, (peak, swap.plan.gpu_weight_bytes, activations)
    pinned = registered_host_bytes() - host_baseline
    if compress:  # only the packed form is pinned
        assert pinned == sum(u.transfer.host.nbytes for u in swap.units)
        assert pinned < 0.8 * swap.plan.swapped_bytes
    else:
        assert pinned >= swap.plan.swapped_bytes
    swap.remove()
    del expected
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= baseline + 4096
    assert registered_host_bytes() == host_baseline


def test_pinned_host_memory_costs_its_bytes():
    model = make_toy(dim=2048, ffn=8192, depth=4).to(torch.bfloat16).requires_grad_(False)
    keep = [t.data for t in model.parameters()]  # originals stay: RSS growth is the buffers
    gc.collect()
    before = rss_bytes()
    swap = swap_toy(model, blocks_to_swap=4)
    grown = rss_bytes() - before
    swapped = swap.plan.swapped_bytes
    assert swapped > 200 * 2**20
    assert swapped * 0.9 <= grown <= swapped * 1.02 + 16 * 2**20, (grown, swapped)
    swap.remove()
    del keep


@pytest.mark.parametrize("streamed", [False, True], ids=["slots", "streamed"])
def test_100_forwards_keep_memory_flat(compress, streamed):
    model = cuda_toy()
    plan = {"vram_budget_gb": streamed_budget_gb(model, 4 * MIB)} if streamed else {}
    swap = swap_toy(
        model,
        blocks_to_swap=None if streamed else 6,
        transfer_compression=compress,
        **plan,
    )
    assert bool(swap.plan.window_bytes) == streamed
    x = inputs(3)
    with torch.inference_mode():
        for _ in range(5):
            model(**x)
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        host = registered_host_bytes()
        for _ in range(100):
            out = model(**x)
        del out
        torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= allocated
    assert registered_host_bytes() == host
    swap.remove()


def test_two_models_alternating_on_shared_slots_with_fresh_inputs():
    from comfyui_wan_blockswap.wan_blockswap.slot_pool import pooled_bytes

    high, low = cuda_toy(), make_toy(seed=5, dim=DIM, ffn=FFN).to(torch.bfloat16).requires_grad_(
        False
    )
    refs = {id(high): copy.deepcopy(high).cuda(), id(low): copy.deepcopy(low).cuda()}
    baseline = torch.cuda.memory_allocated()
    swaps = [swap_toy(m, blocks_to_swap=6) for m in (high, low)]
    with torch.inference_mode():
        for step in range(10):
            for m in (high, low):
                x = inputs(500 + step)
                assert torch.equal(m(**x), refs[id(m)](**x)), step
    assert pooled_bytes() == swaps[0].plan.num_slots * swaps[0].plan.slot_bytes
    del x  # the last inputs, not part of the baseline
    for swap in swaps:
        swap.remove()
    torch.cuda.synchronize()
    assert pooled_bytes() == 0
    assert torch.cuda.memory_allocated() <= baseline


def test_a_model_dropped_without_remove_gives_back_pinned_and_device_memory():
    model = cuda_toy()
    x = inputs(4)
    gc.collect()
    torch.cuda.synchronize()
    baseline, host_baseline = torch.cuda.memory_allocated(), registered_host_bytes()
    swap = swap_toy(model, blocks_to_swap=6)
    with torch.inference_mode():
        for _ in range(3):
            out = model(**x)  # the last forward leaves a prefetch for the next one in flight
    assert registered_host_bytes() > host_baseline
    del model, swap, out
    gc.collect()
    torch.cuda.synchronize()
    assert registered_host_bytes() == host_baseline
    assert torch.cuda.memory_allocated() <= baseline + 4096


@pytest.mark.parametrize("margin, keeps", [(1e9, True), (0.0, False)])
def test_auto_compression_decides_after_the_timed_forwards(monkeypatch, margin, keeps):
    """With a huge margin every forward counts as copy-bound (keep compressing after the
    second), with none as compute-bound (switch to raw, pinned, after the second to fourth
    all found so); outputs stay equal across the switch."""
    from comfyui_wan_blockswap.wan_blockswap import compression_switch

    monkeypatch.setattr(compressed_transfer, "CHUNK_ELEMENTS", 1 << 16)
    monkeypatch.setattr(compression_switch, "COMPUTE_BOUND_MARGIN", margin)
    model = cuda_toy(vace=3)
    reference = copy.deepcopy(model).cuda()
    host_baseline = registered_host_bytes()
    swap = swap_toy(
        model,
        blocks_to_swap=5,
        transfer_compression="auto",
    )
    with torch.inference_mode():
        first_raw = 1 + compression_switch.SWITCH_VERDICTS  # 0-based: the fifth forward
        for step in range(6):
            x = inputs(500 + step)
            assert torch.equal(model(**x), reference(**x)), f"step {step}"
            assert swap.compressed == (keeps or step < first_raw), step
    if not keeps:  # each vote came from a forward whose copies were timed
        votes = swap._auto.compute_bound
        assert len(votes) == compression_switch.SWITCH_VERDICTS
        assert all(raw_ms > 0 for _, raw_ms in votes), votes
    pinned = registered_host_bytes() - host_baseline
    if keeps:
        assert pinned == sum(u.transfer.host.nbytes for u in swap.units)
    else:
        assert pinned == sum(u.host.nbytes for u in swap.units) >= swap.plan.swapped_bytes
    assert swap.scheduler.copy_clock is None  # only the timed forwards' copies were clocked
    swap.remove()
    assert registered_host_bytes() == host_baseline


def test_shared_slots_with_one_model_switched_to_raw_never_race(monkeypatch):
    """Wan 2.2 A14B-like: two models share one slot pool, one compressed, the other switched
    to raw (what auto does). Slow decodes (a sleep before each) make a compressed unit's last
    writes outlast the next raw copy into the same slot unless that copy waits for them."""
    from comfyui_wan_blockswap.wan_blockswap import bf16_codec

    monkeypatch.setattr(compressed_transfer, "CHUNK_ELEMENTS", 1 << 16)
    decode = bf16_codec.decode_chunk

    def slow_decode(*args, **kwargs):
        torch.cuda._sleep(2_000_000)  # ~1 ms of GPU time on the decode stream
        decode(*args, **kwargs)

    monkeypatch.setattr(bf16_codec, "decode_chunk", slow_decode)
    high = cuda_toy()
    low = make_toy(seed=5, dim=DIM, ffn=FFN).to(torch.bfloat16).requires_grad_(False)
    refs = {id(high): copy.deepcopy(high).cuda(), id(low): copy.deepcopy(low).cuda()}
    swaps = [swap_toy(m, blocks_to_swap=6, transfer_compression=True) for m in (high, low)]
    assert swaps[0].slot_pool_key() == swaps[1].slot_pool_key()
    swaps[1].drop_compression()
    with torch.inference_mode():
        for step in range(12):
            for m in (high, low):
                x = inputs(700 + step)
                assert torch.equal(m(**x), refs[id(m)](**x)), step
    for swap in swaps:
        swap.remove()


@pytest.mark.parametrize("window", [1024, 3 * MIB, 4 * MIB])
@pytest.mark.parametrize("vace", [0, 3])
def test_streamed_plan_equal_to_unswapped_with_fresh_inputs(window, vace, compress):
    model = cuda_toy(vace)
    reference = copy.deepcopy(model).cuda()
    swap = swap_toy(
        model, vram_budget_gb=streamed_budget_gb(model, window), transfer_compression=compress
    )
    assert swap.plan.window_bytes  # below the slot plans (2 slots of a 2 MiB layer, embeddings)
    # packed units hold their staging while in flight: only those that then fit are packed
    packed = [u for u in swap.units if u.transfer is not None]
    assert bool(packed) == (compress and window > 1024)
    with torch.inference_mode():
        for step in range(12):
            x = inputs(window % 1000 + 10 * vace + step)
            assert torch.equal(model(**x), reference(**x)), f"step {step}"
    swap.remove()


def test_streamed_plan_peak_vram_no_host_sync_and_everything_freed(compress):
    model = cuda_toy()
    x = inputs(3)
    expected, activations, baseline = unswapped_run(model, x)
    torch.cuda.reset_peak_memory_stats()
    budget = streamed_budget_gb(model, 4 * MIB)
    swap = swap_toy(model, vram_budget_gb=budget, transfer_compression=compress)
    with torch.inference_mode():
        assert torch.equal(model(**x), expected)  # learns the order
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                out = model(**x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(out, expected)
    peak = torch.cuda.max_memory_allocated() - baseline
    allowed = (swap.plan.gpu_weight_bytes + activations) * 1.05 + expected.numel() * 2
    assert peak <= allowed, (peak, swap.plan.gpu_weight_bytes, activations)
    assert peak < 0.6 * sum(t.numel() * t.element_size() for t in model.state_dict().values())
    swap.remove()
    del out
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= baseline + 4096


def test_streamed_plan_forwards_on_changing_streams_stay_equal(compress):
    """Layers prefetched under one stream and used under another still wait for each
    other: the memory goes back to the stream it came from only after its last use."""
    model = cuda_toy()
    reference = copy.deepcopy(model).cuda()
    budget = streamed_budget_gb(model, 4 * MIB)
    swap = swap_toy(model, vram_budget_gb=budget, transfer_compression=compress)
    side = torch.cuda.Stream()
    with torch.inference_mode():
        for step in range(8):
            x = inputs(700 + step)
            expected = reference(**x)
            stream = side if step % 2 else torch.cuda.current_stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = model(**x)
            torch.cuda.current_stream().wait_stream(stream)
            assert torch.equal(out, expected), f"step {step}"
    swap.remove()


def test_wrapper_tensor_weights_stream_and_rebuild_on_the_gpu():
    """comfy-kitchen's QuantizedTensor weights (current ComfyUI's scaled fp8) stream as their
    fp8 bytes and scale, and each use rebuilds them on the GPU: outputs equal the unswapped
    model's with the same weights, bit for bit ([Note: wrapper tensors])."""
    tensor_module = pytest.importorskip("comfy_kitchen.tensor")

    def quantized_toy():  # built twice: a QuantizedTensor does not deep-copy
        model = cuda_toy(0)
        for block in model.blocks:
            for linear in (block.qkv, block.ffn[0]):
                q = tensor_module.QuantizedTensor.from_float(
                    linear.weight.data, "TensorCoreFP8Layout"
                )
                linear.weight = torch.nn.Parameter(q, requires_grad=False)
        return model

    model, reference = quantized_toy(), quantized_toy().cuda()
    swap = swap_toy(model, blocks_to_swap=5, prefetch_blocks=1)
    for seed in range(3):
        with torch.no_grad():
            assert torch.equal(model(**inputs(seed)), reference(**inputs(seed)))
    weight = model.blocks[-1].qkv.weight
    assert isinstance(weight, tensor_module.QuantizedTensor) and weight._qdata.numel() == 0
    swap.remove()
    with torch.no_grad():
        assert torch.equal(model.cuda()(**inputs(7)), reference(**inputs(7)))
