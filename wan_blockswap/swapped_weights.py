"""What loaders and hosts may do with a swap's stored weights: find a swapped tensor, fill a
unit of a skeleton, write into a tensor's weights, count host bytes, transform each unit as it
lands on the GPU. Callers never touch the units' storage themselves.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Collection, ContextManager, Iterator

import torch
from torch import nn

from .errors import BlockSwapStateError
from .stored_unit import StoredUnit

if TYPE_CHECKING:
    from .scheduler import PrefetchScheduler


class SwappedWeights:
    """The part of :class:`~.engine.BlockSwap` that loaders and hosts use."""

    units: list[StoredUnit]
    scheduler: "PrefetchScheduler | None"
    device: torch.device
    _swapped_index: dict[str, tuple[StoredUnit, int]]
    model: nn.Module | None  # a property of BlockSwap

    def swapped_tensor(self, name: str) -> "tuple[StoredUnit, int] | None":
        """The unit holding the parameter or buffer ``name`` and its index there, if swapped."""
        if not self._swapped_index:
            self._swapped_index = {
                ref.qualname: (stored, index)
                for stored in self.units
                for index, ref in enumerate(stored.unit.tensors)
            }
        return self._swapped_index.get(name)

    def swapped_parameters(self) -> Iterator[tuple[str, int, str, torch.Tensor]]:
        """``(unit_name, index, qualname, tensor)`` for every swapped parameter and buffer: the
        unit that streams it, its index there (the order a transform gets a unit's tensors
        in), its name in the model and the tensor object registered under it now (its weights
        are a 0-element placeholder between uses)."""
        for stored in self.units:
            for index, ref in enumerate(stored.unit.tensors):
                yield stored.name, index, ref.qualname, ref.get()

    def swapped_parameter(self, name: str) -> torch.Tensor | None:
        """The swapped parameter or buffer ``name`` as registered now; None if not swapped."""
        found = self.swapped_tensor(name)
        if found is None:
            return None
        stored, index = found
        return stored.unit.tensors[index].get()

    def set_transform(self, transform: Any, unit_names: Collection[str] | None = None) -> None:
        """Run ``transform(unit_name, tensors)`` on the copy stream right after each unit in
        ``unit_names`` (every unit when None) lands on the GPU: ``tensors`` are the unit's
        tensors there, one per tensor in :meth:`swapped_parameters`' index order, and the
        transform may rewrite them in place (e.g. apply LoRA patches). It returns None, or one
        dtype (or None) per tensor: the dtype it left that tensor's bytes in, of the same
        element size, which the unit's tensor then has for this use ([Note: a transform may
        change a view's dtype] in ``scheduler``). Units not named get no call at all. Clears
        what fixed slots cache, made under the previous transform."""
        assert self.scheduler is not None
        self.scheduler.transform = transform
        self.scheduler.transformed = None if unit_names is None else frozenset(unit_names)
        self.scheduler.invalidate()

    def unit_binder(self) -> Callable[[str, list[torch.Tensor]], ContextManager[None]]:
        """``bound(unit_name, tensors)``: a context manager that points the unit's tensors
        at ``tensors`` (what a transform was given) meanwhile, and back at placeholders after,
        for a transform whose code reads weights through the module (a scaled op's scale).
        It holds the units, not this swap: a transform keeping it makes no reference cycle
        through the swap ([Note: no strong path to the model] in ``engine``)."""
        units = {stored.name: stored for stored in self.units}

        @contextlib.contextmanager
        def bound(unit_name: str, tensors: list[torch.Tensor]) -> Iterator[None]:
            stored = units[unit_name]
            stored.bind_tensors(tensors)
            try:
                yield
            finally:
                stored.unbind()

        return bound

    def fill_unit(self, unit: StoredUnit, write: Callable[[list[torch.Tensor]], None]) -> None:
        """Fill ``unit`` (from :meth:`swapped_tensor`), a unit of a skeleton that awaits its
        weights: reserve its host buffer (pinned when computing on CUDA), call
        ``write(views)`` with one host view per tensor, in :meth:`swapped_tensor`'s index
        order, and pack the filled unit for transfer compression (if on). Units may be filled
        from several threads at once, each unit from one."""
        unit.allocate(self.device.type == "cuda")
        with torch.no_grad():
            write(unit.host_views)
        unit.seal(self.device)

    def swapped_host_bytes(self) -> int:
        """Bytes of the swapped weights held in host memory (as ``state_dict()`` shows them)."""
        return sum(v.numel() * v.element_size() for u in self.units for v in u.host_views)

    def swapped_tensor_ids(self) -> set[int]:
        """``id()`` of every swapped parameter and buffer object, as captured at apply."""
        return {id(t) for stored in self.units for t in stored.tensors}

    def destination(self, name: str) -> torch.Tensor:
        """Where the weights of the parameter or buffer ``name`` live now: its host-buffer view
        if swapped, else the tensor itself. Loaders write checkpoint data here."""
        assert self.model is not None
        found = self.swapped_tensor(name)
        if found is not None:
            stored, index = found
            if not stored.host_views:
                raise BlockSwapStateError(f"{stored.name} has no host buffer yet (allocate it)")
            if stored.transfer is not None:  # the caller writes: the packed copy goes stale
                if self.scheduler is not None:
                    self.scheduler.streams.synchronize()  # no copy may still read it
                    self.scheduler.invalidate()
                stored.unseal()
            return stored.host_views[index]
        module_path, _, attr = name.rpartition(".")
        owner = self.model.get_submodule(module_path) if module_path else self.model
        tensor = owner._parameters.get(attr)
        return tensor if tensor is not None else owner._buffers[attr]
