"""``callbacks.module_alias``: a second module tree over the same weight memory, which our
swap can change without the original seeing it ([Note: private model])."""

import torch
from torch import nn

from comfyui_wan_blockswap.callbacks.module_alias import (
    alias_module,
    is_copy_elsewhere,
    rebind_to_origins,
)


class SelfDetaching(torch.Tensor):
    """Like ComfyUI-GGUF's GGMLTensor: ``detach`` returns the tensor itself, and it carries
    attributes of its own."""

    def detach(self, *args, **kwargs):
        return self


def model():
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    net.register_buffer("scale", torch.full((2,), 0.5))
    net[2].weight = nn.Parameter(net[2].weight.detach().as_subclass(SelfDetaching))
    net[2].weight.tensor_type = "Q8_0"
    net[0].weight.seen_by_core = True
    net.loaded_state = {"device": "cuda"}
    net[0].per_load_flag = True
    return net


def test_the_alias_shares_memory_but_no_object():
    original = model()
    alias, origins = alias_module(original, drop_attrs=["per_load_flag"])
    pairs = list(
        zip(original.state_dict(keep_vars=True).values(), alias.state_dict(keep_vars=True).values())
    )
    assert all(a is not b and a.data_ptr() == b.data_ptr() for a, b in pairs)
    assert isinstance(alias[0].weight, nn.Parameter) and alias[0].weight.seen_by_core
    assert type(alias[2].weight) is SelfDetaching and alias[2].weight.tensor_type == "Q8_0"
    assert not hasattr(alias[0], "per_load_flag") and original[0].per_load_flag
    assert (
        alias.loaded_state == original.loaded_state
        and alias.loaded_state is not original.loaded_state
    )
    assert set(origins) == set(dict(alias.named_parameters())) | {"scale"}
    x = torch.randn(3, 4)
    assert torch.equal(alias(x), original(x))


def test_changing_the_alias_leaves_the_original_alone():
    original = model()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    alias, _ = alias_module(original)
    alias.register_forward_pre_hook(lambda module, args: None)
    alias[0].weight.data = torch.empty(0)
    alias[2].weight.data = torch.empty(0)
    alias.scale = torch.zeros(2)
    alias.to(torch.float64)
    assert not original._forward_pre_hooks
    assert all(torch.equal(before[k], v) for k, v in original.state_dict().items())
    assert original[0].weight.dtype == torch.float32


def test_rebinding_drops_a_hosts_copies():
    original = model()
    alias, origins = alias_module(original)
    alias[0].weight.data = alias[0].weight.data.clone()  # what a host's move back leaves
    alias[1].bias.data = torch.empty(0)  # a placeholder: not a copy of its origin
    freed = rebind_to_origins(alias, origins)
    assert freed == 16 * 4
    assert alias[0].weight.data_ptr() == original[0].weight.data_ptr()
    assert alias[1].bias.numel() == 0


def test_a_copy_elsewhere_is_of_its_origins_kind_on_another_device_and_never_a_wrapper():
    """What an unload may point at its origin: a plain tensor (or parameter) of the origin's
    dtype and shape on another device; a wrapper subclass never (``.data`` would move only
    the wrapper: a quantized weight's data would stay on the GPU)."""
    from torch.testing._internal.two_tensor import TwoTensor

    origin = torch.zeros(4, 4)
    assert is_copy_elsewhere(torch.zeros(4, 4, device="meta"), origin)
    assert is_copy_elsewhere(nn.Parameter(torch.zeros(4, 4, device="meta")), origin)
    assert not is_copy_elsewhere(torch.zeros(4, 4), origin)  # same device
    assert not is_copy_elsewhere(torch.zeros(4, 4, device="meta", dtype=torch.half), origin)
    assert not is_copy_elsewhere(torch.zeros(2, 8, device="meta"), origin)
    wrapped = TwoTensor(torch.zeros(4, 4), torch.zeros(4, 4))
    elsewhere = TwoTensor(torch.zeros(4, 4, device="meta"), torch.zeros(4, 4, device="meta"))
    assert not is_copy_elsewhere(elsewhere, wrapped)
