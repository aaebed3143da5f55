"""A second module tree that shares another's weights: same classes, same attributes, new
module and parameter objects over the same tensor memory.

Swapping a model changes its modules (hooks) and its parameters (placeholders). When the model
belongs to someone else (ComfyUI's loader output, shared by every clone of it), the swap goes
on an alias instead: nothing is copied, and nothing done to the alias, short of writing into
a tensor's memory, reaches the original. See [Note: private model] in ``comfy_private``.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

# Module attributes that are containers the original may keep mutating (hook tables, sets):
# the alias gets its own shallow copy of each.
_CONTAINERS = (dict, list, set)


def alias_module(
    module: nn.Module,
    drop_attrs: Iterable[str] = (),
    drop_root_attrs: Iterable[str] = (),
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """An alias of ``module`` and the tensors it started from, by qualified name.

    Every submodule is shallow-copied (its own ``__dict__``, hook tables and child table);
    every parameter and buffer becomes a new tensor object over the same memory, carrying the
    original's Python attributes. Tensors reachable under several names stay one object.
    ``drop_attrs`` are instance attributes removed from every copied module (state a host hung
    on the original, to be rebuilt for the alias); ``drop_root_attrs`` only from the root.

    The returned ``origins`` are the original's tensor objects, by the alias' names: whatever
    memory a host later gives them (core moves the original to the GPU and back, as copies),
    :func:`rebind_to_origins` can point the alias at it again.
    """
    drop = frozenset(drop_attrs)
    tensors: dict[int, torch.Tensor] = {}
    modules: dict[int, nn.Module] = {}

    originals: dict[int, torch.Tensor] = {}  # id of an alias -> the tensor it aliases

    def alias_tensor(tensor: torch.Tensor) -> torch.Tensor:
        key = id(tensor)
        if key not in tensors:
            tensors[key] = _alias_tensor(tensor)
            originals[id(tensors[key])] = tensor
        return tensors[key]

    def alias(original: nn.Module) -> nn.Module:
        key = id(original)
        if key in modules:
            return modules[key]
        new = copy.copy(original)
        modules[key] = new
        state = new.__dict__
        for name in drop.intersection(state):
            del state[name]
        for name, value in list(state.items()):
            if isinstance(value, _CONTAINERS) and name not in ("_parameters", "_buffers"):
                state[name] = copy.copy(value)
        new._parameters = type(original._parameters)(
            (name, None if t is None else alias_tensor(t))
            for name, t in original._parameters.items()
        )
        new._buffers = type(original._buffers)(
            (name, None if t is None else alias_tensor(t)) for name, t in original._buffers.items()
        )
        new._modules = type(original._modules)(
            (name, None if child is None else alias(child))
            for name, child in original._modules.items()
        )
        return new

    root = alias(module)
    for name in frozenset(drop_root_attrs).intersection(root.__dict__):
        del root.__dict__[name]
    origins = {name: originals[id(tensor)] for name, tensor in named_tensors(root)}
    return root, origins


def named_tensors(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``module`` by qualified name, shared ones once."""
    yield from module.named_parameters(remove_duplicate=True)
    yield from module.named_buffers(remove_duplicate=True)


def rebind_to_origins(
    module: nn.Module, origins: dict[str, torch.Tensor], skip: set[int] = frozenset()
) -> int:
    """Point every tensor of ``module`` that a host moved back to the device its origin is
    on, as a copy, at its origin's memory again (dropping the copy); ``skip``: ids of tensors
    to leave alone. Returns the bytes given back."""
    freed = 0
    with torch.no_grad():
        for name, tensor in named_tensors(module):
            origin = origins.get(name)
            if origin is None or id(tensor) in skip or not _is_moved_copy(tensor, origin):
                continue
            freed += point_at(tensor, origin)
    return freed


def point_at(tensor: torch.Tensor, origin: torch.Tensor) -> int:
    """Make ``tensor`` (the same object) hold ``origin``'s memory; the bytes it held."""
    nbytes = tensor.numel() * tensor.element_size()
    with torch.no_grad(), torch.inference_mode(origin.is_inference()):
        tensor.data = torch.Tensor.detach(origin)
    return nbytes


def _same_kind(tensor: torch.Tensor, origin: torch.Tensor) -> bool:
    """Of ``origin``'s type (or a parameter), dtype and shape: where it is, it holds a copy
    of its origin's weights or the same memory."""
    if type(tensor) is not type(origin) and not isinstance(tensor, nn.Parameter):
        return False
    return tensor.dtype == origin.dtype and tensor.size() == origin.size()


def is_copy_elsewhere(tensor: torch.Tensor, origin: torch.Tensor) -> bool:
    """Of ``origin``'s kind on another device: a copy a host moved there (core's load of a
    static model moves resident weights to the GPU as copies). Never a wrapper subclass (a
    comfy-kitchen QuantizedTensor): ``.data`` would take only the wrapper's device, and the
    quantized data would stay where it is."""
    if is_traceable_wrapper_subclass(tensor):
        return False
    return _same_kind(tensor, origin) and tensor.device != origin.device


def _is_moved_copy(tensor: torch.Tensor, origin: torch.Tensor) -> bool:
    """Of ``origin``'s kind on its device but in other memory: a copy a host made."""
    if not _same_kind(tensor, origin) or tensor.device != origin.device:
        return False
    if tensor.device.type == "meta":
        return False
    try:
        return tensor.data_ptr() != origin.data_ptr()
    except RuntimeError:  # a wrapper subclass without storage of its own
        return False


def _alias_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor object over ``tensor``'s memory with its Python attributes; a parameter
    stays a parameter."""
    attributes = dict(getattr(tensor, "__dict__", {}))
    with torch.inference_mode(tensor.is_inference()):
        # torch's own detach: a subclass may override it to return itself (ComfyUI-GGUF's
        # GGMLTensor does), and the alias must be another tensor over the same memory
        alias = torch.Tensor.detach(tensor)
        if alias is tensor:
            raise TypeError(f"{type(tensor).__name__} cannot be aliased (detach returns it)")
        if isinstance(tensor, nn.Parameter):
            alias = nn.Parameter(alias, requires_grad=tensor.requires_grad)
    if attributes:
        alias.__dict__.update(attributes)
    return alias
