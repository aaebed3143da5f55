"""Lossless transfer compression: the codec bit for bit, a unit's pieces, and the engine with
compression on (CPU here; ``test_cuda_engine.py`` runs it on the GPU's three streams)."""

import logging
import threading
import time

import pytest
import torch

from toy_models import make_toy, toy_inputs, toy_layout
from comfyui_wan_blockswap.wan_blockswap import (
    SwapConfig,
    apply_block_swap,
    bf16_codec,
    compressed_transfer,
    get_block_swap,
)
from comfyui_wan_blockswap.wan_blockswap.storage import PackedLayout


def bits(tensor):
    return tensor.contiguous().view(torch.int16)


def roundtrip(weights):
    encoded = bf16_codec.encode_chunk(weights)
    if encoded is None:
        return None, None
    packed = torch.zeros(encoded.nbytes, dtype=torch.uint8)
    encoded.write(packed)
    out = torch.empty(2 * weights.numel(), dtype=torch.uint8)
    bf16_codec.decode_chunk(
        packed, weights.numel(), encoded.window, encoded.exception_index.numel(), out
    )
    return out.view(torch.bfloat16), encoded


@pytest.mark.parametrize("n", [1, 2, 3, 1000, 4097, 65537])
def test_codec_is_exact_on_trained_like_weights(n):
    gen = torch.Generator().manual_seed(n)
    weights = (torch.randn(n, generator=gen) / 64).to(torch.bfloat16)
    decoded, encoded = roundtrip(weights)
    assert torch.equal(bits(decoded), bits(weights))
    if n >= 1000:  # the gain is real: 1.5 bytes per weight plus few exceptions
        assert encoded.nbytes < 0.77 * 2 * n


def test_codec_is_exact_on_special_values_and_every_exponent():
    every_high_byte = torch.arange(256, dtype=torch.int32).repeat_interleave(2)
    every_low_byte = torch.arange(512, dtype=torch.int32) % 256
    pattern = ((every_high_byte << 8) | every_low_byte).to(torch.int16)  # every bit pattern kind
    gen = torch.Generator().manual_seed(0)
    bulk = (torch.randn(40000, generator=gen) / 30).to(torch.bfloat16).view(torch.int16)
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40, 3e38],
        dtype=torch.bfloat16,
    ).view(torch.int16)
    weights = torch.cat([bulk[:20000], pattern, specials, bulk[20000:]]).view(torch.bfloat16)
    decoded, encoded = roundtrip(weights)
    assert torch.equal(bits(decoded), bits(weights))
    assert encoded.exception_index.numel() > 0


def test_a_chunk_without_a_dominant_window_travels_raw():
    gen = torch.Generator().manual_seed(0)
    spread = torch.randint(-(2**15), 2**15, (4096,), generator=gen, dtype=torch.int16)
    spread = spread.view(torch.bfloat16)
    assert bf16_codec.encode_chunk(spread) is None
    assert bf16_codec.max_packed_nbytes(1000) >= bf16_codec.packed_nbytes(1000, 15)


def decode_pieces(transfer, nbytes):
    """What the ring does on the GPU, on the CPU: every piece into one slot buffer."""
    slot = torch.zeros(nbytes, dtype=torch.uint8)
    host = transfer.host.tensor
    for piece in transfer.pieces:
        source = host[piece.host_offset : piece.host_offset + piece.host_nbytes]
        target = slot[piece.slot_offset : piece.slot_offset + piece.slot_nbytes]
        if piece.packed:
            bf16_codec.decode_chunk(
                source.clone(), piece.slot_nbytes // 2, piece.window, piece.exceptions, target
            )
        else:
            target.copy_(source)
    return slot


