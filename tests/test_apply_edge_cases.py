"""Edge cases of apply and remove: a block reached twice, the autograd guard over every
swapped tensor, and odd tensor layouts (transposed, sliced, expanded) given back exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from comfyui_wan_blockswap.model_configs.base import BlockListLayout, ModelLayout
from comfyui_wan_blockswap.wan_blockswap import (
    BlockSwapConfigError,
    BlockSwapStateError,
    apply_block_swap,
    get_block_swap,
)
from toy_models import make_toy, toy_inputs, toy_layout

PLANS = [
    dict(blocks_to_swap=4),
    dict(blocks_to_swap=4, prefetch_blocks=2),
    dict(blocks_to_swap=4, swap_unit="layer"),
    dict(blocks_to_swap=4, transfer_compression=True),
]


def test_a_block_repeated_in_its_list_is_refused_and_nothing_changes():
    model = make_toy(depth=4)
    model.blocks[2] = model.blocks[1]
    with pytest.raises(BlockSwapConfigError, match=r"blocks\.2 and blocks\.1 are the same module"):
        apply_block_swap(model, layout=toy_layout(model), device="cpu", blocks_to_swap=4)
    assert get_block_swap(model) is None
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    "lists",
    [("blocks", "blocks"), ("blocks", "blocks.1")],
    ids=["list named twice", "a block named as a list"],
)
def test_a_layout_that_reaches_a_block_twice_is_refused(lists):
    model = make_toy(depth=4)
    model.blocks[1].inner = nn.ModuleList([nn.Linear(4, 4)])
    paths = lists if lists[1] != "blocks.1" else ("blocks", "blocks.1.inner")
    layout = ModelLayout(name="twice", block_lists=tuple(BlockListLayout(p) for p in paths))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BlockSwapConfigError, match="every block must be a module of its own"):
        apply_block_swap(model, layout=layout, device="cpu", blocks_to_swap=5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_submodule_shared_by_two_blocks_stays_resident_and_outputs_match():
    model = make_toy(depth=4)
    model.blocks[2].norm = model.blocks[1].norm  # tied, not a repeated block
    x = toy_inputs(0)
    with torch.no_grad():
        expected = model(**x)
    swap = apply_block_swap(model, layout=toy_layout(model), device="cpu", blocks_to_swap=4)
    with torch.no_grad():
        assert torch.equal(model(**x), expected)
    swap.remove()
    with torch.no_grad():
        assert torch.equal(model(**x), expected)


def test_the_autograd_guard_sees_every_swapped_tensor():
    model = make_toy(depth=4).requires_grad_(False)
    x = toy_inputs(0)
    swap = apply_block_swap(model, layout=toy_layout(model), device="cpu", blocks_to_swap=4)
    model(**x)  # nothing requires grad: runs with grad mode on
    model.blocks[3].ffn[2].bias.requires_grad_(True)  # the last tensor of the last block
    with pytest.raises(BlockSwapStateError, match=r"blocks\.3\.ffn\.2\.bias .*requires grad"):
        model(**x)
    with torch.no_grad():
        model(**x)  # fine without grad mode
    swap.remove()


def _odd_layouts(model: nn.Module) -> None:
    block = model.blocks[1]
    block.qkv.weight = nn.Parameter(block.qkv.weight.detach().t().contiguous().t())
    block.modulation = nn.Parameter(torch.randn(1, 32).expand(2, 32))
    block.proj.weight = nn.Parameter(torch.randn(32, 64)[:, ::2])
    model.blocks[3].register_buffer("scale", torch.randn(1).expand(32))
    model.requires_grad_(False)


@pytest.mark.parametrize("options", PLANS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_remove_gives_back_strides_values_and_expanded_storage(options):
    model = make_toy(depth=4)
    _odd_layouts(model)
    tensors = dict(list(model.named_parameters()) + list(model.named_buffers()))
    before = {
        name: (t, t.stride(), t.untyped_storage().nbytes(), t.detach().clone())
        for name, t in tensors.items()
    }
    x = toy_inputs(0)
    with torch.no_grad():
        expected = model(**x)
    swap = apply_block_swap(model, layout=toy_layout(model), device="cpu", **options)
    with torch.no_grad():
        assert torch.equal(model(**x), expected)
    swap.remove()
    after = dict(list(model.named_parameters()) + list(model.named_buffers()))
    for name, (obj, stride, storage, values) in before.items():
        tensor = after[name]
        assert tensor is obj and tensor.stride() == stride, name
        assert torch.equal(tensor, values), name
        if 0 in stride:  # an expanded tensor stays as small as it was
            assert tensor.untyped_storage().nbytes() <= storage, name
    with torch.no_grad():
        assert torch.equal(model(**x), expected)


@pytest.mark.parametrize("blocks_to_swap", [0, 2])
def test_one_ram_check_counts_resident_weights_on_the_cpu(monkeypatch, blocks_to_swap):
    """A skeleton computed on the CPU puts every weight in RAM, swapped or not: with nothing
    swapped the old check counted nothing and the allocator failed later instead."""
    from comfyui_wan_blockswap.wan_blockswap import InsufficientMemoryError, memory
    from toy_models import ToyDiT

    with torch.device("meta"):
        model = ToyDiT(dim=64, ffn=256, depth=4)
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    monkeypatch.setattr(memory, "available_host_bytes", lambda: total // 2)
    with pytest.raises(InsufficientMemoryError, match="On the CPU every weight lives in host RAM"):
        apply_block_swap(
            model, layout=toy_layout(model), device="cpu", blocks_to_swap=blocks_to_swap
        )
    assert get_block_swap(model) is None
    assert all(t.device.type == "meta" for t in model.parameters())
    monkeypatch.setattr(memory, "available_host_bytes", lambda: total + 2**20)
    apply_block_swap(
        model, layout=toy_layout(model), device="cpu", blocks_to_swap=blocks_to_swap
    ).remove(restore=False)
