"""Swapped blocks stored on a donor device (issue #19): the options, the checks against this
machine, and the storage path itself. On the CPU the storage path runs with the donor
stand-in on the CPU; the peer-to-peer run needs two GPUs and skips without them."""

import pytest
import torch

from toy_models import make_toy, streamed_budget_gb, toy_inputs, toy_layout
from comfyui_wan_blockswap.wan_blockswap import (
    BlockSwapConfigError,
    SwapConfig,
    apply_block_swap,
    get_block_swap,
)
from comfyui_wan_blockswap.wan_blockswap import compressed_transfer, engine
from comfyui_wan_blockswap.wan_blockswap.storage import DeviceBuffer, HostBuffer


def outputs(model, seeds=(1, 2, 1), dtype=torch.float32):
    with torch.no_grad():
        return [model(**toy_inputs(seed, dtype=dtype)) for seed in seeds]


def weights(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def test_the_donor_options_are_checked_and_spelled_one_way():
    assert SwapConfig().storage_entries == SwapConfig(donor_allocation="cpu,*").storage_entries
    assert not SwapConfig().stores_on_donor_gpus
    config = SwapConfig(donor_allocation=" CUDA:1 , 8GB ; cpu,* ")
    assert config.donor_allocation == "cuda:1,8gb;cpu,*" and config.stores_on_donor_gpus
    assert SwapConfig(donor_device="CUDA").donor_device == "cuda:0"
    with pytest.raises(BlockSwapConfigError, match="not both"):
        SwapConfig(donor_device="cuda:1", donor_allocation="cuda:1,*")
    with pytest.raises(BlockSwapConfigError, match="gpu1"):
        SwapConfig(donor_device="gpu1")
    with pytest.raises(BlockSwapConfigError, match="cuda:1,8gb;cpu,\\*"):
        SwapConfig(donor_allocation="cuda:1;cpu")
    with pytest.raises(BlockSwapConfigError, match="donor_allocation must be a string"):
        SwapConfig(donor_allocation=8)


@pytest.mark.parametrize("options", [dict(donor_allocation="cpu,*"), dict(donor_device="cpu")])
def test_host_memory_named_explicitly_is_the_default(options):
    model = make_toy()
    expected = outputs(model)
    swap = apply_block_swap(
        model, layout=toy_layout(model), device="cpu", blocks_to_swap=6, **options
    )
    assert swap.storage is None
    assert all(isinstance(u.host, HostBuffer) for u in swap.units)
    assert all(map(torch.equal, outputs(model), expected))
    swap.remove()


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="this machine has a second GPU")
def test_a_donor_this_machine_lacks_is_refused_before_anything_changes():
    model = make_toy()
    before = weights(model)
    with pytest.raises(BlockSwapConfigError, match="cuda:1 does not exist.*donor_device='cpu'"):
        apply_block_swap(
            model,
            layout=toy_layout(model),
            device="cpu",
            blocks_to_swap=6,
            donor_allocation="cuda:1,1gb;cpu,*",
        )
    assert get_block_swap(model) is None
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def plan_options(model, streamed: bool) -> dict:
    """Every block swapped through fixed slots, or every layer streamed in a small window."""
    if not streamed:
        return dict(blocks_to_swap=6)
    return dict(
        vram_budget_gb=streamed_budget_gb(model, 4 * max(p.nbytes for p in model.parameters()))
    )


def _store_every_other_unit_on(device, monkeypatch):
    """Have the engine store every other swapped unit on ``device`` as if it were a donor
    GPU (the planner's choice is tested on its own in test_donor_allocation.py)."""

    def stores(plan, units):
        return [torch.device(device) if i % 2 else None for i in range(units)]

    monkeypatch.setattr(engine, "storage_devices", stores)


@pytest.mark.parametrize("streamed", [False, True])
def test_units_stored_on_a_device_run_equal_and_come_back(streamed, monkeypatch):
    """The storage path of a donor: raw bytes in a DeviceBuffer, copied into the slots or
    the window like host memory, restored bit for bit by remove()."""
    _store_every_other_unit_on("cpu", monkeypatch)
    # toy tensors are tiny: let them pack (bf16), so host-stored units travel packed
    monkeypatch.setattr(compressed_transfer, "CHUNK_ELEMENTS", 1024)
    monkeypatch.setattr(compressed_transfer, "MIN_PACKED_ELEMENTS", 256)
    model = make_toy().to(torch.bfloat16).requires_grad_(False)
    before = weights(model)
    expected = outputs(model, dtype=torch.bfloat16)
    options = plan_options(model, streamed)
    swap = apply_block_swap(
        model, layout=toy_layout(model), device="cpu", transfer_compression=True, **options
    )
    on_device = [u for u in swap.units if isinstance(u.host, DeviceBuffer)]
    on_host = [u for u in swap.units if not isinstance(u.host, DeviceBuffer)]
    assert on_device and on_host
    # a donor's units travel raw: packing relieves the host link, not a peer copy
    assert all(u.transfer is None for u in on_device)
    assert any(u.transfer is not None for u in on_host)
    assert all(map(torch.equal, outputs(model, dtype=torch.bfloat16), expected))
    state = model.state_dict()  # the real weights, wherever they are stored
    assert all(torch.equal(state[k], before[k]) for k in before)
    swap.remove()
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="a donor GPU needs a second CUDA device"
)


@needs_two_gpus
@pytest.mark.parametrize("streamed", [False, True])
def test_blocks_on_a_second_gpu_give_the_single_gpu_outputs(streamed):
    model = make_toy()
    reference = make_toy()
    reference.load_state_dict(model.state_dict())
    single = apply_block_swap(
        reference, layout=toy_layout(reference), device="cuda:0", blocks_to_swap=6
    )
    with torch.no_grad():
        expected = [reference(**toy_inputs(s, device="cuda:0")) for s in (1, 2, 1)]
    single.remove()
    options = plan_options(model, streamed)
    swap = apply_block_swap(
        model, layout=toy_layout(model), device="cuda:0", donor_device="cuda:1", **options
    )
    assert all(u.host.tensor.device == torch.device("cuda:1") for u in swap.units)
    assert "cuda:1,*" in swap.describe()
    with torch.no_grad():
        got = [model(**toy_inputs(s, device="cuda:0")) for s in (1, 2, 1)]
    assert all(map(torch.equal, got, expected))
    swap.remove()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_units_stored_in_device_memory_copy_through_the_copy_stream(monkeypatch):
    """One GPU: units stored on the compute GPU itself take the device-to-device path of a
    donor's copies (same streams and events), and outputs stay equal."""
    _store_every_other_unit_on("cuda:0", monkeypatch)
    model = make_toy()
    reference = make_toy()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = [reference.to("cuda:0")(**toy_inputs(s, device="cuda:0")) for s in (1, 2, 1)]
    swap = apply_block_swap(model, layout=toy_layout(model), device="cuda:0", blocks_to_swap=6)
    with torch.no_grad():
        got = [model(**toy_inputs(s, device="cuda:0")) for s in (1, 2, 1)]
    assert all(map(torch.equal, got, expected))
    swap.remove()
