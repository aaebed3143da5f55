"""Reliability on CPU (the CI-sized version of benchmarks/reliability_benchmark.py): memory
returns to its baseline after long runs and repeated apply/remove and load/unload cycles;
allocation failures are clear errors that leave the model usable."""

import gc

import pytest
import torch

from comfyui_wan_blockswap.callbacks.lazy_loader import load_swapped
from writers import random_state, write_safetensors
from comfyui_wan_blockswap.model_configs.wan import comfy_state_shapes
from toy_models import make_toy, toy_inputs, toy_layout
from comfyui_wan_blockswap.wan_blockswap.measure import rss_bytes
from comfyui_wan_blockswap.wan_blockswap import (
    InsufficientMemoryError,
    apply_block_swap,
    registered_host_bytes,
)
from comfyui_wan_blockswap.wan_blockswap.slot_pool import pooled_bytes


def settle() -> int:
    gc.collect()
    return rss_bytes()


def test_soak_forwards_and_apply_remove_cycles_return_to_baseline():
    model = make_toy(dim=256, ffn=1024)  # ~20 MB of blocks: growth would show
    x = toy_inputs(0, dim=256)
    with torch.no_grad():
        expected = model(**x)
    for _ in range(3):  # warm allocator caches before the baseline
        apply_block_swap(model, layout=toy_layout(model), device="cpu", blocks_to_swap=6).remove()
    baseline = settle()
    for cycle in range(20):
        swap = apply_block_swap(
            model,
            layout=toy_layout(model),
            device="cpu",
            blocks_to_swap=1 + cycle % 6,
            prefetch_blocks=cycle % 3,
        )
        with torch.no_grad():
            runs = 100 if cycle == 0 else 2
            for _ in range(runs):
                out = model(**x)
        assert torch.equal(out, expected)
        swap.remove()
    after = settle()
    assert registered_host_bytes() == 0 and pooled_bytes() == 0
    assert after <= baseline * 1.01 + 4 * 2**20, (baseline, after)


def test_load_unload_cycles_return_to_baseline(tmp_path):
    path = tmp_path / "wan.safetensors"
    write_safetensors(random_state(comfy_state_shapes(128, 512, 4, text_dim=32, freq_dim=16)), path)
    for _ in range(2):
        model, swap, _ = load_swapped(str(path), device="cpu", blocks_to_swap=3)
        swap.remove(restore=False)
    baseline = settle()
    for _ in range(10):
        model, swap, _ = load_swapped(str(path), device="cpu", blocks_to_swap=3)
        swap.remove(restore=False)
        del model
    after = settle()
    assert after <= baseline * 1.01 + 4 * 2**20, (baseline, after)


def test_slot_allocation_failure_is_clear_and_the_model_stays_usable(monkeypatch):
    from comfyui_wan_blockswap.wan_blockswap import slot_pool

    model = make_toy()
    x = toy_inputs(1)
    with torch.no_grad():
        expected = model(**x)
    swap = apply_block_swap(model, layout=toy_layout(model), device="cpu", blocks_to_swap=4)
    real = slot_pool.SlotPool

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(slot_pool, "SlotPool", no_memory)
    with pytest.raises(InsufficientMemoryError, match="prefetch_blocks"):
        with torch.no_grad():
            model(**x)
    monkeypatch.setattr(slot_pool, "SlotPool", real)
    with torch.no_grad():
        assert torch.equal(model(**x), expected)
    swap.remove()


def test_placement_failure_is_clear_and_changes_nothing(monkeypatch):
    from comfyui_wan_blockswap.wan_blockswap import stored_unit

    model = make_toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def no_memory(self, pin):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(stored_unit.StoredUnit, "allocate", no_memory)
    with pytest.raises(InsufficientMemoryError, match="Nothing was changed"):
        apply_block_swap(model, layout=toy_layout(model), device="cpu", blocks_to_swap=4)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
