"""A swap unit whose weights live in a packed host buffer.

With transfer compression the unit also has a :class:`CompressedTransfer`: the pinned bytes
that cross the link. Its real weights (``host_views``) then stay in pageable memory, where
they were when possible, and serve ``state_dict()``, loaders and ``restore()``.

Between uses every tensor of the unit points at a 0-element placeholder of its dtype on the
target device: ``model.to(...)`` by anyone moves nothing large, byte counters (ComfyUI's
``module_size``) see only what is really on the GPU, and a forward that runs without our
hook fails loudly on the empty weight instead of reading another block's memory.
"""

from __future__ import annotations

import enum
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import torch

from .compressed_transfer import CompressedTransfer, is_packable
from .storage import DeviceBuffer, HostBuffer, PackedLayout
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .units import SwapUnit, copy_with_strides, kept_strides, leaves, rebuild

logger = logging.getLogger("wan_blockswap")


class UnitState(enum.IntEnum):
    """Where a unit's weights are. [Note: unit states]

    ``OWN``: the tensors hold their own weights; nothing of ours is allocated (a skeleton's
    tensors hold nothing yet). ``ALLOCATED``: a host buffer is reserved, its contents are
    not the weights. ``FILLED``: the host buffer holds the weights; the tensors may already
    point at placeholders. ``SEALED``: filled, and the compressed transfer is built.

    Only a FILLED or SEALED unit may copy its host weights back over the tensors: an
    interrupt (Ctrl-C) or a failed allocation can stop ``pack`` half way, and copying a
    half-filled buffer back would silently corrupt weights that were never moved. Units of a
    skeleton are the exception: their tensors have no weights of their own, so whatever a
    loader wrote into the buffer is all there is.
    """

    OWN = 0
    ALLOCATED = 1
    FILLED = 2
    SEALED = 3


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
    """Host storage, placeholders and rebinding for one :class:`SwapUnit`.

    The unit is stored as its *pieces*: the plain tensors holding its data, one per plain
    tensor and one per inner tensor of a wrapper tensor ([Note: wrapper tensors] in
    ``units``). ``layout``, host views and slot views are per piece; :meth:`as_tensors`
    turns piece views back into one tensor per :attr:`SwapUnit.tensors` entry.
    """

    def __init__(
        self,
        unit: SwapUnit,
        device: torch.device,
        placeholders: Placeholders,
        compress: bool = False,
        storage: torch.device | None = None,
    ) -> None:
        self.unit = unit
        # None: host memory; else a donor device holding the weights (see DeviceBuffer)
        self.storage = storage
        self.transfer: CompressedTransfer | None = None
        self.pin = False
        self.name = unit.name
        # The tensor objects themselves: rebinding ``.data`` keeps Parameter identity,
        # ``requires_grad`` and any attributes other code hung on them. A wrapper tensor is
        # rebuilt instead (its device is fixed when it is made), from ``templates``.
        self.tensors = [ref.get() for ref in unit.tensors]
        self.templates = [t if is_traceable_wrapper_subclass(t) else None for t in self.tensors]
        self.pieces = [leaf for t in self.tensors for leaf in leaves(t)]
        self.counts = [len(leaves(t)) for t in self.tensors]
        # ``size()``, not ``shape``: a tensor subclass may report a logical shape that is not its
        # storage (ComfyUI-GGUF's GGMLTensor: the dequantized shape of quantized bytes).
        self.layout = PackedLayout.of((t.size(), t.dtype) for t in self.pieces)
        # A unit with nothing to pack (fp8, GGUF bytes, small tensors) keeps plain transfers:
        # a packed copy of raw pieces would only double its pinned memory.
        # A donor GPU's copies are not the bottleneck packing relieves: stored raw.
        self.compress = compress and storage is None and any(map(is_packable, self.pieces))
        self.original_devices = [t.device for t in self.pieces]
        self.original_strides = [kept_strides(t) for t in self.pieces]
        self.placeholders = [placeholders.get(t.dtype, device) for t in self.pieces]
        for i, (ref, tensor) in enumerate(zip(unit.tensors, self.tensors)):
            if tensor.device.type == "meta" and self.templates[i] is None:
                # a skeleton: give it a real, empty tensor object
                self.tensors[i] = ref.replace(torch.empty(0, dtype=tensor.dtype, device=device))
                self.pieces[sum(self.counts[:i])] = self.tensors[i]
        # wrapper tensors between uses: rebuilt over the placeholders
        self.parked = self.as_tensors(self.placeholders)
        prefix = len(unit.name) + 1
        self.local_names = [ref.qualname[prefix:] for ref in unit.tensors]
        self.host: HostBuffer | DeviceBuffer | None = None
        self.host_views: list[torch.Tensor] = []
        self.state = UnitState.OWN

    def as_tensors(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """One tensor per unit tensor over the piece ``views``: the view of a plain tensor, a
        wrapper rebuilt over its pieces' views."""
        out = []
        pieces = iter(views)
        for template, count in zip(self.templates, self.counts):
            if template is None:
                out.append(next(pieces))
            else:
                out.append(rebuild(template, iter([next(pieces) for _ in range(count)])))
        return out

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    @property
    def awaits_data(self) -> bool:
        """Some tensor came from a meta skeleton: a loader still has to fill it."""
        return any(device.type == "meta" for device in self.original_devices)

    @property
    def is_empty(self) -> bool:
        """Every tensor came from a meta skeleton: there is nothing to pack, only to fill."""
        return all(device.type == "meta" for device in self.original_devices)

    @property
    def copy_nbytes(self) -> int:
        """Bytes one copy of the unit sends over the link."""
        return self.transfer.nbytes if self.transfer is not None else self.layout.nbytes

    def allocate(self, pin: bool) -> None:
        """Reserve the host buffer (contents undefined until :meth:`pack` or a loader fills it)."""
        self.pin = pin
        if self.host is None and not self.host_views:
            assert self.state == UnitState.OWN, self.state
            if self.storage is not None:
                self.host = DeviceBuffer(self.layout.nbytes, self.storage)
            else:
                # Compressed units never copy from this buffer: pinning it would only lock RAM.
                self.host = HostBuffer(self.layout.nbytes, pin and not self.compress)
            self.host_views = self.layout.views(self.host.tensor)
            self.state = UnitState.ALLOCATED

    def pack(self, pin: bool) -> None:
        """Copy the unit's current weights into its host buffer and leave placeholders.

        Compressed, weights already in RAM stay where they are (no second raw copy); the
        caller then :meth:`seal`s the unit."""
        assert self.state <= UnitState.ALLOCATED, self.state
        if self.compress and not self.awaits_data:
            self.pin = pin
            self.host_views = [
                t.detach().to("cpu").contiguous() for t in self.pieces  # CPU: no copy
            ]
        else:
            self.allocate(pin)
            for view, tensor, device in zip(self.host_views, self.pieces, self.original_devices):
                if device.type != "meta":  # skeleton tensors have no data: a loader fills them
                    view.copy_(tensor.detach())
        self.state = UnitState.FILLED  # before unbind: see [Note: unit states]
        self.unbind()

    def seal(self, work_device: torch.device) -> None:
        """Build the compressed transfer from the (filled) host weights; once, when compressing."""
        if self.compress and self.transfer is None and self.host_views:
            with torch.no_grad():
                self.transfer = CompressedTransfer.encode(
                    self.layout, self.host_views, self.pin, work_device
                )
            self.state = UnitState.SEALED

    def unseal(self) -> None:
        """Free the packed copy (its weights are about to change); :meth:`seal` makes it anew.
        The caller makes sure no copy still reads it."""
        if self.transfer is not None:
            self.transfer.free()
            self.transfer = None
            self.state = UnitState.FILLED

    def drop_compression(self) -> None:
        """Keep only the raw weights, in a pinned buffer of their own, and free the packed
        copy (``transfer_compression="auto"`` found the copies hidden by compute). The raw
        weights kept in place until now are released. The caller makes sure no copy still
        reads the packed buffer."""
        if self.transfer is None:
            return
        host = HostBuffer(self.layout.nbytes, self.pin)
        views = self.layout.views(host.tensor)
        for view, weight in zip(views, self.host_views):
            view.copy_(weight)
        if self.host is not None:
            self.host.free()
        self.host, self.host_views = host, views
        self.unseal()
        self.compress = False

    def bind(self, views: list[torch.Tensor]) -> None:
        """Point the unit's tensors at ``views`` (one per piece)."""
        self._point_at(views, self.as_tensors(views) if self._wraps else None)

    def bind_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Point the unit's tensors at ``tensors``, one per unit tensor (:meth:`as_tensors`)."""
        for ref, template, tensor in zip(self.unit.tensors, self.templates, tensors):
            if template is None:
                ref.get().data = tensor
            else:
                ref.replace(tensor)

    def unbind(self) -> None:
        self._point_at(self.placeholders, self.parked)

    @property
    def _wraps(self) -> bool:
        return any(t is not None for t in self.templates)

    def _point_at(self, pieces: list[torch.Tensor], wrapped: list[torch.Tensor] | None) -> None:
        # Through the registered object, not the one captured at apply: a host may have put
        # a new Parameter over the same placeholder (core's quantized ops re-wrap their
        # parameters whenever the module is moved, even where nothing moves).
        start = 0
        for i, (ref, count) in enumerate(zip(self.unit.tensors, self.counts)):
            if self.templates[i] is None:
                ref.get().data = pieces[start]
            else:
                assert wrapped is not None
                ref.replace(wrapped[i])
            start += count

    def restore(self, origin: Callable[[str], torch.Tensor | None] | None = None) -> None:
        """Give every tensor its own memory again on its original device; free the host buffer.

        Tensors that started on the meta device (lazy-loaded skeletons) come back on the CPU.
        A unit stopped before its buffer was filled only frees it ([Note: unit states]).
        ``origin``: by a tensor's qualified name, memory that holds its weights already (a
        host's own copy, the same values) to point it at instead of a copy out of the host
        buffer; used where its device, dtype, size and strides are the tensor's.
        """
        filled = self.state >= UnitState.FILLED or (self.awaits_data and self.host_views)
        if not filled or len(self.host_views) != len(self.pieces):
            self._free_host()
            self.host_views = []
            return
        restored = []
        for tensor, view, device, strides, given in zip(
            self.pieces,
            self.host_views,
            self.original_devices,
            self.original_strides,
            self._origins(origin),
        ):
            target = torch.device("cpu") if device.type == "meta" else device
            with torch.inference_mode(tensor.is_inference()):  # [Note: inference tensors]
                if _fits(given, view, target, strides):
                    restored.append(torch.Tensor.detach(given))  # no copy: the host's memory
                    continue
                # Views of our buffer are copied out; weights kept in place (compressed) return
                restored.append(copy_with_strides(view, target, strides, self.host is not None))
        self._point_at(restored, self.as_tensors(restored) if self._wraps else None)
        self.host_views = []
        self._free_host()

    def _origins(
        self, origin: Callable[[str], torch.Tensor | None] | None
    ) -> list[torch.Tensor | None]:
        """Per piece, what ``origin`` gives for its tensor's name (plain tensors only: a
        wrapper's pieces are rebuilt, not looked up)."""
        found: list[torch.Tensor | None] = []
        for ref, template, count in zip(self.unit.tensors, self.templates, self.counts):
            if template is None and origin is not None:
                found.append(origin(ref.qualname))
            else:
                found.extend([None] * count)
        return found

    def _free_host(self) -> None:
        self.unseal()
        if self.host is not None:
            self.host.free()
            self.host = None
        self.state = UnitState.OWN

    def discard(self) -> None:
        """Free the host buffer and leave every tensor a placeholder: drop the weights."""
        self.unbind()
        self.host_views = []
        self._free_host()

    def state_dict_hook(
        self, module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict
    ) -> None:
        """Put the real (host) weights into ``state_dict`` where placeholders would be."""
        if not self.host_views:
            return
        for name, view in zip(self.local_names, self.as_tensors(self.host_views)):
            key = prefix + name
            if key in state_dict:
                state_dict[key] = view


# Threads that fault in, pin and fill host buffers at once: one core does only a few GB/s.
HOST_THREADS = 8
# The most bytes of raw weights one batch of a compression drop reads before the mapped
# file's pages are dropped: what RAM holds beside the pinned copies meanwhile.
HOST_BATCH_BYTES = 2 * 2**30


def _in_threads(
    calls: list[Callable[[], None]], name: str, device: torch.device | None = None
) -> None:
    """Run ``calls`` on up to HOST_THREADS threads, each with ``device`` current where it is
    a GPU (page-locking on a thread whose current device is another GPU would make a
    context there); raise the first one's error, once every call has ended."""
    index = None
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()

    def on_device(call: Callable[[], None]) -> None:
        if index is None:
            return call()
        with torch.cuda.device(index):
            return call()

    if len(calls) < 2:
        for call in calls:
            on_device(call)
        return
    workers = min(HOST_THREADS, os.cpu_count() or 1, len(calls))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
        for future in [pool.submit(on_device, call) for call in calls]:
            future.result()


def allocate_empty(units: list[StoredUnit], pin: bool, device: torch.device | None = None) -> None:
    """Allocate the host buffers of units that have no data yet (a skeleton being loaded) on
    several threads: page-locking faults in and pins every page, which one core does at only
    a few GB/s, and the loader then fills the buffers in parallel too."""
    empty = [u for u in units if u.is_empty and u.host is None]
    if len(empty) >= 2:
        _in_threads([lambda u=u: u.allocate(pin) for u in empty], "blockswap-alloc", device)


def drop_compression_of(
    units: list[StoredUnit],
    after_each_batch: Callable[[], None] | None = None,
    device: torch.device | None = None,
) -> None:
    """:meth:`StoredUnit.drop_compression` of ``units`` on up to HOST_THREADS threads: each
    faults in, pins and fills a new buffer (H100, 81 frames of 40 Wan-14B blocks: done on
    one thread, the switch of 19.7 GiB made its step about 12 s slower, session 32). With
    ``after_each_batch`` (the mapped file's page drop: never while a copy still reads the
    mapping), in batches of at most HOST_THREADS units and HOST_BATCH_BYTES (a bigger unit
    alone), the call after each. A unit that failed stays compressed, and the first error is
    raised once its batch has ended, after the page drop."""
    if after_each_batch is None:  # nothing read stays in RAM: no batches
        _in_threads([u.drop_compression for u in units], "blockswap-raw", device)
        return
    for batch in _batches(units):
        try:
            _in_threads([u.drop_compression for u in batch], "blockswap-raw", device)
        except BaseException:
            try:
                after_each_batch()
            except Exception as error:  # the batch's error is the one raised
                logger.warning("dropping the mapped file's pages failed too: %s", error)
            raise
        after_each_batch()


def _batches(units: list[StoredUnit]) -> Iterator[list[StoredUnit]]:
    """``units`` in order, in batches of at most HOST_THREADS units and HOST_BATCH_BYTES."""
    batch: list[StoredUnit] = []
    nbytes = 0
    for unit in units:
        size = unit.layout.nbytes
        if batch and (len(batch) == HOST_THREADS or nbytes + size > HOST_BATCH_BYTES):
            yield batch
            batch, nbytes = [], 0
        batch.append(unit)
        nbytes += size
    if batch:
        yield batch


def _fits(
    given: torch.Tensor | None,
    view: torch.Tensor,
    device: torch.device,
    strides: tuple[int, ...] | None,
) -> bool:
    """Whether ``given`` can stand for the piece whose host view is ``view``: a plain tensor
    on ``device`` of its dtype, size and kept strides (contiguous where none were kept)."""
    if given is None or is_traceable_wrapper_subclass(given):
        return False
    if given.device != device or given.dtype != view.dtype or given.size() != view.size():
        return False
    return given.is_contiguous() if strides is None else given.stride() == strides