def test_a_unit_splits_into_packed_chunks_and_raw_runs(monkeypatch):
    monkeypatch.setattr(compressed_transfer, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(compressed_transfer, "MIN_PACKED_ELEMENTS", 500)
    gen = torch.Generator().manual_seed(1)
    weights = [
        (torch.randn(50, 50, generator=gen) / 50).to(torch.bfloat16),  # 3 packed chunks
        torch.randn(7, generator=gen),  # float32: raw
        torch.randn(9, generator=gen).to(torch.bfloat16),  # small: raw, same run as above
        torch.randint(-(2**15), 2**15, (3000,), generator=gen, dtype=torch.int16).view(
            torch.bfloat16
        ),  # random bits: no window, 3 raw chunks
        (torch.randn(1001, generator=gen) / 9).to(torch.bfloat16),  # odd tail chunk of 1
    ]
    layout = PackedLayout.of((w.size(), w.dtype) for w in weights)
    transfer = compressed_transfer.CompressedTransfer.encode(
        layout, weights, pin=False, work_device=torch.device("cpu")
    )
    packed = [p for p in transfer.pieces if p.packed]
    assert len(packed) == 3 + 2
    assert len([p for p in transfer.pieces if not p.packed]) == 1 + 3  # one run, 3 raw chunks
    assert transfer.nbytes < layout.nbytes
    slot = decode_pieces(transfer, layout.nbytes)
    for view, weight in zip(layout.views(slot), weights):
        assert torch.equal(view.view(torch.uint8), weight.view(torch.uint8)), weight.dtype
    transfer.free()


@pytest.fixture
def small_chunks(monkeypatch):
    """Toy tensors are tiny: let them pack, in several chunks each."""
    monkeypatch.setattr(compressed_transfer, "CHUNK_ELEMENTS", 1024)
    monkeypatch.setattr(compressed_transfer, "MIN_PACKED_ELEMENTS", 256)


def bf16_toy(vace=0):
    return make_toy(vace_depth=vace).to(torch.bfloat16).requires_grad_(False)


def bf16_inputs(seed):
    return toy_inputs(seed, dtype=torch.bfloat16)


def swap_toy(model, **options):
    """A toy model's block swap (CPU) with ``options``."""
    return apply_block_swap(model, layout=toy_layout(model), device="cpu", **options)


@pytest.mark.parametrize(
    "options",
    [
        dict(blocks_to_swap=6, prefetch_blocks=1),
        dict(blocks_to_swap=3, prefetch_blocks=2, offload_txt_emb=True),
        dict(blocks_to_swap=6, swap_unit="layer", prefetch_blocks=0),
    ],
    ids=str,
)
@pytest.mark.parametrize("vace", [0, 3])
def test_outputs_state_dict_and_restore_equal_with_compression(small_chunks, options, vace):
    model = bf16_toy(vace)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = [model(**bf16_inputs(seed)) for seed in (1, 2)]
    swap = swap_toy(model, transfer_compression=True, **options)
    assert swap.plan.staging_bytes == compressed_transfer.staging_bytes() > 0
    assert swap.plan.gpu_weight_bytes == swap.plan.resident_bytes + swap.plan.ring_bytes
    assert all(u.transfer is not None for u in swap.units)
    with torch.no_grad():
        for seed in (1, 2, 1):
            assert torch.equal(model(**bf16_inputs(seed)), expected[seed - 1])
    state = model.state_dict()
    for key, value in before.items():
        assert torch.equal(state[key], value), key
    sent = swap.stats.bytes_copied
    raw = sum(u.nbytes for u in swap.units) * swap.stats.copies / len(swap.units)
    assert sent < 0.85 * raw  # the bytes over the link shrank
    swap.remove()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
        assert value.device.type == "cpu"


def test_compression_without_bf16_weights_reserves_nothing(small_chunks):
    model = make_toy()  # float32
    plain = swap_toy(model, blocks_to_swap=4)
    plan = plain.plan
    plain.remove()
    swap = swap_toy(
        model,
        blocks_to_swap=4,
        transfer_compression=True,
    )
    assert swap.plan == plan and swap.plan.staging_bytes == 0
    assert all(u.transfer is None for u in swap.units)


def test_a_budget_pays_for_the_staging(small_chunks):
    model = bf16_toy()
    sizes_plan = swap_toy(model, blocks_to_swap=3)
    budget = sizes_plan.plan.gpu_weight_bytes / 2**30
    sizes_plan.remove()
    swap = swap_toy(
        model,
        vram_budget_gb=budget + compressed_transfer.staging_bytes() / 2**30,
        transfer_compression=True,
    )
    assert swap.plan.gpu_weight_bytes <= (budget * 2**30) + compressed_transfer.staging_bytes()
    assert "staging" in swap.plan.describe()


def test_the_option_is_validated():
    with pytest.raises(Exception, match="transfer_compression"):
        SwapConfig(transfer_compression="yes")


def test_dropping_compression_mid_run_keeps_outputs_and_weights(small_chunks):
    model = bf16_toy(vace=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = [model(**bf16_inputs(seed)) for seed in (1, 2)]
    swap = swap_toy(model, blocks_to_swap=5, transfer_compression=True)
    with torch.no_grad():
        assert torch.equal(model(**bf16_inputs(1)), expected[0])
        assert swap.compressed
        swap.drop_compression()
        assert not swap.compressed and all(u.host is not None for u in swap.units)
        for seed in (2, 1):
            assert torch.equal(model(**bf16_inputs(seed)), expected[seed - 1])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    swap.remove()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("limit", ["units", "bytes"])
def test_dropping_compression_copies_units_on_threads_a_batch_at_a_time(
    small_chunks, monkeypatch, caplog, limit
):
    """The raw copies of a compression drop run on several threads, a batch at a time (at
    most HOST_THREADS units and HOST_BATCH_BYTES); the callback after each batch (the mapped
    file's page drop) never runs while a copy does. A unit whose copy fails stays
    compressed, the others of its batch go raw, and the error surfaces as a warning (the
    copy's, not the page drop's) with the later batches left compressed."""
    from comfyui_wan_blockswap.wan_blockswap import stored_unit
    from comfyui_wan_blockswap.wan_blockswap.errors import BlockSwapError

    if limit == "units":
        monkeypatch.setattr(stored_unit, "HOST_THREADS", 2)
    else:  # two units' bytes, and one byte short of three
        size = swap_toy(bf16_toy(), blocks_to_swap=1).units[0].layout.nbytes
        monkeypatch.setattr(stored_unit, "HOST_BATCH_BYTES", 3 * size - 1)
    lock, running, threads, events = threading.Lock(), [0], set(), []
    drop = stored_unit.StoredUnit.drop_compression

    def watched(self):
        with lock:
            running[0] += 1
            threads.add(threading.current_thread().name)
        time.sleep(0.02)  # long enough for the batch's other copy to start
        try:
            if getattr(self, "fail", False):
                raise BlockSwapError("cudaHostRegister failed (a test)")
            drop(self)
        finally:
            with lock:
                running[0] -= 1
                events.append("copy")

    def after_batch():
        assert running[0] == 0
        events.append("drop pages")

    monkeypatch.setattr(stored_unit.StoredUnit, "drop_compression", watched)
    model = bf16_toy()
    with torch.no_grad():
        expected = model(**bf16_inputs(1))
    swap = swap_toy(model, blocks_to_swap=5, transfer_compression=True)
    swap._after_weights_read = after_batch
    assert len(swap.units) == 5
    swap.drop_compression()
    assert events == ["copy", "copy", "drop pages"] * 2 + ["copy", "drop pages"]
    assert not swap.compressed
    # a batch of two on two threads of its own, the last unit on the caller's
    assert threads == {"blockswap-raw_0", "blockswap-raw_1", threading.current_thread().name}
    assert {u.layout.nbytes for u in swap.units} == {swap.units[0].layout.nbytes}
    model2 = bf16_toy()
    swap2 = swap_toy(model2, blocks_to_swap=5, transfer_compression=True)

    def failing_after_batch():
        after_batch()
        raise RuntimeError("the page drop failed too")

    swap2._after_weights_read = failing_after_batch
    swap2.units[1].fail = True
    events.clear()
    with caplog.at_level(logging.WARNING, logger="wan_blockswap"):
        swap2.drop_compression()
    assert events == ["copy", "copy", "drop pages"]  # the first batch only
    assert "cudaHostRegister failed (a test)" in caplog.text
    assert [u.transfer is not None for u in swap2.units] == [False, True, True, True, True]
    with torch.no_grad():
        assert torch.equal(model(**bf16_inputs(1)), expected)
        assert torch.equal(model2(**bf16_inputs(1)), expected)


def test_host_threads_have_the_swaps_gpu_current_and_need_no_batches_without_page_drops(
    small_chunks, monkeypatch
):
    """Every call ``_in_threads`` makes, one alone on the caller's thread too, runs with the
    swap's GPU current (page-locking with another current would make a context there); a
    compression drop with no page drop to make runs its units without batches."""
    import contextlib

    from comfyui_wan_blockswap.wan_blockswap import stored_unit

    entered, ran = [], []

    @contextlib.contextmanager
    def device(index):
        entered.append(index)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    gpu = torch.device("cuda", 1)
    stored_unit._in_threads([lambda: ran.append(1)], "blockswap-test", gpu)
    stored_unit._in_threads([lambda: ran.append(2), lambda: ran.append(3)], "blockswap-test", gpu)
    assert sorted(ran) == [1, 2, 3] and entered == [1, 1, 1]
    entered.clear()
    stored_unit._in_threads([lambda: ran.append(4)], "blockswap-test", torch.device("cpu"))
    assert entered == []

    def no_batches(units):
        raise AssertionError("batches without a page drop")

    monkeypatch.setattr(stored_unit, "_batches", no_batches)
    model = bf16_toy()
    with torch.no_grad():
        expected = model(**bf16_inputs(1))
    swap = swap_toy(model, blocks_to_swap=5, transfer_compression=True)
    swap.drop_compression()
    assert not swap.compressed
    with torch.no_grad():
        assert torch.equal(model(**bf16_inputs(1)), expected)


def test_auto_on_cpu_stays_compressed(small_chunks):
    """Auto times forwards on the GPU; on the CPU there is no link to save, and it behaves as
    on (the mechanism still runs for the suite)."""
    model = bf16_toy()
    swap = swap_toy(model, blocks_to_swap=4, transfer_compression="auto")
    with torch.no_grad():
        for seed in (1, 2, 3):
            model(**bf16_inputs(seed))
    assert swap.compressed and swap.plan.staging_bytes > 0


@pytest.mark.parametrize("setting", ["auto", True])
def test_auto_sends_raw_where_the_packed_copies_would_not_fit_in_ram(
    small_chunks, monkeypatch, caplog, setting
):
    """The node's default is "auto": a plan whose packed copies do not fit in host RAM
    beside the weights runs raw, with a warning, instead of failing the prompt; "on" is a
    demand and still fails, naming the widget, with nothing applied."""
    from comfyui_wan_blockswap.wan_blockswap import InsufficientMemoryError, memory

    model = bf16_toy()
    with torch.no_grad():
        expected = model(**bf16_inputs(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swapped = sum(t.numel() * t.element_size() for t in model.blocks.parameters())
    # room for one unit in flight (what a raw plan adds), not for the packed copies
    monkeypatch.setattr(memory, "available_host_bytes", lambda: swapped // 4)
    if setting is True:
        with pytest.raises(InsufficientMemoryError, match="transfer_compression off"):
            swap_toy(model, blocks_to_swap=6, transfer_compression=True)
        assert get_block_swap(model) is None
        assert all(not m._forward_pre_hooks for m in model.modules())
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
        return
    with caplog.at_level("WARNING", logger="wan_blockswap"):
        swap = swap_toy(model, blocks_to_swap=6, transfer_compression=setting)
    assert not swap.plan.compressed and not swap.compressed and swap.plan.staging_bytes == 0
    assert swap.config.transfer_compression is False
    assert "host RAM" in caplog.text and "raw instead" in caplog.text
    with torch.no_grad():
        assert torch.equal(model(**bf16_inputs(1)), expected)
    swap.remove()


def test_a_new_window_keeps_the_raw_transfers_auto_fell_back_to(small_chunks, monkeypatch):
    """ComfyUI's auto re-plans a streamed swap's window with the node's config ("auto"): the
    swap keeps sending raw, and says so in its plan and config."""
    from comfyui_wan_blockswap.wan_blockswap import memory, min_vram_budget_gb, plan_for
    from toy_models import streamed_budget_gb

    model = bf16_toy()
    swapped = sum(t.numel() * t.element_size() for t in model.blocks.parameters())
    monkeypatch.setattr(memory, "available_host_bytes", lambda: swapped // 4)
    budget = streamed_budget_gb(model, 20_000)
    swap = swap_toy(model, vram_budget_gb=budget, transfer_compression="auto")
    assert swap.plan.kind == "streamed" and not swap.plan.compressed
    wider = SwapConfig(
        vram_budget_gb=streamed_budget_gb(model, 21_000), transfer_compression="auto"
    )
    plan = plan_for(model, wider, toy_layout(model))
    assert plan.kind == "streamed" and plan.compressed and plan.window_bytes
    swap.set_window(plan, wider)
    assert swap.plan.window_bytes == plan.window_bytes
    assert not swap.plan.compressed and swap.plan.staging_bytes == 0
    assert swap.config.transfer_compression is False and not swap.compressed
    assert min_vram_budget_gb(model, toy_layout(model)) <= budget
    swap.remove()


def test_a_skeleton_filled_after_apply_is_packed_from_what_was_filled(small_chunks):
    reference = bf16_toy()
    state = reference.state_dict()
    with torch.no_grad():
        expected = reference(**bf16_inputs(1))
    with torch.device("meta"):
        skeleton = make_toy().to(torch.bfloat16).requires_grad_(False)
    swap = swap_toy(
        skeleton,
        blocks_to_swap=4,
        transfer_compression=True,
    )
    assert not any(u.transfer is not None for u in swap.units)  # nothing to pack yet
    with torch.no_grad():
        for key, value in state.items():
            swap.destination(key).copy_(value)
        assert torch.equal(skeleton(**bf16_inputs(1)), expected)
        assert all(u.transfer is not None for u in swap.units)  # sealed at first use
        # writing a swapped weight again drops its packed copy; the next use packs anew
        block = swap.units[0]
        name = block.unit.tensors[0].qualname
        swap.destination(name).mul_(2)
        assert block.transfer is None
        changed = skeleton(**bf16_inputs(1))
        assert block.transfer is not None and not torch.equal(changed, expected)
        swap.destination(name).div_(2)
        assert torch.equal(skeleton(**bf16_inputs(1)), expected)


def test_nothing_is_packed_when_only_resident_weights_are_bf16(small_chunks):
    model = make_toy().requires_grad_(False)  # float32 blocks: nothing swapped is packable
    model.text_embedding.to(torch.bfloat16)  # resident bf16
    swap = swap_toy(
        model,
        blocks_to_swap=4,
        transfer_compression=True,
    )
    assert swap.plan.staging_bytes == 0
    assert all(u.transfer is None and not u.compress for u in swap.units)


class _Clock:
    """A stand-in for a CUDA event recorded ``at`` ms after a common origin."""

    def __init__(self, at: float) -> None:
        self.at = at

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "_Clock") -> float:
        return end.at - self.at


def _timed(switch, forward_ms: float, copies_ms: float, raw_bytes: int = 100) -> bool | None:
    """What ``switch`` says after a timed forward of ``forward_ms`` whose copies of
    ``raw_bytes`` (sent raw) took ``copies_ms``."""
    switch.forwards = 2  # as begin() leaves it for the timed forward
    switch.events = (_Clock(0.0), _Clock(forward_ms))
    switch.copies = [(_Clock(0.0), _Clock(copies_ms), raw_bytes)]
    switch.raw_bytes, switch.ended = raw_bytes, True
    return switch.keep_compression()


@pytest.mark.parametrize(
    "forwards, verdict",
    [
        ([64.0], True),  # copies exposed: decided at once
        ([110.0, 70.0], True),  # one slow forward, then one that shows the copies exposed
        ([110.0, 120.0], None),  # two compute-bound verdicts: not yet
        ([110.0, 130.0, 105.0], False),  # three in a row: raw transfers
    ],
)
def test_auto_switches_to_raw_only_after_every_timed_forward_found_compute_bound(forwards, verdict):
    """Noise only slows a forward: one slow forward (an H100 arm's 110 ms against 96 ms of
    raw copies, beside forwards of 64-76 ms) must not make a copy-bound model send raw."""
    from comfyui_wan_blockswap.wan_blockswap.compression_switch import (
        SWITCH_VERDICTS,
        CompressionAutoSwitch,
    )

    assert SWITCH_VERDICTS == 3
    switch = CompressionAutoSwitch(torch.device("cpu"))
    said = [_timed(switch, ms, copies_ms=96.0) for ms in forwards]
    assert said[:-1] == [None] * (len(forwards) - 1)
    assert said[-1] is verdict
    assert switch.decided == (verdict is not None)
    if verdict is None:  # the next forward is timed as well
        assert switch.events is None and switch.forwards == 1
    assert switch.keep_compression() is None  # decided once, or waiting for a timed forward


def test_the_switch_keeps_the_fastest_link_rate_its_timed_copies_ran_at():
    """What preset "auto" in ComfyUI weighs a plan's copies by ([Note: copies hidden behind
    compute] in callbacks/copy_headroom.py): bytes per ms of the timed copies, the fastest."""
    from comfyui_wan_blockswap.wan_blockswap.compression_switch import CompressionAutoSwitch

    switch = CompressionAutoSwitch(torch.device("cpu"))
    assert switch.bytes_per_ms == 0.0
    _timed(switch, 110.0, copies_ms=50.0, raw_bytes=1000)  # 20 bytes per ms
    _timed(switch, 120.0, copies_ms=100.0, raw_bytes=1000)  # 10: slower, not kept
    assert switch.bytes_per_ms == 20.0


def test_a_slot_plan_takes_its_whole_ring_on_the_device_once_its_pool_exists(small_chunks):
    """Slots and the staging of compressed copies come in one pool, taken at the first
    forward: what a host must count as held (the model's own ``ring_bytes_held`` counts slots
    only, and only while this model holds the pool)."""
    from comfyui_wan_blockswap.wan_blockswap import slot_pool

    model = bf16_toy()
    swap = swap_toy(model, blocks_to_swap=4, transfer_compression=True)
    plan = swap.plan
    assert plan.kind == "slots" and plan.staging_bytes > 0
    assert swap.ring_bytes_on_device() == 0  # no pool before the first forward
    with torch.no_grad():
        model(**bf16_inputs(1))
    assert swap.ring_bytes_on_device() == plan.ring_bytes == slot_pool.pooled_bytes()
    assert swap.ring_bytes_held() == plan.ring_bytes - plan.staging_bytes
    swap.remove()
    assert slot_pool.pooled_bytes() == 0
