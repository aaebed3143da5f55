"""A swap unit whose weights live in a packed host buffer.

Between uses every tensor of the unit points at a 0-element placeholder of its dtype on the
target device: ``model.to(...)`` by anyone moves nothing large, byte counters (ComfyUI's
``module_size``) see only what is really on the GPU, and a forward that runs without our
hook fails loudly on the empty weight instead of reading another block's memory.
"""

from __future__ import annotations

import torch

from .storage import HostBuffer, PackedLayout
from .units import SwapUnit


class Placeholders:
    """One shared 0-element tensor per (dtype, device)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (dtype, device)
        if key not in self._cache:
            self._cache[key] = torch.empty(0, dtype=dtype, device=device)
        return self._cache[key]


class StoredUnit:
    """Host storage, placeholders and rebinding for one :class:`SwapUnit`."""

    def __init__(self, unit: SwapUnit, device: torch.device, placeholders: Placeholders) -> None:
        self.unit = unit
        self.name = unit.name
        # The tensor objects themselves: rebinding ``.data`` keeps Parameter identity,
        # ``requires_grad`` and any attributes other code hung on them.
        self.tensors = [ref.get() for ref in unit.tensors]
        # ``size()``, not ``shape``: a tensor subclass may report a logical shape that is not its
        # storage (ComfyUI-GGUF's GGMLTensor: the dequantized shape of quantized bytes).
        self.layout = PackedLayout.of((t.size(), t.dtype) for t in self.tensors)
        self.original_devices = [t.device for t in self.tensors]
        self.placeholders = [placeholders.get(t.dtype, device) for t in self.tensors]
        for i, (ref, tensor) in enumerate(zip(unit.tensors, self.tensors)):
            if tensor.device.type == "meta":  # a skeleton: give it a real, empty tensor object
                self.tensors[i] = ref.replace(torch.empty(0, dtype=tensor.dtype, device=device))
        prefix = len(unit.name) + 1
        self.local_names = [ref.qualname[prefix:] for ref in unit.tensors]
        self.host: HostBuffer | None = None
        self.host_views: list[torch.Tensor] = []

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    @property
    def is_empty(self) -> bool:
        """Every tensor came from a meta skeleton: there is nothing to pack, only to fill."""
        return all(device.type == "meta" for device in self.original_devices)

    def allocate(self, pin: bool) -> None:
        """Reserve the host buffer (contents undefined until :meth:`pack` or a loader fills it)."""
        if self.host is None:
            self.host = HostBuffer(self.layout.nbytes, pin)
            self.host_views = self.layout.views(self.host.tensor)

    def pack(self, pin: bool) -> None:
        """Copy the unit's current weights into its host buffer and leave placeholders."""
        self.allocate(pin)
        for view, tensor, device in zip(self.host_views, self.tensors, self.original_devices):
            if device.type != "meta":  # skeleton tensors have no data yet: a loader fills them
                view.copy_(tensor.detach())
        self.unbind()

    def bind(self, views: list[torch.Tensor]) -> None:
        for tensor, view in zip(self.tensors, views):
            tensor.data = view

    def unbind(self) -> None:
        for tensor, placeholder in zip(self.tensors, self.placeholders):
            tensor.data = placeholder

    def restore(self) -> None:
        """Give every tensor its own memory again on its original device; free the host buffer.

        Tensors that started on the meta device (lazy-loaded skeletons) come back on the CPU.
        """
        if self.host is None:
            return
        for tensor, view, device in zip(self.tensors, self.host_views, self.original_devices):
            target = torch.device("cpu") if device.type == "meta" else device
            with torch.inference_mode(tensor.is_inference()):  # [Note: inference tensors]
                tensor.data = view.to(target, copy=True)
        self.host_views = []
        self.host.free()
        self.host = None

    def discard(self) -> None:
        """Free the host buffer and leave every tensor a placeholder: drop the weights."""
        self.unbind()
        self.host_views = []
        if self.host is not None:
            self.host.free()
            self.host = None

    def state_dict_hook(
        self, module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict
    ) -> None:
        """Put the real (host) weights into ``state_dict`` where placeholders would be."""
        if not self.host_views:
            return
        for name, view in zip(self.local_names, self.host_views):
            key = prefix + name
            if key in state_dict:
                state_dict[key] = view
