import torch

from comfyui_wan_blockswap.wan_blockswap.storage import ALIGNMENT, HostBuffer, PackedLayout


def test_layout_aligns_every_tensor_and_round_trips_mixed_dtypes():
    tensors = [
        torch.randn(3, 5),
        torch.randn(7).to(torch.bfloat16),
        torch.arange(4, dtype=torch.int64),
        torch.tensor([True, False, True]),
        torch.randn(2, 2, dtype=torch.complex64),
        torch.randn(1).to(torch.float16),
    ]
    layout = PackedLayout.of((t.shape, t.dtype) for t in tensors)
    assert all(slot.offset % ALIGNMENT == 0 for slot in layout.slots)
    assert layout.nbytes % ALIGNMENT == 0
    assert layout.nbytes >= sum(t.numel() * t.element_size() for t in tensors)
    buffer = HostBuffer(layout.nbytes, pin=False)
    for view, tensor in zip(layout.views(buffer.tensor), tensors):
        view.copy_(tensor)
    for view, tensor in zip(layout.views(buffer.tensor), tensors):
        assert view.dtype == tensor.dtype and view.shape == tensor.shape
        assert torch.equal(view, tensor)
        assert view.data_ptr() % ALIGNMENT == buffer.tensor.data_ptr() % ALIGNMENT
    buffer.free()
    buffer.free()  # idempotent
    assert buffer.tensor is None


def test_host_buffer_is_exact_size():
    buffer = HostBuffer(1000, pin=False)
    assert buffer.tensor.numel() == 1000 and not buffer.pinned
    buffer.free()


def test_large_host_buffers_outlive_their_owner_through_views():
    buffer = HostBuffer(64 * 2**20, pin=False)
    buffer.tensor.fill_(7)
    view = buffer.tensor[-16:]
    buffer.free()
    assert buffer.tensor is None and int(view.sum()) == 7 * 16
